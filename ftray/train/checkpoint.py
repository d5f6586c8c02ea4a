"""What a checkpoint of the loop holds, written and read on each rank: DeepSpeed's engine state (module,
optimizer, scheduler; tag `ds`), each rank's RNG state, an adapter's own state (AdaLoRA's allocator), and
on rank 0 the step, the metrics history and the method's state (ppo's KL coefficient). The data order is
a function of (seed, sample index), so the step is the data position. No Ray: the session (Ray Train or
this process) decides where the folder goes."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Restored", "restore", "save", "take_hyperparams"]


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": [np.random.get_state()[0], np.random.get_state()[1].tolist(), *np.random.get_state()[2:]],
        "torch": torch.get_rng_state().tolist(),
    }


def _set_rng_state(s: dict) -> None:
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))


def _optimizer_steps(engine) -> int | None:
    """Optimizer steps the (restored) optimizer state has taken: shows that a resume restored it."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimizer
    for st in inner.state.values():
        if "step" in st:
            return int(st["step"])
    return None


def save(engine, folder, rank: int, step: int, history: list[dict], method_state: dict | None) -> None:
    """This rank's part of the checkpoint at `step` into `folder` (every rank calls it: ZeRO saves shards)."""
    from ftray.models.adapters import adapter_state

    engine.save_checkpoint(str(folder), tag="ds", exclude_frozen_parameters=True)
    Path(folder, f"rng_rank{rank}.json").write_text(json.dumps(_rng_state()))
    extra = adapter_state(engine.module)
    if extra is not None:
        from safetensors.torch import save_file

        save_file(extra, str(Path(folder, f"adapter_state_rank{rank}.safetensors")))
    if rank == 0:
        Path(folder, "state.json").write_text(json.dumps({"step": step, "history": history}))
        if method_state is not None:  # the same on every rank (the method keeps it so)
            Path(folder, "method_state.json").write_text(json.dumps(method_state))


@dataclass
class Restored:
    step: int
    history: list[dict]
    method_state: dict | None  # for `method.load_state_dict`, once the method is set up
    optimizer_steps: int | None  # what the restored optimizer state had taken


def restore(engine, folder, rank: int) -> Restored:
    """Load what `save` wrote into `engine` (and this process's RNGs); the step to go on from."""
    from ftray.models.adapters import load_adapter_state

    engine.load_checkpoint(str(folder), tag="ds", load_module_strict=False)
    state = json.loads(Path(folder, "state.json").read_text())
    rng_file = Path(folder, f"rng_rank{rank}.json")
    if rng_file.exists():
        _set_rng_state(json.loads(rng_file.read_text()))
    adapter_file = Path(folder, f"adapter_state_rank{rank}.safetensors")
    if adapter_file.exists():  # e.g. AdaLoRA's allocator: importance averages, rank pattern
        from safetensors.torch import load_file

        load_adapter_state(engine.module, load_file(str(adapter_file)))
    method_file = Path(folder, "method_state.json")
    method_state = json.loads(method_file.read_text()) if method_file.exists() else None
    return Restored(state["step"], state["history"], method_state, _optimizer_steps(engine))


def take_hyperparams(scheduler, groups: list[dict], spec, schedule) -> None:
    """A checkpoint restores the optimizer's and scheduler's hyperparameters; the job's win. Same job:
    the same values (exact resume is unchanged). A PBT trial continuing another trial's checkpoint with a
    perturbed `train.lr` / `train.weight_decay`: the new values, on the restored step's schedule."""
    scheduler.base_lrs = [spec.train.lr] * len(scheduler.base_lrs)
    factor = schedule(scheduler.last_epoch)
    for g, mine in zip(scheduler.optimizer.param_groups, groups, strict=True):
        g["initial_lr"] = spec.train.lr
        g["lr"] = spec.train.lr * factor
        g["weight_decay"] = mine.get("weight_decay", spec.train.weight_decay)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
