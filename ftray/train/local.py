"""One job in this process, without Ray: world size 1, gloo (or NCCL on a GPU), DeepSpeed on one rank.

The same checks, data shards, loop and run folder as `ftray train`; only the place differs. For tests of
a method's mechanics (seconds instead of Ray Train's start-up) and for a machine where Ray is not
installed (a GPU check: `ftray train JOB --in-process`). Distributed behaviour (ZeRO sharding across
ranks, restarts after a lost worker) needs `ftray train`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import asdict
from types import SimpleNamespace

from ftray.config import JobSpec, SpecError
from ftray.methods import get_method
from ftray.train.launch import check_job, hold_output, prepare_data, write_run_json
from ftray.train.loop import LocalSession, run_worker
from ftray.train.tracking import finish_run, start_run

__all__ = ["one_rank_environment", "run_local"]

_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE")


def _one_worker(spec: JobSpec, log) -> JobSpec:
    """The job on 1 worker: the same global batch, accumulated (1 x 2 micro-batches = 2 x 1)."""
    if spec.scaling.num_workers == 1:
        return spec
    log(
        f"[ftray] in-process: 1 worker instead of scaling.num_workers {spec.scaling.num_workers} "
        f"(the global batch {spec.train.global_batch_size} is accumulated)",
        flush=True,
    )
    d = spec.model_dump()
    d["scaling"]["num_workers"] = 1
    return JobSpec.model_validate(d)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_rank_environment():
    """The variables DeepSpeed reads for a process group of one (this process), set for the block only: a
    Ray cluster started later by this process passes its environment to its workers. The group itself is
    kept for the process's later runs (DeepSpeed caches its groups: a destroyed and re-created default
    group breaks the next `deepspeed.initialize`)."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1")
    if not dist.is_initialized():
        os.environ["MASTER_PORT"] = str(_free_port())
    elif dist.get_world_size() != 1:
        raise SpecError("in-process training runs one worker: this process is in a larger process group")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_local(spec: JobSpec, log=print, resume_from: str | None = None) -> dict:
    """Check, prepare, train and write the run folder in this process; returns run.json's record.

    `resume_from`: a checkpoint folder to start from when `output.dir` has no checkpoint of its own."""
    t0 = time.time()
    spec = _one_worker(spec, log)
    method = get_method(spec.method.kind)
    if method.reward_model(spec) is not None:  # whichever method scores through Serve
        raise SpecError("method.reward_model: a served reward model needs Ray Serve; run `ftray train` instead")
    plan = check_job(spec)
    with hold_output(spec, log):
        prepared, meta, t_prep = prepare_data(plan, method, log, use_ray=False)
        plan.tracking = start_run(spec)
        config = {"spec": spec.model_dump(), "resolved": asdict(plan.resolved), "prepared": prepared,
                  "resume_from": resume_from, "tracking": plan.tracking}
        session = LocalSession(spec.output.dir, spec.output.keep_checkpoints, resume_from)
        t1 = time.time()
        try:
            with one_rank_environment():
                final = run_worker(config, session)
        except BaseException:
            finish_run(plan.tracking, None, "FAILED")
            raise
        timings = {"prepare_s": t_prep, "fit_s": time.time() - t1, "total_s": time.time() - t0}
        record = write_run_json(plan, SimpleNamespace(metrics=final), meta, timings)
    b, a = record["eval"]["before"], record["eval"]["after"]
    for k in a:
        if k in b:
            log(f"[ftray] {k}: {b[k]:.4f} -> {a[k]:.4f}", flush=True)
    return record
