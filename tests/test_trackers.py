"""`output.trackers`: mlflow against a real `mlflow server` on loopback (conftest's `mlflow_server`), read
back through `mlflow.search_runs` and the client; wandb in offline mode ($WANDB_MODE=offline, $WANDB_DIR a
temporary folder), read back from the records of its `.wandb` files. One job reports to both: its run
carries the resolved spec as parameters / config, every step's metrics and the run folder as artifacts.
Bad tracker settings are refused before anything starts. A sweep's trials as children of the sweep's
MLflow run: tests/test_tune.py; their W&B group: here, at the level of the tracker runs."""

from __future__ import annotations

import json
import sys

import pytest

from ftray.config import SpecError, resolve_paths, spec_from_dict
from tests._specs import free_port, job_dict, run_here
from tests._wandb import history_rows, records_of, wandb_records


def _job(tiny_model, arith, out, cache_dir, **output) -> dict:
    return job_dict(tiny_model, arith[0], arith[1], out, cache_dir, scaling__num_workers=1, train__max_steps=5,
                    train__global_batch_size=4, train__eval_every=2, **{f"output__{k}": v for k, v in output.items()})


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_model, arith, cache_dir, mlflow_server):
    """One job (5 steps, in this process) reporting to MLflow and to W&B offline: (run folder, its run.json
    record, the W&B folder)."""
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(root))
        record = run_here(_job(tiny_model, arith, root / "tracked", cache_dir, trackers=["mlflow", "wandb"],
                               tracking_uri=mlflow_server, experiment="ftray-tests-job"))
    return root / "tracked", record, root


def test_tracker_settings_are_refused_before_anything_starts(tiny_model, arith, cache_dir, tmp_path, monkeypatch):
    from ftray.train.launch import check_job

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SpecError, match=r"output.trackers: mlflow needs a tracking server: set output.tracking_uri"):
        check_job(resolve_paths(spec_from_dict(_job(tiny_model, arith, tmp_path / "a", cache_dir, trackers=["mlflow"]))))
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SpecError, match=rf"output.tracking_uri: the MLflow server at {closed} did not answer"):
        check_job(resolve_paths(spec_from_dict(_job(tiny_model, arith, tmp_path / "b", cache_dir, trackers=["mlflow"],
                                                    tracking_uri=closed))))
    with pytest.raises(SpecError, match=r"output.trackers.0"):
        spec_from_dict(_job(tiny_model, arith, tmp_path / "c", cache_dir, trackers=["neptune"]))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_job_reports_params_every_step_and_its_run_folder(tracked, tiny_model, mlflow_server):
    import mlflow
    from mlflow import MlflowClient

    out, record, _ = tracked
    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["ftray-tests-job"], output_format="list")
    (run,) = [r for r in runs if r.data.tags.get("ftray.output_dir") == str(out)]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    p = run.data.params
    assert p["method.kind"] == "sft" and p["adapter.kind"] == "lora" and float(p["train.lr"]) == 1e-3
    assert p["model.path"] == str(tiny_model) and p["train.max_steps"] == "5"
    client = MlflowClient(mlflow_server)
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in ("loss", "eval/eval_loss")}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # Every step's loss, the same numbers as the run folder's metrics.jsonl; evaluations at 0, 2, 4 and 5.
    want = [(h["step"], h["loss"]) for h in lines if "loss" in h]
    assert [s for s, _ in sorted(history["loss"])] == [s for s, _ in want] == [1, 2, 3, 4, 5]
    assert [v for _, v in sorted(history["loss"])] == pytest.approx([v for _, v in want])
    assert [s for s, _ in sorted(history["eval/eval_loss"])] == [0, 2, 4, 5]
    assert dict(history["eval/eval_loss"])[5] == pytest.approx(record["eval"]["after"]["eval_loss"])
    assert {"loss", "lr", "tokens", "step_time", "eval/eval_loss", "eval/perplexity"} <= set(run.data.metrics)
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"run.json", "metrics.jsonl", "adapter", "tokenizer"} <= arts and "checkpoints" not in arts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "adapter")} >= {"adapter/adapter_config.json",
                                                                                   "adapter/adapter_model.safetensors"}


def test_wandb_run_has_config_every_step_and_its_run_folder(tracked):
    out, record, wandb_dir = tracked
    ((run_id, parts),) = wandb_records(wandb_dir).items()
    # Rank 0's part (config, every step), then the driver's (the run folder, the exit code).
    train, final = parts
    (run,) = records_of(train, "run")
    assert (run.run_id, run.project, run.display_name, run.job_type) == (run_id, "ftray-tests-job", "tracked", "sft")
    assert list(run.tags) == ["sft", "lora"]
    config = {c.key: json.loads(c.value_json) for r in records_of(train, "config") + [run] for c in r.config.update}
    assert config["method.kind"] == "sft" and config["train.max_steps"] == 5 and config["output.dir"] == str(out)
    rows = history_rows(train)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    want = {h["step"]: h["loss"] for h in lines if "loss" in h}
    assert sorted(want) == [1, 2, 3, 4, 5]
    assert {s: r["loss"] for s, r in rows.items() if "loss" in r} == pytest.approx(want)
    assert sorted(s for s, r in rows.items() if "eval/eval_loss" in r) == [0, 2, 4, 5]
    assert rows[5]["eval/eval_loss"] == pytest.approx(record["eval"]["after"]["eval_loss"])
    assert [e.exit_code for e in records_of(train, "exit")] == [0]
    (art,) = records_of(final, "artifact")
    files = {m.path for m in art.manifest.contents}
    assert {"run.json", "metrics.jsonl", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= files
    assert not any(f.startswith("checkpoints/") for f in files) and art.type == "ftray-run"
    assert [r.run_id for r in records_of(final, "run")] == [run_id] and [e.exit_code for e in records_of(final, "exit")] == [0]


def test_wandb_trial_is_grouped_under_its_sweep_and_a_failure_ends_it_failed(tiny_model, arith, cache_dir, tmp_path,
                                                                           monkeypatch):
    """The sweep's group reaches a trial's W&B run as `run_trial` passes it (`Plan.tracking_parent` into
    `start_run`); rank 0 logs two steps and fails (its run left open, in this process): the driver ends the
    run with exit code 1 and no run folder."""
    from ftray.train.live import Live
    from ftray.train.tracking import finish_run, start_run, start_sweep_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    spec = resolve_paths(spec_from_dict(_job(tiny_model, arith, tmp_path / "sweep" / "trials" / "t1", cache_dir,
                                             trackers=["wandb"])))
    parent = start_sweep_run(spec.output, str(tmp_path / "sweep"), "sweep", {"metric": "eval/eval_loss"})
    assert parent == {"wandb": {"group": "sweep", "mode": "offline", "dir": str(tmp_path)}}
    ref = start_run(spec, parent)
    live = Live(str(tmp_path / "sweep" / "trials" / "t1"), 0, ref)
    live.add({"step": 1, "loss": 2.5}, flush=True)
    live.add({"step": 2, "loss": 2.25, "eval/eval_loss": 2.0}, flush=True)
    finish_run(ref, None, "FAILED")
    train, final = wandb_records(tmp_path)[ref["wandb"]["id"]]
    for part in (train, final):
        (run,) = records_of(part, "run")
        assert (run.run_group, run.job_type) == ("sweep", "trial")
        assert [e.exit_code for e in records_of(part, "exit")] == [1]
    assert {s: r["loss"] for s, r in history_rows(train).items()} == {1: 2.5, 2: 2.25}
    assert records_of(final, "artifact") == []


def test_wandb_settings_are_refused_before_anything_starts(tiny_model, arith, cache_dir, tmp_path, monkeypatch):
    from ftray.train.launch import check_job

    def check(out: str):
        return check_job(resolve_paths(spec_from_dict(_job(tiny_model, arith, tmp_path / out, cache_dir,
                                                           trackers=["wandb"]))))

    for k in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no `wandb login` entry
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(SpecError, match=r"^output.trackers: wandb logs online to \S+ and has no credentials: set "
                                        r"WANDB_API_KEY .*or WANDB_MODE=offline"):
        check("a")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a key is enough to pass: nothing is sent before the job
    check("b")
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "offline")
    check("c")
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python spells "not installed" to an import
    with pytest.raises(SpecError, match=r"^output.trackers: wandb: the wandb client is not installed"):
        check("d")
    assert list(tmp_path.iterdir()) == []  # no run folder, no W&B folder: `ftray validate` writes nothing
