"""Every bad input: one line naming the place, exit code 2, before any Ray resource, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from ftray.cli import main
from tests._specs import job_dict


@pytest.fixture
def job(tmp_path, tiny_model, arith, ray_down):
    def make(mutate=None, text=None, overrides=()):
        d = job_dict(tiny_model, arith[0], arith[1], tmp_path / "run", tmp_path / "cache")
        if mutate:
            mutate(d)
        p = tmp_path / "job.yaml"
        p.write_text(text if text is not None else yaml.safe_dump(d, sort_keys=False))
        return [str(p), *[a for o in overrides for a in ("--set", o)]]

    return make


def run_cli(args, capsys):
    import ray

    code = main(["train", *args])
    err = capsys.readouterr().err.strip()
    assert not ray.is_initialized(), "Ray was started before the input was checked"
    return code, err


def bad_jsonl(tmp_path, lines):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


CASES = {
    "invalid yaml": (dict(text="model: {path: [unclosed\n"), r"job.yaml:\d+: invalid YAML"),
    "unknown key": (dict(overrides=["train.learning_rate=1"]), r"unknown key `train.learning_rate`; did you mean `train.lr`"),
    "wrong type": (dict(overrides=["train.max_steps=many"]), r"--set train.max_steps: `train.max_steps`: .*integer"),
    "zero stage 4": (dict(overrides=["deepspeed.zero_stage=4"]), r"`deepspeed.zero_stage`: Input should be 0, 1, 2 or 3"),
    "batch not divisible": (dict(overrides=["train.global_batch_size=12"]), r"`train.global_batch_size` \(12\) must be a multiple"),
    "missing data file": (dict(overrides=["data.train=/nonexistent/train.jsonl"]), r"/nonexistent/train.jsonl: no such data file"),
    "model path missing": (dict(overrides=["model.path=/nonexistent/model"]), r"model.path: /nonexistent/model: no such folder"),
    # A relative path is kept as written when it could be a hub id: without its own check it was sent to the hub.
    "model path not a hub id": (dict(overrides=["model.path=runs/ftray-no-such-model"]),
                                r"model.path: runs/ftray-no-such-model: no such folder"),
    "tokenizer missing": (dict(overrides=["model.tokenizer=/nonexistent/tok"]), r"model.tokenizer: /nonexistent/tok: no such folder"),
    "lora target missing": (
        dict(mutate=lambda d: d["adapter"].update(target_modules=["q_proj", "attn_c"])),
        r"adapter.target_modules: `attn_c` is not a module of LlamaForCausalLM; linear modules are: .*q_proj",
    ),
    # `output.publish_to` publishes a peft adapter while the job trains: a full run has none.
    "publish a full run": (
        dict(mutate=lambda d: d.update(adapter={"kind": "full"}), overrides=["output.publish_to=/tmp/ftray-no-registry"]),
        r"`output.publish_to` publishes the job's peft adapter while it trains; `adapter.kind: full` trains the model's",
    ),
    "publish name not servable": (
        dict(overrides=["output.publish_to=/tmp/ftray-no-registry", "output.publish_name=../up"]),
        r"`output.publish_name`: '../up' is not a servable adapter name",
    ),
    "publish name without a folder": (dict(overrides=["output.publish_name=live"]),
                                      r"`output.publish_name` names the adapter under `output.publish_to`, which is not set"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_spec(case, job, tmp_path, capsys):
    kwargs, pattern = CASES[case]
    code, err = run_cli(job(**kwargs), capsys)
    assert code == 2
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    import re

    assert re.search(pattern, err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "lines,pattern",
    [
        ([], r"bad.jsonl: no usable rows \(empty file\)"),
        (['{"prompt": "1+1=", "completion": "2"}', '{"prompt": "2+2=", "completion": 4'], r"bad.jsonl:2: not valid JSON"),
        (['{"prompt": "1+1=", "completion": "2"}', '{"prompt": "2+2="}'], r"bad.jsonl:2: missing `completion`"),
    ],
    ids=["empty", "not json", "missing completion"],
)
def test_bad_rows(lines, pattern, job, tmp_path, capsys):
    path = bad_jsonl(tmp_path, lines) if lines else str(tmp_path / "bad.jsonl")
    if not lines:
        (tmp_path / "bad.jsonl").write_text("")
    code, err = run_cli(job(overrides=[f"data.train={path}"]), capsys)
    assert code == 2 and len(err.splitlines()) == 1
    import re

    assert re.search(pattern, err), err
    assert not (tmp_path / "run").exists()


def test_missing_output_in_instruction_rows(job, tmp_path, capsys):
    path = bad_jsonl(tmp_path, [json.dumps({"instruction": "say hi", "output": "hi"}), json.dumps({"instruction": "x"})])
    code, err = run_cli(job(overrides=[f"data.train={path}", "data.format=instruction", "data.eval=null"]), capsys)
    assert code == 2 and "bad.jsonl:2: missing `output`" in err


def test_cli_subprocess_one_line(job, tmp_path):
    """The real console script: one line on stderr, exit 2, no traceback."""
    args = job(overrides=["deepspeed.zero_stage=4"])
    r = subprocess.run([sys.executable, "-m", "ftray", "train", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("command", ["train", "tune"])
def test_submitted_job_with_a_run_folder_in_its_working_dir_is_refused(command, job, tmp_path, capsys, monkeypatch):
    """In a `ray job submit` job (the supervisor hands its driver RAY_JOB_CONFIG_JSON_ENV_VAR) the working
    dir is a temporary copy Ray deletes after the job: a relative output.dir would be lost with it."""
    work = tmp_path / "working_dir_copy"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_x1"}}))
    args = job(overrides=["output.dir=runs/sft"])
    if command == "tune":
        d = {
            "base": yaml.safe_load((tmp_path / "job.yaml").read_text()),
            "fixed": {"train.max_steps": 4, "train.eval_every": 2},
            "search": {"train.lr": {"choice": [1e-3, 1e-2]}},
            "metric": "eval/eval_loss",
            "mode": "min",
            "num_samples": 2,
            "resources": {"workers": 1},
            "output": {"dir": "runs/sweep"},
        }
        (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(d))
        args = [str(tmp_path / "sweep.yaml")]
    import ray

    code = main([command, *args])
    err = capsys.readouterr().err.strip()
    assert not ray.is_initialized(), "Ray was started before the input was checked"
    assert code == 2 and len(err.splitlines()) == 1, err
    name = "sweep" if command == "tune" else "sft"
    assert f"output.dir: {work / 'runs' / name} is inside the working directory of submitted job raysubmit_x1" in err, err
    assert "s3://" in err and not (work / "runs").exists()
    # Outside the working dir (shared storage) the same submitted job passes this check.
    from ftray.train.launch import check_output_survives

    check_output_survives(str(tmp_path / "shared" / "runs" / name))
