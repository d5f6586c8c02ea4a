"""What a checkpoint of the loop holds, written and read on each rank: DeepSpeed's engine state (module,
optimizer, scheduler; tag `ds`), each rank's RNG states (Python, NumPy, torch CPU and, where the rank has used
CUDA, its device's), an adapter's own state (AdaLoRA's allocator), and on rank 0 `state.json` (the step, the
metrics history and the spec's training fields, which a resume is checked against) and the
method's state (ppo's KL coefficient), and last each rank's manifest (its files and their sizes: a truncated
or missing file makes the checkpoint unusable, `unusable`, and a resume takes the one before). The data order is
a function of (seed, sample index), so the step is the data position. No Ray: the session (Ray Train or
this process) decides where the folder goes."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ftray import storage

__all__ = ["Restored", "restore", "rng_state", "save", "saved_specs", "set_rng_state", "take_hyperparams", "unusable"]

STATE = "state.json"


def rng_state() -> dict:
    """This process's RNG states as JSON values. CUDA's (the current device's generator: dropout on a GPU draws
    from it) only where this process has initialised CUDA: a CPU job on a GPU machine must not create a
    context per worker to read a generator it never used."""
    s = {
        "python": random.getstate(),
        "numpy": [np.random.get_state()[0], np.random.get_state()[1].tolist(), *np.random.get_state()[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state().tolist()
    return s


def set_rng_state(s: dict) -> None:
    """Restore what `rng_state` returned. A state without CUDA's (an older checkpoint, a CPU rank) leaves CUDA's
    generator as seeded; CUDA's state on a process without CUDA is not restored (nothing draws from it)."""
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(s["cuda"], dtype=torch.uint8))


def saved_specs(run_dir: str) -> list[tuple[str, int, dict]]:
    """(checkpoint folder, step, training fields) of each checkpoint of the Train run `run_dir` (local or URL)
    that recorded its spec; checkpoints from before the record, or with no readable state, are left out."""
    out = []
    for name in storage.listdir(run_dir):
        path = storage.join(run_dir, name, STATE)
        if not name.startswith("checkpoint_") or not storage.exists(path):
            continue
        try:
            state = json.loads(storage.read_text(path))
        except (OSError, ValueError):
            continue
        if isinstance(state.get("spec"), dict):
            out.append((storage.join(run_dir, name), int(state.get("step", 0)), state["spec"]))
    return out


def _optimizer_steps(engine) -> int | None:
    """Optimizer steps the (restored) optimizer state has taken: shows that a resume restored it."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimizer
    for st in inner.state.values():
        if "step" in st:
            return int(st["step"])
    return None


def save(engine, folder, rank: int, step: int, history: list[dict], method_state: dict | None,
         spec_fields: dict | None = None, world: int = 1) -> None:
    """This rank's part of the checkpoint at `step` into `folder` (every rank calls it: ZeRO saves shards; each
    rank's folder holds its own files only). `spec_fields`: the job's `config.training_fields`, recorded in
    state.json."""
    from ftray.models.adapters import adapter_state

    engine.save_checkpoint(str(folder), tag="ds", exclude_frozen_parameters=True)
    Path(folder, f"rng_rank{rank}.json").write_text(json.dumps(rng_state()))
    extra = adapter_state(engine.module)
    if extra is not None:
        from safetensors.torch import save_file

        save_file(extra, str(Path(folder, f"adapter_state_rank{rank}.safetensors")))
    if rank == 0:
        state = {"step": step, "history": history, "world": world}
        if spec_fields is not None:
            state["spec"] = spec_fields
        Path(folder, STATE).write_text(json.dumps(state))
        if method_state is not None:  # the same on every rank (the method keeps it so)
            Path(folder, "method_state.json").write_text(json.dumps(method_state))
    files = {f.relative_to(folder).as_posix(): f.stat().st_size for f in sorted(Path(folder).rglob("*")) if f.is_file()}
    Path(folder, MANIFEST.format(rank=rank)).write_text(json.dumps(files))


MANIFEST = "manifest_rank{rank}.json"


def unusable(folder) -> str | None:
    """Why the checkpoint in local `folder` cannot be resumed from (None: every rank's manifest is there and
    every file it lists has its size). Checkpoints written before manifests are taken as they are."""
    folder = Path(folder)
    try:
        state = json.loads((folder / STATE).read_text())
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{STATE} unreadable ({type(e).__name__})"
    for rank in range(int(state.get("world", 0))):
        try:
            files = json.loads((folder / MANIFEST.format(rank=rank)).read_text())
        except (OSError, ValueError) as e:
            return f"rank {rank}'s manifest unreadable ({type(e).__name__}): the step-{step} checkpoint is not whole"
        for name, size in files.items():
            f = folder / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, not {size} (truncated)"
    return None


@dataclass
class Restored:
    step: int
    history: list[dict]
    method_state: dict | None  # for `method.load_state_dict`, once the method is set up
    optimizer_steps: int | None  # what the restored optimizer state had taken


def restore(engine, folder, rank: int, world: int = 1) -> Restored:
    """Load what `save` wrote into `engine` (and this process's RNGs); the step to go on from. A checkpoint
    saved by another number of ranks under ZeRO 1-3 (its optimizer state partitioned `world` ways) is
    converted to DeepSpeed's universal checkpoint first (`_load_resharded`); the data position holds (the
    step is the data position for any world size: `loop.sample_index`)."""
    from ftray.models.adapters import load_adapter_state

    state = json.loads(Path(folder, STATE).read_text())
    saved_world = int(state.get("world", world))
    if saved_world != world and engine.zero_optimization_stage() > 0:
        _load_resharded(engine, Path(folder, "ds"))
    else:
        engine.load_checkpoint(str(folder), tag="ds", load_module_strict=False)
    # Another world size: a rank the saving run did not have starts from rank 0's generators and adapter
    # state (dropout then draws differently from a run that had that rank all along: nothing else does).
    rng_file = Path(folder, f"rng_rank{rank}.json")
    if not rng_file.exists():
        rng_file = Path(folder, "rng_rank0.json")
    if rng_file.exists():
        set_rng_state(json.loads(rng_file.read_text()))
    adapter_file = Path(folder, f"adapter_state_rank{rank}.safetensors")
    if not adapter_file.exists():
        adapter_file = Path(folder, "adapter_state_rank0.safetensors")
    if adapter_file.exists():  # e.g. AdaLoRA's allocator: importance averages, rank pattern
        from safetensors.torch import load_file

        load_adapter_state(engine.module, load_file(str(adapter_file)))
    method_file = Path(folder, "method_state.json")
    method_state = json.loads(method_file.read_text()) if method_file.exists() else None
    return Restored(state["step"], state["history"], method_state, _optimizer_steps(engine))


def _load_resharded(engine, ds_folder: Path) -> None:
    """A ZeRO checkpoint partitioned for another number of ranks, into `engine`: DeepSpeed's own converter
    (`ds_to_universal`) writes each parameter's fp32 value and Adam moments whole, and the engine loads them
    with `checkpoint.load_universal` for its own partitioning. Each rank converts its own local copy (ranks on
    other nodes have no shared folder), in this process (the converter's process pool is for large models;
    here a pool would fork a Ray worker)."""
    import tempfile
    from argparse import Namespace
    from contextlib import redirect_stdout
    from io import StringIO

    from deepspeed.checkpoint.ds_to_universal import main as to_universal

    with tempfile.TemporaryDirectory(prefix="ftray-universal-") as tmp:
        args = Namespace(input_folder=str(ds_folder), output_folder=str(Path(tmp, "ds")), num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with redirect_stdout(StringIO()):  # its progress lines, one per parameter
            to_universal(args)
        # The engine reads the switch on each load: on for this one only (a later load is a plain one).
        engine._config.load_universal_checkpoint = True
        try:
            engine.load_checkpoint(tmp, tag="ds", load_module_strict=False)
        finally:
            engine._config.load_universal_checkpoint = False


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
