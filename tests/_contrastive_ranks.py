"""contrastive's loss on several gloo ranks in spawned processes (no Ray, no DeepSpeed): what each rank's
loss and gradients add up to, for tests/test_methods_contrastive.py. A module of its own so that the spawned
children import only this."""

from __future__ import annotations

import os
from pathlib import Path


def loss_and_grads(model_dir: str, spec_dict: dict, rows: list[dict]) -> tuple:
    """contrastive's loss on `rows` (one batch) and the gradient of every parameter, on the tiny encoder in
    eval mode (no dropout: every process computes the same function)."""
    import torch

    from ftray.config import spec_from_dict
    from ftray.data.rows import check_row
    from ftray.methods import get_method
    from ftray.models.load import load_tokenizer

    m = get_method("contrastive")
    spec = spec_from_dict(spec_dict)
    tok = load_tokenizer(model_dir)
    model = m.load_base(model_dir, torch.float32, spec).eval()
    examples = [e for r in rows for e in m.examples(check_row(r, "pairs"), tok, spec)]
    loss, info = m.loss(model, m.collate(examples, tok.pad_token_id))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), info["target_tokens"], grads


def rank_main(rank: int, world: int, port: int, model_dir: str, cases: list[tuple[dict, list[list[dict]]]],
              out: str) -> None:
    """One rank, for each case (spec, one shard of rows per rank): its shard's loss and gradients, then what
    the training loop and DeepSpeed make of all ranks' (the gradients averaged over the ranks, the step
    loss the mean of the ranks' losses, the held-out loss their mean weighted by anchors). Rank 0 writes
    them to `out` (safetensors), keys prefixed by the case's index."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        parts = {}
        for i, (spec_dict, shards) in enumerate(cases):
            loss, n, grads = loss_and_grads(model_dir, spec_dict, shards[rank])
            names = sorted(grads)
            flat = torch.cat([grads[k].flatten() for k in names])
            dist.all_reduce(flat)
            flat /= world  # DeepSpeed's data-parallel average
            sums = torch.tensor([float(loss), float(loss) * n, n], dtype=torch.float64)
            dist.all_reduce(sums)
            at = 0
            for k in names:
                parts[f"{i}.grad.{k}"] = flat[at : at + grads[k].numel()].view_as(grads[k]).contiguous()
                at += grads[k].numel()
            parts[f"{i}.step_loss"] = (sums[0] / world).reshape(1)
            parts[f"{i}.weighted_loss"] = (sums[1] / sums[2]).reshape(1)
        if rank == 0:
            save_file(parts, str(Path(out)))
    finally:
        dist.destroy_process_group()


def run_ranks(model_dir, cases: list[tuple[dict, list[list[dict]]]], world: int, out: Path, port: int) -> dict:
    """`rank_main` on `world` spawned processes (one gloo group for all cases); rank 0's figures."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    mp.start_processes(rank_main, args=(world, port, str(model_dir), cases, str(out)), nprocs=world,
                       start_method="spawn", join=True)
    return load_file(str(out))


def loop_rank_main(rank: int, world: int, port: int, config: dict, folder: str) -> None:
    """One rank of the real training loop (`run_worker`: DeepSpeed over gloo), in a process group spawned
    here instead of by Ray Train; each rank keeps its checkpoints in a folder of its own."""
    import torch

    from ftray.train.loop import LocalSession, run_worker

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    session = LocalSession(str(Path(folder) / f"rank{rank}"), None)
    session.rank, session.world = rank, world
    run_worker(config, session)


def run_loop_ranks(spec, world: int, folder: Path, port: int) -> None:
    """`spec` (num_workers = world) checked and prepared here, then trained by `world` spawned ranks."""
    from dataclasses import asdict

    import torch.multiprocessing as mp

    from ftray.methods import get_method
    from ftray.train.launch import check_job, prepare_data

    plan = check_job(spec)
    prepared, _, _ = prepare_data(plan, get_method(spec.method.kind), lambda *a, **k: None, use_ray=False)
    config = {"spec": spec.model_dump(), "resolved": asdict(plan.resolved), "prepared": prepared, "resume_from": None,
              "tracking": None}
    mp.start_processes(loop_rank_main, args=(world, port, config, str(folder)), nprocs=world, start_method="spawn",
                       join=True)
