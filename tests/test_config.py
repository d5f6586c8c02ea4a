"""The job spec: errors name the file, line and field; overrides are typed; values are derived."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ftray.config import SpecError, load_spec, parse_overrides, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
model:
  path: /m
data:
  train: /d.jsonl
method:
  kind: sft
train:
  lr: 1e-4
  max_steps: 10
  global_batch_size: 8
  micro_batch_size: 2
scaling:
  num_workers: 2
output:
  dir: /tmp/x
"""


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_good_spec_derives_grad_accum(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.train.lr == 1e-4  # PyYAML reads 1e-4 as a string; the spec makes it a number
    assert spec.grad_accum == 2
    assert spec.adapter.kind == "lora" and spec.deepspeed.zero_stage == 2


def test_unknown_key_names_line_and_suggests(tmp_path):
    p = write(tmp_path, GOOD.replace("  max_steps: 10", "  max_step: 10"))
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = str(e.value)
    assert f"{p}:9:" in msg and "unknown key `train.max_step`" in msg and "`train.max_steps`" in msg
    assert "\n" not in msg


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(SpecError, match=r"job.yaml:\d+: unknown key `trian`; did you mean `train`"):
        load_spec(write(tmp_path, GOOD + "trian:\n  lr: 1\n"))


def test_wrong_type_names_field_and_line(tmp_path):
    with pytest.raises(SpecError, match=r"job.yaml:10: `train.global_batch_size`: .*integer.*'eight'"):
        load_spec(write(tmp_path, GOOD.replace("global_batch_size: 8", "global_batch_size: eight")))


def test_zero_stage_4(tmp_path):
    with pytest.raises(SpecError, match=r"`deepspeed.zero_stage`: Input should be 0, 1, 2 or 3 \(got 4\)"):
        load_spec(write(tmp_path, GOOD + "deepspeed:\n  zero_stage: 4\n"))


def test_global_batch_not_divisible(tmp_path):
    with pytest.raises(SpecError, match=r"global_batch_size` \(10\) must be a multiple of .* \(2 x 2 = 4\)"):
        load_spec(write(tmp_path, GOOD.replace("global_batch_size: 8", "global_batch_size: 10")))


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(SpecError, match=r"job.yaml:\d+: invalid YAML"):
        load_spec(write(tmp_path, GOOD + "  - : [\n"))


def test_missing_required_field(tmp_path):
    with pytest.raises(SpecError, match=r"`output` is required"):
        load_spec(write(tmp_path, GOOD.split("output:")[0]))


def test_both_warmups_refused(tmp_path):
    text = GOOD.replace("  max_steps: 10", "  max_steps: 10\n  warmup_steps: 2\n  warmup_ratio: 0.1")
    with pytest.raises(SpecError, match=r"Can't set both `train.warmup_steps` and `train.warmup_ratio`"):
        load_spec(write(tmp_path, text))


def test_method_needs_its_format(tmp_path):
    with pytest.raises(SpecError, match=r"`method.kind: causal_lm` reads `data.format` \['text'\]"):
        load_spec(write(tmp_path, GOOD.replace("kind: sft", "kind: causal_lm")))


def test_overrides_are_typed_and_named(tmp_path):
    p = write(tmp_path, GOOD)
    spec = load_spec(p, ["train.lr=3e-4", "scaling.num_workers=1", "data.packing=false", "train.micro_batch_size=4"])
    assert spec.train.lr == 3e-4 and spec.scaling.num_workers == 1 and spec.data.packing is False
    assert spec.grad_accum == 2
    with pytest.raises(SpecError, match=r"^--set train.lr: `train.lr`"):
        load_spec(p, ["train.lr=fast"])
    with pytest.raises(SpecError, match=r"--set train.bogus: unknown key `train.bogus`"):
        load_spec(p, ["train.bogus=1"])
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        parse_overrides(["train.lr"])


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(write(tmp_path, GOOD.replace("dir: /tmp/x", "dir: runs/x")))
    assert spec.output.dir == str(tmp_path / "runs" / "x")


# Sweep specs (jobs/sweep_*.yaml) are checked by the tune tests.
@pytest.mark.parametrize(
    "job", sorted(p for p in (ROOT / "jobs").glob("*.yaml") if not p.name.startswith("sweep_")), ids=lambda p: p.name
)
def test_shipped_jobs_validate(job):
    raw = yaml.safe_load(job.read_text())
    spec = spec_from_dict(raw, str(job))
    assert spec.output.dir


def test_schema_has_descriptions():
    from ftray.config import JobSpec

    schema = JobSpec.model_json_schema()
    lr = schema["$defs"]["TrainSpec"]["properties"]["lr"]
    assert "learning rate" in lr["description"].lower()


def test_placement_strategy_default_and_bad_value(tmp_path):
    assert load_spec(write(tmp_path, GOOD)).scaling.placement_strategy == "PACK"
    spread = GOOD.replace("  num_workers: 2\n", "  num_workers: 2\n  placement_strategy: STRICT_SPREAD\n")
    assert load_spec(write(tmp_path, spread)).scaling.placement_strategy == "STRICT_SPREAD"
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, spread.replace("STRICT_SPREAD", "SPREAD_OUT")))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'job.yaml'}:14: `scaling.placement_strategy`"), msg
    assert "'SPREAD_OUT'" in msg and "STRICT_SPREAD" in msg


@pytest.mark.parametrize(
    ("gpu", "fused_adam", "offload", "want"),
    [
        (False, False, False, {"torch_adam": True, "fused": True}),  # CPU: torch's fused AdamW (one pass)
        (True, False, False, {"torch_adam": True, "fused": True}),  # GPU: torch's fused kernel, no nvcc build
        (True, True, False, {}),  # GPU, asked for: DeepSpeed's FusedAdam (JIT-built)
        (False, False, True, {}),  # offloaded: DeepSpeed's CPU Adam
    ],
)
def test_the_optimizer_deepspeed_builds(gpu, fused_adam, offload, want):
    from ftray.train.ds_config import deepspeed_config

    d = yaml.safe_load(GOOD)
    d["scaling"]["use_gpu"] = gpu
    d["deepspeed"] = {"zero_stage": 2, "offload_optimizer": offload, "fused_adam": fused_adam}
    params = deepspeed_config(spec_from_dict(d), 2)["optimizer"]["params"]
    assert {k: params[k] for k in ("torch_adam", "fused") if k in params} == want


@pytest.mark.parametrize(("gpu", "zero", "want"), [(False, 2, False), (False, 1, False), (False, 0, None), (False, 3, None),
                                                   (True, 2, None)])
def test_gradients_are_averaged_by_one_all_reduce_on_gloo(gpu, zero, want):
    """ZeRO-1/2 on CPU (gloo): DeepSpeed's `reduce_scatter: false` (one all-reduce, gloo's fastest collective);
    on GPU (NCCL) and for the stages without that switch, DeepSpeed's default."""
    from ftray.train.ds_config import deepspeed_config

    d = yaml.safe_load(GOOD)
    d["scaling"]["use_gpu"] = gpu
    d["deepspeed"] = {"zero_stage": zero}
    assert deepspeed_config(spec_from_dict(d), 2)["zero_optimization"].get("reduce_scatter") is want
