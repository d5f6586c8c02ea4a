"""What the tests share that is not a fixture: paths, job specs per method, the one-process step check.

Test modules import from here (and from the other `tests/_*.py` helpers), never from each other."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shm_buffers_since(t0: float) -> list[str]:
    """DeepSpeed's shared-memory allreduce buffers (this user's) created at or after `t0` that still have a name:
    a run makes none (`loop._skip_shm_allreduce_op`); DeepSpeed never unlinks one, so each would leave ~64 MiB of
    RAM per rank behind."""
    import os
    import time

    out = []
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"):
        try:
            if f.stat().st_mtime >= t0 - 1:
                out.append(f"{f.name} ({time.time() - f.stat().st_mtime:.0f} s old)")
        except FileNotFoundError:
            pass
    return out


def needs_shared(*parts: str) -> Path:
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs the shared datasets: {p} is absent")
    return p


def _override(d: dict, over: dict) -> dict:
    """`section__key=value` keyword arguments replace one field each (e.g. train__max_steps=4)."""
    for k, v in over.items():
        sec, key = k.split("__", 1)
        d.setdefault(sec, {})[key] = v
    return d


def job_dict(model: Path, train: Path, test: Path | None, out: Path, cache: Path, **over) -> dict:
    """A small SFT job spec as a dict (LoRA, ZeRO-2, 2 workers)."""
    d = {
        "model": {"path": str(model)},
        "data": {
            "train": str(train),
            "eval": str(test) if test else None,
            "format": "prompt_completion",
            "max_length": 64,
            "cache_dir": str(cache),
        },
        "method": {"kind": "sft"},
        "adapter": {"kind": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"lr": 1e-3, "max_steps": 6, "global_batch_size": 8, "micro_batch_size": 4, "log_every": 1},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
        "output": {"dir": str(out)},
    }
    return _override(d, over)


LORA_QV = {"kind": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
LORA_ALL = {"kind": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}

# Per method: data format, max_length, method fields, lr, global / micro batch, default adapter.
_METHODS: dict[str, tuple[str, int, dict, float, int, int, dict | None]] = {
    "classify": ("labels", 32, {}, 1e-3, 8, 4, None),
    "cluster": ("labels", 32, {}, 1e-3, 16, 8, None),
    "contrastive": ("pairs", 32, {}, 1e-3, 16, 8, None),
    "dpo": ("preference", 48, {}, 3e-3, 8, 4, LORA_QV),
    "grpo": ("prompt_completion", 32, {"group_size": 4, "max_new_tokens": 4}, 1e-3, 8, 4, LORA_ALL),
    "masked_lm": ("text", 32, {"mask_prob": 0.3}, 3e-3, 8, 4, None),
    "reward": ("preference", 48, {}, 3e-3, 8, 4, {"kind": "full"}),
    "sentence_order": ("text", 64, {"n_sentences": 3}, 3e-3, 8, 4, None),
    "seq2seq": ("translation", 32, {"max_new_tokens": 12}, 3e-3, 8, 4, None),
}


def method_spec(kind: str, model, train, test, out, adapter: dict | None = None, method: dict | None = None,
                **over) -> dict:
    """A 1-step job spec for `kind` on the tiny models and tasks of the tests (ZeRO-2, 1 worker unless
    overridden); `method` adds method fields, `over` replaces `section__key` fields."""
    fmt, max_length, fields, lr, gbs, mbs, default_adapter = _METHODS[kind]
    d = {
        "model": {"path": str(model)},
        "data": {"train": str(train), "eval": str(test) if test else None, "format": fmt, "max_length": max_length},
        "method": {"kind": kind, **fields, **(method or {})},
        "adapter": dict(adapter or default_adapter),
        "train": {"lr": lr, "max_steps": 1, "global_batch_size": gbs, "micro_batch_size": mbs},
        "output": {"dir": str(out)},
    }
    return _override(d, over)


def step_and_compare(method, spec, examples, pad_id, steps=2):
    """A few Adam steps on one process, no DeepSpeed: every trainable parameter moved, no frozen one did."""
    import torch

    from ftray.models.adapters import apply_adapter

    torch.manual_seed(0)
    model = apply_adapter(method.load_base(spec.model.path, torch.float32, spec), spec.adapter, task_type=method.task_type,
                          heads=method.trainable_heads(spec))
    model.eval()  # no dropout: a frozen parameter must stay exactly equal
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Adam: a step moves every parameter with a non-zero gradient by ~lr, however small the gradient.
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):  # LoRA B starts at zero: A moves only from the second step on
        loss, info = method.loss(model, method.collate(examples, pad_id))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert info["target_tokens"] > 0
    moved = {n: not torch.equal(before[n], p.detach()) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        assert moved[n] == p.requires_grad, (n, p.requires_grad, moved[n])
    return model


def run_ray(d: dict) -> dict:
    """The job through Ray Train (`ftray train`'s path); the session's Ray must be up."""
    from ftray.config import resolve_paths, spec_from_dict
    from ftray.train.launch import train

    return train(resolve_paths(spec_from_dict(d)))


def run_here(d: dict, **kw) -> dict:
    """The job through the same loop in this process (1 worker, DeepSpeed, no Ray)."""
    from ftray.config import resolve_paths, spec_from_dict
    from ftray.train.local import run_local

    return run_local(resolve_paths(spec_from_dict(d)), **kw)


# Where a method's job runs in the tests, as (ZeRO stage, on Ray). PLACES: ZeRO-2 in this process (the
# method's mechanics through the real loop and DeepSpeed) and ZeRO-3 on 2 Ray Train workers (parameters
# partitioned across ranks, gathered for eval and saving, metrics and the method's own collectives across
# ranks). ONE_RANK: both stages in this process, for methods whose cross-rank code another method's Ray
# run already covers.
PLACES = [
    pytest.param((2, False), id="in_process-zero2"),
    pytest.param((3, True), id="ray-zero3", marks=pytest.mark.integration),
]
ONE_RANK = [pytest.param((2, False), id="in_process-zero2"), pytest.param((3, False), id="in_process-zero3")]


def fit(d: dict, place: tuple[int, bool], request) -> dict:
    """Run `d` at `place` (ZeRO stage, on Ray): on Ray, 2 workers on the session's Ray."""
    zero, on_ray = place
    d = _override(d, {"deepspeed__zero_stage": zero})
    if on_ray:
        request.getfixturevalue("ray_local")
        return run_ray(_override(d, {"scaling__num_workers": 2}))
    return run_here(d)


def perturb_checkpoint(src: Path, dst: Path, scale: float = 0.05) -> Path:
    """A copy of a loop checkpoint whose DeepSpeed optimizer state (fp32 master weights, Adam moments) is
    moved by seeded noise: a run that really resumes from it ends elsewhere."""
    import shutil

    import torch

    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(0)

    def shake(x):  # x (1 + scale u), u ~ U[0, 1): Adam's second moments stay positive
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
            return x * (1 + scale * torch.rand(x.shape, generator=gen, dtype=x.dtype))
        if isinstance(x, dict):
            return {k: shake(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return type(x)(shake(v) for v in x)
        return x

    files = sorted(Path(dst).rglob("*optim_states.pt"))
    assert files, f"no optimizer state in {dst}"
    for f in files:
        torch.save(shake(torch.load(f, map_location="cpu", weights_only=False)), f)
    # Saved as the loop would have saved these values: each rank's manifest lists the rewritten files' sizes
    # (else the resume takes the copy for a truncated checkpoint and refuses it).
    for m in Path(dst).glob("manifest_rank*.json"):
        listed = json.loads(m.read_text())
        m.write_text(json.dumps({name: (Path(dst, name).stat().st_size if Path(dst, name) in files else size)
                                 for name, size in listed.items()}))
    return Path(dst)


def assert_no_credentials_in_runtime_envs() -> None:
    """No actor of the session's Ray (dead ones included) carries a static AWS key in its runtime_env, the
    part of an actor the dashboard and `ray list actors --detail` show; the S3 endpoint does (so the check
    sees runtime envs at all)."""
    import os

    from ray.util.state import list_actors

    envs = [a.serialized_runtime_env or "" for a in list_actors(detail=True, limit=10_000, raise_on_missing_output=False)]
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") and any("AWS_ENDPOINT_URL" in e for e in envs), envs[:3]
    leaked = [e for e in envs if "AWS_SECRET_ACCESS_KEY" in e or "AWS_ACCESS_KEY_ID" in e]
    assert not leaked, f"static keys in {len(leaked)} runtime_env(s): {leaked[0][:300]}"
