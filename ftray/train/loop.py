"""The one training loop: every method, every adapter, over a DeepSpeed engine.

It knows the Method protocol and nothing about any one method. Where it runs is a `Session`: a Ray
Train worker (`train_fn_per_worker`, what `ftray train` and Tune run) or this process alone
(`LocalSession`, world size 1, gloo, no Ray: `ftray.train.local.run_local`). The loop body is the same.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ftray import storage
from ftray.config import JobSpec, training_fields
from ftray.data.encode import ensure_chat_template
from ftray.data.prepare import load_split
from ftray.methods import EvalContext, get_method
from ftray.models.adapters import (
    adapter_loss,
    adapter_report,
    after_optimizer_step,
    apply_adapter,
    before_optimizer_step,
    enable_gradient_checkpointing,
    trainable_summary,
)
from ftray.models.load import Resolved, load_tokenizer
from ftray.train import checkpoint, outputs
from ftray.train.ds_config import deepspeed_config, resolve_precision
from ftray.train.held_out import evaluate_held_out
from ftray.train.live import Live
from ftray.train.publish import Publisher

__all__ = ["LocalSession", "RayTrainSession", "combine_step_info", "lr_lambda", "run_worker", "sample_index", "step_line",
           "step_record", "total_steps", "train_fn_per_worker", "build_engine", "train_step"]


def total_steps(spec: JobSpec, n_train: int) -> int:
    if spec.train.max_steps is not None:
        return spec.train.max_steps
    return max(1, math.ceil(spec.train.epochs * n_train / spec.train.global_batch_size))


def lr_lambda(spec: JobSpec, steps: int):
    t = spec.train
    warm = t.warmup_steps if t.warmup_steps is not None else int(round((t.warmup_ratio or 0.0) * steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if t.lr_schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, steps - warm))
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if t.lr_schedule == "cosine" else 1 - frac
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay

    return f


class _Order:
    """The data order: an endless stream of seeded permutations, one per epoch. A sample's place
    in it depends only on (seed, global sample index), so resume and world-size changes are exact.

    With `lengths` (`train.group_by_length`), each window of `window` optimizer steps (`batch` rows each)
    of that stream is sorted by length, cut into its steps' batches and the batches shuffled (seeded): a
    micro-batch then holds rows of about one length and is padded to its longest, not to `max_length`
    (transformers' `group_by_length` does the same over 50 batches). Still a function of (seed, position)."""

    def __init__(self, n: int, seed: int, lengths: list[int] | None = None, batch: int = 1, window: int = 8):
        self.n, self.seed, self._perms = n, seed, {}
        self.lengths, self.span, self.batch = lengths, batch * window, batch
        self._window: tuple[int, list[int]] = (-1, [])

    def _stream(self, g: int) -> int:
        epoch, i = divmod(g, self.n)
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen).tolist()}
        return self._perms[epoch][i]

    def __call__(self, g: int) -> int:
        if self.lengths is None:
            return self._stream(g)
        w, i = divmod(g, self.span)
        if self._window[0] != w:
            rows = sorted((self._stream(p) for p in range(w * self.span, (w + 1) * self.span)),
                          key=lambda r: -self.lengths[r])
            batches = [rows[k : k + self.batch] for k in range(0, self.span, self.batch)]
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * (w + 1))
            self._window = (w, [r for b in torch.randperm(len(batches), generator=gen).tolist() for r in batches[b]])
        return self._window[1][i]


def sample_index(step: int, micro: int, rank: int, j: int, world: int, micro_bs: int, global_bs: int) -> int:
    """Global stream position of the j-th row of micro-batch `micro` of `rank` at optimizer step `step`.
    1 worker x 2 micro-batches reads the same rows, in the same order, as 2 workers x 1."""
    return step * global_bs + (micro * world + rank) * micro_bs + j


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def combine_step_info(parts: list[dict[str, float]], world: int = 1,
                      all_reduce: Callable[[torch.Tensor, str], None] | None = None) -> dict[str, float]:
    """A step's extra loss info (beyond `target_tokens`) over its micro-batches, then over the ranks:
    `*_min` the least, `*_max` the most, `*_s` (seconds) summed over micro-batches, the rest the mean.
    `all_reduce(tensor, op)`: in place over the ranks, op "min" / "max" / "sum"; None on one rank."""
    keys = sorted({k for p in parts for k in p if k != "target_tokens"})
    out = {}
    for k in keys:
        vals = [float(p[k]) for p in parts if k in p]
        out[k] = min(vals) if k.endswith("_min") else max(vals) if k.endswith("_max") else (
            sum(vals) if k.endswith("_s") else sum(vals) / len(vals))
    if all_reduce is None or not keys:
        return out
    lo = torch.tensor([out[k] if k.endswith("_min") else 0.0 for k in keys], dtype=torch.float64)
    hi = torch.tensor([out[k] if k.endswith("_max") else 0.0 for k in keys], dtype=torch.float64)
    mean = torch.tensor([0.0 if k.endswith(("_min", "_max")) else out[k] / world for k in keys], dtype=torch.float64)
    all_reduce(lo, "min")
    all_reduce(hi, "max")
    all_reduce(mean, "sum")
    return {
        k: (lo[j] if k.endswith("_min") else hi[j] if k.endswith("_max") else mean[j]).item()
        for j, k in enumerate(keys)
    }


def step_record(step: int, loss: float, lr: float, tokens: float, step_time: float, info: dict[str, float]) -> dict:
    """One line of metrics.jsonl: the step's loss, lr, trained tokens and time, each `info` key as
    `train/<key>`, and a seconds key (`*_s`) also as its share of the step (`train/<name>_share`)."""
    rec = {"step": step, "loss": loss, "lr": lr, "tokens": tokens, "step_time": step_time}
    for k, v in info.items():
        rec[f"train/{k}"] = v
        if k.endswith("_s"):
            rec[f"train/{k[:-2]}_share"] = v / max(step_time, 1e-9)
    return rec


def step_line(rec: dict, steps: int, tokens_per_s: float, eta_s: float) -> str:
    """The console line of a logged step (rank 0; what `ray job logs` shows)."""
    extra = "".join(f" {k} {v:.4g}" for k, v in rec.items() if k.startswith(("eval/", "train/")))
    return (f"[ftray] step {rec['step']}/{steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
            f"tok/s {tokens_per_s:,.0f} eta {_fmt_eta(eta_s)}{extra}")


def build_engine(method, spec: JobSpec, resolved: Resolved, dtype, steps: int, world: int, precision: str, schedule):
    """The method's base with its adapter (and trainable heads), wrapped by `deepspeed.initialize` with
    AdamW (no weight decay on biases and norms) and the LR schedule. Returns (engine, scheduler, the
    parameter groups, the trainable-parameter summary)."""
    import deepspeed

    model = method.load_base(resolved.base, dtype, spec)
    model = apply_adapter(
        model, spec.adapter, task_type=method.task_type, resume_from=resolved.adapter,
        total_steps=steps, tokenizer_path=resolved.tokenizer, heads=method.trainable_heads(spec),
    )
    if spec.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    summary = trainable_summary(model)
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim < 2 or "norm" in n.lower())]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not (p.ndim < 2 or "norm" in n.lower())]
    groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        config=deepspeed_config(spec, world, precision),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    return engine, scheduler, groups, summary


def train_step(engine, method, step: int, micro_batches: list[list[dict]], pad_id: int, device) -> tuple[float, int, list[dict]]:
    """One optimizer step over its micro-batches (the engine accumulates them): `prepare` (e.g. grpo's
    rollout) → `loss` → backward → step. Returns this rank's mean loss, its trained tokens (every token of
    a real example, prompt included, padding excluded) and each micro-batch's loss info."""
    loss_acc, n_real, infos = 0.0, 0, []
    for examples in micro_batches:
        batch = {k: v.to(device) for k, v in method.collate(examples, pad_id).items()}
        loss, info = method.loss(engine, method.prepare(engine, batch))
        reg = adapter_loss(engine.module)  # e.g. AdaLoRA's orthogonal regulariser; not in the logged loss
        if reg is not None:
            info = {**info, "adapter_reg": float(reg.detach())}
        engine.backward(loss if reg is None else loss + reg)
        # DeepSpeed steps the optimizer only at the accumulation boundary; adapters that act per
        # optimizer step (AdaLoRA's rank allocator) act there, between backward and step.
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary:
            before_optimizer_step(engine.module, step)
        engine.step()
        if boundary:
            after_optimizer_step(engine.module, step)
        loss_acc += float(loss.detach()) / len(micro_batches)
        infos.append(info)
        n_real += sum(e["tokens"] for e in examples)
    return loss_acc, n_real, infos


def _row(split: dict, i: int) -> dict:
    return {k: (v[i] if v is not None else None) for k, v in split.items()}


CKPT_PREFIX = "ftray-ckpt-"


def sweep_orphan_checkpoints(root: str | None = None) -> list[str]:
    """Remove the temporary checkpoint folders (`ftray-ckpt-r<rank>-p<pid>-*`) of worker processes that are gone:
    Ray deletes a folder once uploaded, but a worker killed between writing and uploading (a lost node, an OOM
    kill, a killed job) leaves it, a whole checkpoint each time, until the disk fills. A live process's folders
    (its pid answers signal 0) are never touched. Returns what was removed."""
    gone = []
    base = Path(root or tempfile.gettempdir())
    for d in base.glob(f"{CKPT_PREFIX}r*-p*-*"):
        pid = d.name[len(CKPT_PREFIX):].split("-")[1][1:]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (ours or another user's: PermissionError below)
        except ProcessLookupError:
            pass
        except (PermissionError, OSError):
            continue
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            gone.append(str(d))
    return gone


def checkpoint_tmpdir(rank: int, root: str | None = None) -> Path:
    """A new temporary folder for one checkpoint of `rank`, named with this process's pid."""
    return Path(tempfile.mkdtemp(prefix=f"{CKPT_PREFIX}r{rank}-p{os.getpid()}-", dir=root))


def wait_for_upload(folder: Path | None, timeout_s: float = 120.0, poll_s: float = 0.05) -> float:
    """Wait until the checkpoint folder handed to the background upload is gone (Ray Train deletes it once
    uploaded), at most `timeout_s` (an upload that failed leaves it; Ray raises that at the next report).
    Seconds waited. At most one checkpoint per worker is then uploading: on a machine whose uploads cannot keep
    up with `train.checkpoint_every`, a queue of them would grow behind the steps and a failure would resume
    from a checkpoint many steps old (the chaos benchmark once redid 96 steps after a kill). Not Ray's
    `ray.train.get_all_reported_checkpoints(CheckpointConsistencyMode.COMMITTED)`: that waits for the controller
    to register every report so far, eval-only ones too (up to a poll, 2 s on a cluster, at every checkpoint even
    when the upload is long done), and `run_local`'s session has no controller; the folder is the same signal in
    both, uploaded or stored."""
    t0 = time.monotonic()
    while folder is not None and folder.exists() and time.monotonic() - t0 < timeout_s:
        time.sleep(poll_s)
    return time.monotonic() - t0


def _checkpoint_and_report(session, engine, rank: int, step: int, history: list[dict], method, metrics: dict,
                           spec_fields: dict, background: bool = False) -> Path:
    """A checkpoint written on every rank into a temporary folder (named with this process's pid, so that a
    later worker on the node removes it if this one dies before it is stored: `sweep_orphan_checkpoints`),
    handed to the session with `metrics`; the session removes the folder once it is stored (`background`:
    stored while the next steps train)."""
    tmp = checkpoint_tmpdir(rank)
    try:
        checkpoint.save(engine, tmp, rank, step, history, method.state_dict(), spec_fields, world=session.world)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    session.report(metrics, str(tmp), background=background)
    return tmp


class RayTrainSession:
    """The loop inside a Ray Train worker: rank and world from Train's context, checkpoints through
    `ray.train.report` (Train's storage, `num_to_keep`, restart after a failure)."""

    def __init__(self, resume_from: str | None = None):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self._resume_from = resume_from

    def checkpoints(self):
        """(where, a context manager yielding it as a local folder) for each checkpoint to resume from, best
        first: this run's latest (after a worker-group restart or a rerun), then its earlier ones still kept
        (for a latest that is unusable), else `resume_from` (another run's: a PBT exploit, a sweep resumed)."""
        import pyarrow.fs as pafs
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            if self._resume_from:
                fs, path = storage.pyarrow_filesystem(self._resume_from)
                yield self._resume_from, ray.train.Checkpoint(path=path, filesystem=fs).as_directory
            return
        yield ckpt.path, ckpt.as_directory
        parent, latest = ckpt.path.rstrip("/").rsplit("/", 1)
        try:
            infos = ckpt.filesystem.get_file_info(pafs.FileSelector(parent))
        except OSError:
            return
        # Ray Train names them checkpoint_<date>_<time>: newest last in name order.
        older = sorted((i.path for i in infos if i.type == pafs.FileType.Directory and
                        i.base_name.startswith("checkpoint_") and i.base_name < latest), reverse=True)
        for path in older:
            yield path, ray.train.Checkpoint(path=path, filesystem=ckpt.filesystem).as_directory

    def report(self, metrics: dict, checkpoint_dir: str | None = None, background: bool = False) -> None:
        """`background`: Ray Train's asynchronous upload (one thread per worker, reports kept in order; the
        training thread goes on at once); else the upload and the report finish before this returns. Ray
        deletes `checkpoint_dir` once it is uploaded."""
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        mode = ray.train.CheckpointUploadMode.ASYNC if background else ray.train.CheckpointUploadMode.SYNC
        try:
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_upload_mode=mode,
                             delete_local_checkpoint_after_upload=ckpt is not None)
        except BaseException:
            if checkpoint_dir:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
            raise

    def where(self) -> dict:
        """This rank's node, for run.json: with SPREAD placement the ranks should name different nodes."""
        import socket

        import ray

        ctx = ray.get_runtime_context()
        node_id = ctx.get_node_id()
        # The address the node registered with (`ray start --node-ip-address`), not this host's default IP.
        ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), None)
        return {
            "node_id": node_id,
            "node_ip": ip or ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "labels": {k: v for k, v in ctx.get_node_labels().items() if k != "ray.io/node-id"},
        }


@contextlib.contextmanager
def _local_dir(src: str):
    with storage.local_copy(src) as d:
        yield str(d)


class LocalSession:
    """The loop in this process alone (world size 1, no Ray). Checkpoints go where a Ray Train run puts
    them (`<output.dir>/checkpoints/checkpoint_<step>`, each published whole), the newest
    `output.keep_checkpoints` are kept, and a rerun on the same folder resumes from the newest."""

    rank, world = 0, 1

    def __init__(self, output_dir: str, keep: int | None, resume_from: str | None = None):
        self.root = storage.join(output_dir, "checkpoints")
        self.keep, self._resume_from = keep, resume_from
        self.last_metrics: dict = {}

    def _complete(self) -> list[tuple[int, str]]:
        if not storage.isdir(self.root):
            return []
        out = []
        for name in storage.listdir(self.root):
            step = name.removeprefix("checkpoint_local_")
            path = storage.join(self.root, name)
            if step.isdigit() and storage.exists(storage.join(path, "state.json")) and storage.is_complete(path):
                out.append((int(step), path))
        return sorted(out)

    def checkpoints(self):
        """As `RayTrainSession.checkpoints`: this folder's complete checkpoints newest first, else `resume_from`."""
        done = [path for _, path in reversed(self._complete())] or ([self._resume_from] if self._resume_from else [])
        for src in done:
            yield src, lambda src=src: _local_dir(src)

    def report(self, metrics: dict, checkpoint_dir: str | None = None, background: bool = False) -> None:
        """Stores the checkpoint before returning (`background` is Ray Train's; here is one process)."""
        self.last_metrics = metrics
        if checkpoint_dir is None:
            return
        try:
            storage.publish_dir(checkpoint_dir, storage.join(self.root, f"checkpoint_local_{int(metrics['step']):06d}"))
        finally:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        done = self._complete()
        for _, path in done[: max(0, len(done) - self.keep)] if self.keep else []:
            fs, p = storage.filesystem(path)
            fs.rm(p, recursive=True)

    def where(self) -> dict:
        import socket

        return {"node_id": "local", "node_ip": "127.0.0.1", "hostname": socket.gethostname(), "labels": {}}


def _peak_memory_mb(device: torch.device) -> float:
    """This rank's peak memory: allocated GPU memory, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _clear_stale_build_locks(max_age_s: float = 600.0) -> None:
    """DeepSpeed JIT-builds its CPU ops under a lock file (torch's FileBaton); a build killed midway leaves
    the lock behind and every later worker waits on it forever. A lock older than `max_age_s` beside an
    already built library is such a leftover: remove it."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    for lock in root.glob("*/*/lock"):
        try:
            if any(lock.parent.glob("*.so")) and time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink(missing_ok=True)
        except OSError:
            pass


def _skip_shm_allreduce_op() -> None:
    """DeepSpeed's CPU backend JIT-builds its shared-memory all-reduce op (`deepspeed_shm_comm`: a C++ compile of
    30-60 s in the first job on a machine, again after each change of venv or `ninja`, and a compiler on every
    node) and maps a 64 MiB /dev/shm buffer per rank, for `inference_all_reduce` alone (DeepSpeed's
    tensor-parallel inference, `module_inject`). ZeRO training's collectives go through torch.distributed
    (gloo) whether it is built or not. Marked incompatible (the dict DeepSpeed probes once and keeps,
    `deepspeed/ops/__init__.py`), it is neither built nor mapped (DeepSpeed never unlinked that buffer: RAM
    left in tmpfs by every in-process run)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def train_fn_per_worker(config: dict) -> None:
    """What each Ray Train worker runs (TorchTrainer has set up torch.distributed)."""
    run_worker(config, RayTrainSession(config.get("resume_from")))


def run_worker(config: dict, session) -> dict:
    """The loop on one rank. `config`: {"spec", "resolved", "prepared", "resume_from", "tracking"}; `session`: where
    it runs (`RayTrainSession` or `LocalSession`). Returns the final metrics (also reported)."""
    rank, world = session.rank, session.world
    spec = JobSpec.model_validate(config["spec"])
    if not spec.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    storage.configure(spec.storage.endpoint_url, spec.storage.region)
    _clear_stale_build_locks()
    orphans = sweep_orphan_checkpoints()
    if not spec.scaling.use_gpu:
        _skip_shm_allreduce_op()
    deepspeed.init_distributed(dist_backend="nccl" if spec.scaling.use_gpu else "gloo")
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if spec.scaling.use_gpu else torch.device("cpu")
    # Ray Train patches print() to tee into its logger, which shows every line twice; the
    # process's real stdout is what `ray job logs` and the driver console stream.
    log = (lambda *a, **k: print(*a, **{**k, "file": sys.__stdout__})) if rank == 0 else (lambda *a, **k: None)
    if orphans:
        print(f"[ftray] rank {rank}: removed {len(orphans)} checkpoint folder(s) left by workers that died before "
              f"storing them ({', '.join(orphans[:3])}{', ...' if len(orphans) > 3 else ''})", file=sys.__stdout__, flush=True)

    method = get_method(spec.method.kind)
    resolved = Resolved(**config["resolved"])
    prepared = config["prepared"]
    precision = resolve_precision(
        spec, torch.cuda.is_available(), torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    tok = load_tokenizer(resolved.tokenizer, spec.model.trust_remote_code)
    ensure_chat_template(tok)
    pad_id = tok.pad_token_id

    train_split = load_split(prepared, "train")
    n_train = len(train_split["input_ids"])
    eval_split = load_split(prepared, "eval") if spec.data.eval else None
    eval_rows = (
        [json.loads(x) for x in storage.read_text(storage.join(prepared, "eval_rows.jsonl")).split("\n") if x.strip()]
        if spec.data.eval
        else []
    )
    steps = total_steps(spec, n_train)
    grouped = spec.train.group_by_length and method.group_by_length
    order = _Order(n_train, spec.train.seed, train_split["tokens"] if grouped else None, spec.train.global_batch_size)
    fields = training_fields(spec)  # recorded in every checkpoint: a later run on the folder is checked against it

    # Same seed on every rank: identical init of new weights (heads, adapters) everywhere.
    torch.manual_seed(spec.train.seed)
    random.seed(spec.train.seed)
    np.random.seed(spec.train.seed % 2**32)
    schedule = lr_lambda(spec, steps)
    engine, scheduler, groups, summary = build_engine(method, spec, resolved, dtype, steps, world, precision, schedule)
    log(
        f"[ftray] {spec.method.kind} + {spec.adapter.kind}: {summary['trainable_params']:,} trainable of "
        f"{summary['total_params']:,} parameters ({summary['trainable_pct']:.3f}%), {world} workers, "
        f"ZeRO-{spec.deepspeed.zero_stage}, {precision}, grad accum {spec.grad_accum}",
        flush=True,
    )
    accum = engine.gradient_accumulation_steps()
    mb = spec.train.micro_batch_size
    # `output.publish_to`: the adapter after each checkpoint and at the end, for an endpoint serving that folder.
    publisher = Publisher(spec, resolved.base, steps, rank, log) if spec.output.publish_to else None

    # ---------------------------------------------------------------- resume
    start_step, history, method_state, resumed_opt_steps = 0, [], None, None
    refused: list[str] = []
    for where, opened in session.checkpoints():
        with opened() as d:
            why = checkpoint.unusable(d)
            if why is None:
                try:
                    restored = checkpoint.restore(engine, d, rank, world)
                except Exception as e:  # a corrupt file of the right size: the next one back is loaded over it
                    why = f"{type(e).__name__}: {str(e)[:200]}"
        if world > 1:  # every rank resumes from the same one
            ok = torch.tensor([0.0 if why else 1.0], device=device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            why = why or (None if ok.item() else "another rank could not load it")
        if why is None:
            start_step, history, method_state = restored.step, restored.history, restored.method_state
            checkpoint.take_hyperparams(scheduler, groups, spec, schedule)
            resumed_opt_steps = restored.optimizer_steps
            after = f" (not from {', '.join(refused)})" if refused else ""
            log(f"[ftray] resumed from checkpoint at step {start_step}/{steps}{after}", flush=True)
            break
        refused.append(where)
        log(f"[ftray] checkpoint {where} cannot be resumed from: {why}; trying the one before", flush=True)
    else:
        if refused:
            raise RuntimeError(f"no usable checkpoint to resume from (tried {', '.join(refused)}): move them aside "
                               "to train from the start")

    def all_sum(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def all_reduce(t: torch.Tensor, op: str) -> None:
        moved = t.to(device)
        dist.all_reduce(moved, op={"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op])
        t.copy_(moved.cpu())

    ectx = EvalContext(synced_gpus=spec.deepspeed.zero_stage == 3 and world > 1, device=str(device))
    eval_examples = [_row(eval_split, i) for i in range(len(eval_split["input_ids"]))] if eval_split else []

    def evaluate() -> dict[str, float]:
        if eval_split is None:
            return {}
        return evaluate_held_out(method, engine, eval_examples, eval_rows, tok, spec, ectx, micro_batch=mb,
                                 rank=rank, world=world, all_sum=all_sum)

    # Per-worker state a method needs beside the batch (e.g. grpo's sampler); a no-op for most methods. The
    # served reward model's scorer is built here, so that no method reaches Ray Serve itself.
    rm = method.reward_model(spec)
    scorer = None
    if rm is not None:
        from ftray.rlhf.served import ServedReward

        scorer = ServedReward(rm.app, rm.scorer, rm.timeout_s)
    method.setup(spec, tok, EvalContext(synced_gpus=ectx.synced_gpus, device=ectx.device, reward_model=scorer))
    if method_state is not None:
        method.load_state_dict(method_state)
        log(f"[ftray] {spec.method.kind} state restored: {json.dumps(method_state)}", flush=True)

    # ---------------------------------------------------------------- train
    tb = Live(spec.output.dir, start_step, config.get("tracking")) if rank == 0 else None
    if start_step == 0:
        before = evaluate()
        if before:
            history.append({"step": 0, **{f"eval/{k}": v for k, v in before.items()}})
            if tb:
                tb.add(history[-1], flush=True)
            log(f"[ftray] eval before training: {json.dumps(before)}", flush=True)
    else:
        before = next((h for h in history if h["step"] == 0 and any(k.startswith("eval/") for k in h)), {})
        before = {k.removeprefix("eval/"): v for k, v in before.items() if k.startswith("eval/")}

    engine.train()
    # Reports during training (a checkpoint's, an eval step's) go through Ray Train's upload thread: the
    # step path waits neither for the upload nor for the controller's poll. The final report is synchronous.
    background = spec.output.checkpoint_upload == "async"
    t_start, tokens_done, stored_s, upload_wait_s = time.time(), 0, 0.0, 0.0
    uploading: Path | None = None  # the last checkpoint folder handed to the background upload
    step = start_step
    last_eval: dict = {}
    for step in range(start_step, steps):
        t0 = time.time()
        micro = [[_row(train_split, order(sample_index(step, m, rank, j, world, mb, spec.train.global_batch_size)))
                  for j in range(mb)] for m in range(accum)]
        loss_acc, n_real, infos = train_step(engine, method, step, micro, pad_id, device)
        loss_mean, n_real_all = all_sum([loss_acc / world, float(n_real)])
        tokens_done += n_real_all
        dt = time.time() - t0
        rec = step_record(step + 1, loss_mean, scheduler.get_last_lr()[0], n_real_all, dt,
                          combine_step_info(infos, world, all_reduce))
        done = step + 1
        is_last = done == steps
        if spec.train.eval_every and done % spec.train.eval_every == 0 and not is_last:
            last_eval = evaluate()
            rec.update({f"eval/{k}": v for k, v in last_eval.items()})
        history.append(rec)
        if tb:
            tb.add(rec, flush=done % spec.train.log_every == 0 or is_last)
        if done % spec.train.log_every == 0 or is_last:
            elapsed = time.time() - t_start
            eta = elapsed / max(done - start_step, 1) * (steps - done)
            log(step_line(rec, steps, tokens_done / max(elapsed, 1e-9), eta), flush=True)
        metrics = {"step": done, "loss": loss_mean, **{k: v for k, v in rec.items() if k.startswith(("eval/", "train/"))}}
        due = spec.train.checkpoint_every and done % spec.train.checkpoint_every == 0
        if due and not is_last:
            t_ckpt = time.time()
            upload_wait_s += wait_for_upload(uploading)
            uploading = _checkpoint_and_report(session, engine, rank, done, history, method, metrics, fields, background)
            stored_s += time.time() - t_ckpt
            if publisher:
                publisher.publish(engine, done)
            if tb:
                tb.publish()
        elif any(k.startswith("eval/") for k in rec) and not is_last:
            # Only eval steps are reported without a checkpoint (Tune's schedulers act on eval metrics): a
            # synchronous Ray Train report waits for the controller's next poll of the workers (every 2 s by default),
            # so a report per log step stalled a job with log_every 1 up to 2 s a step. The step lines
            # above and metrics.jsonl carry the per-step record.
            session.report(metrics, background=background)

    # ---------------------------------------------------------------- finish
    train_s, t_finish = time.time() - t_start, time.time()
    if publisher:  # before the final evaluation and outputs: the endpoint gets the last version first
        publisher.publish(engine, steps, final=True)
    after = evaluate()
    placement: list = [None] * world
    dist.all_gather_object(placement, {"rank": rank, **session.where(), "peak_memory_mb": _peak_memory_mb(device)})
    if after:
        history.append({"step": steps, **{f"eval/{k}": v for k, v in after.items()}})
        if tb:
            tb.add(history[-1])
    if tb:
        tb.close()
        log(f"[ftray] eval after training: {json.dumps(after)}", flush=True)
    final = {
        "step": steps,
        # The last step's loss (the history may end with the after-training eval record).
        "loss": next((h["loss"] for h in reversed(history) if "loss" in h), float("nan")),
        **{f"eval/{k}": v for k, v in after.items()},
        "before": before,
        "after": after,
        "trainable": summary,
        "adapter": adapter_report(engine.module),
        # The steps (with what happens between them: logging, evaluations, checkpoints); then the held-out
        # evaluation after training and collecting where each rank ran (once per run, not per step).
        "train_seconds": train_s,
        "finish_seconds": time.time() - t_finish,
        # What saving and storing the checkpoints taken while training cost the step path (rank 0's
        # seconds); with `output.checkpoint_upload: async` the upload itself is not in it.
        "checkpoint_seconds": stored_s,
        "checkpoint_upload_wait_seconds": upload_wait_s,  # of checkpoint_seconds: waiting for the one before
        # Every step's tokens, the steps before a resume included (their records came with the checkpoint); this
        # process's share is what it trained in `train_seconds` (the step lines' tok/s).
        "trained_tokens": sum(h["tokens"] for h in history if "tokens" in h),
        "process_trained_tokens": tokens_done,
        "precision": precision,
        "placement": placement,
        # Where this process started: the checkpoint step it resumed from (None: from scratch) and the
        # optimizer steps its restored optimizer state had taken then.
        "resumed_from_step": start_step or None,
        "resumed_optimizer_steps": resumed_opt_steps,
        # `output.publish_to`: where, which steps, and what each publish cost the step path and the background.
        "publish": publisher.close() if publisher else None,
    }
    _checkpoint_and_report(session, engine, rank, steps, history, method, final, fields)
    outputs.write_model_outputs(engine, tok, spec, resolved, history, rank, method)
    dist.barrier()
    # Free the engine's hooks and buffers (ZeRO-3 reserves ~2 GB of bucket buffers): a process that runs
    # several jobs (`run_local`, the tests) would otherwise keep every engine it built.
    engine.destroy()
    # Later loads in this process must not re-enter zero.Init with a stale config.
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except ImportError:
        pass
    return final

