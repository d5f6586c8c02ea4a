"""The driver: check everything (no Ray), start or join Ray, prepare data (Ray Data), fit a TorchTrainer
(Ray Train V2), write run.json. `ftray tune` wraps `fit_job` in a Tune trainable (three layers)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

from ftray import storage
from ftray.config import JobSpec
from ftray.data.prepare import check_data, prepare
from ftray.data.rows import Checked
from ftray.methods import check_method, get_method
from ftray.models.adapters import check_gradient_checkpointing, check_targets
from ftray.models.load import Resolved, load_config, load_tokenizer, meta_model, resolve
from ftray.runs import RunFolder
from ftray.train.tracking import check_trackers, finish_run, start_run

__all__ = ["Plan", "check_fits", "check_job", "check_resume", "ensure_ray", "fit_job", "prepare_data", "train",
           "write_run_json"]



@dataclass
class Plan:
    spec: JobSpec
    resolved: Resolved
    train_rows: Checked
    eval_rows: Checked | None
    tracking: dict | None = None  # the job's tracker run (train/tracking.py), made when it starts fitting
    tracking_parent: dict | None = None  # a sweep's tracker refs (its MLflow run, its W&B group)


def submitted_job_id() -> str | None:
    """The submission id when this process is the driver of a `ray job submit` job: the job supervisor
    hands its driver the job's config (metadata included) in RAY_JOB_CONFIG_JSON_ENV_VAR."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return (json.loads(raw).get("metadata") or {}).get("job_submission_id") or "(no id)"
    except (ValueError, AttributeError):
        return None


def check_output_survives(path: str, field: str = "output.dir") -> None:
    """A submitted job runs in a temporary copy of its working dir that Ray deletes after the job: a run
    folder given relative to it (or inside it) would be lost with it. Refused before anything runs."""
    from ftray.config import SpecError

    job = submitted_job_id()
    if job is None or "://" in str(path):
        return
    cwd = os.path.realpath(os.getcwd())
    real = os.path.realpath(str(path))
    if real == cwd or real.startswith(cwd + os.sep):
        raise SpecError(
            f"{field}: {path} is inside the working directory of submitted job {job} ({cwd}), a temporary "
            "copy Ray deletes when the job ends: use an absolute path on storage every node shares "
            "(e.g. /mnt/shared/runs/NAME) or s3://BUCKET/runs/NAME"
        )


def _shown(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume(spec: JobSpec, run_name: str = "checkpoints", allow: tuple[str, ...] = ()) -> None:
    """The checkpoints of `<output.dir>/<run_name>` were taken by a job with the same training fields
    (`config.training_fields`), or this job does not resume them: refused, naming every field that differs.
    `output.resume_changes` (and `allow`: a PBT trial's searched keys, which PBT changes by design) may differ."""
    from ftray.config import RESUME_ALLOWABLE, SpecError, spec_changes, training_fields
    from ftray.train.checkpoint import saved_specs

    now = training_fields(spec)
    allowed = set(spec.output.resume_changes) | set(allow)
    for folder, step, saved in saved_specs(storage.join(spec.output.dir, run_name)):
        changed = [k for k in spec_changes(saved, now) if k not in allowed]
        if not changed:
            continue
        diffs = ", ".join(f"`{k}` {_shown(saved[k])} -> {_shown(now[k])}" for k in changed)
        allowable = [k for k in changed if k in RESUME_ALLOWABLE]
        raise SpecError(
            f"output.dir: {spec.output.dir} holds checkpoints of another spec (step {step}, {folder}): {diffs}; "
            "resuming would continue that run with these changed: use another `output.dir`"
            + (f", or list {', '.join(allowable)} in `output.resume_changes`" if allowable else "")
        )


def check_job(spec: JobSpec, tracking_parent: dict | None = None, allow_changes: tuple[str, ...] = ()) -> Plan:
    """Everything that can be checked without a cluster: model, tokenizer, adapter fit, every data row, the
    folder's checkpoints against the spec (`check_resume`; `allow_changes` passed on).
    `tracking_parent`: a sweep's tracker refs (`tracking.start_sweep_run`), for a trial."""
    check_output_survives(spec.output.dir)
    if spec.output.publish_to:
        check_output_survives(spec.output.publish_to, "output.publish_to")
    storage.configure(spec.storage.endpoint_url, spec.storage.region)
    check_resume(spec, allow=allow_changes)
    from transformers import AutoModelForSeq2SeqLM

    resolved = resolve(spec.model.path, spec.model.tokenizer)
    enc_dec = getattr(load_config(resolved.base, spec.model.trust_remote_code), "is_encoder_decoder", False)
    skeleton = meta_model(
        resolved.base, spec.model.trust_remote_code, auto_class=AutoModelForSeq2SeqLM if enc_dec else None
    )
    if resolved.adapter is None:
        check_targets(skeleton, spec.adapter)
    if spec.train.gradient_checkpointing:
        check_gradient_checkpointing(skeleton)
    load_tokenizer(resolved.tokenizer, spec.model.trust_remote_code)
    train_rows, eval_rows = check_data(spec)
    check_method(spec, resolved, train_rows, eval_rows)
    if tracking_parent is None:  # a sweep's trial: checked with the sweep's jobs, where its settings apply
        check_trackers(spec.output)
    prev = RunFolder(spec.output.dir).method()
    if prev not in (None, spec.method.kind):
        from ftray.config import SpecError

        raise SpecError(f"output.dir: {spec.output.dir} holds a finished `{prev}` run; choose another folder")
    return Plan(spec, resolved, train_rows, eval_rows, tracking_parent=tracking_parent)


# Credentials: never put into a runtime_env (the dashboard, `ray list actors --detail` and the job table show
# it to anyone who can read the cluster). An embedded Ray's processes inherit this process's environment; a
# cluster's nodes have their own (an instance role, a mounted secret, the node's environment).
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "WANDB_API_KEY",
              "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME")


def worker_env(environ) -> tuple[dict, list[str]]:
    """(what the workers need to reach storage and the trackers: rank 0 logs to MLflow and W&B itself, the
    credentials it holds back (names))."""
    wanted = {k: v for k, v in environ.items()
              if k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", *SECRET_ENV)
              or k.startswith(("WANDB_", "MLFLOW_TRACKING_"))}
    held = sorted(k for k in wanted if k in SECRET_ENV)
    return {k: v for k, v in wanted.items() if k not in SECRET_ENV}, held


# Ray Train settings for a Ray that `ensure_ray` starts in this process (its Train controller inherits this
# environment; a cluster keeps its own):
EMBEDDED_RAY_ENV = {
    # The controller polls its workers every 2 s by default, and a step that reports waits for it: a 4-step job
    # with a report each step trained 3.5 s at 2 s, 0.7 s at 0.25 s (2 CPU workers, tiny model).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # The preemption watcher is one more actor per worker group, polling Ray's drain state for a node that an
    # autoscaler or a cloud is about to take away. An embedded Ray has one node and no autoscaler: nothing
    # drains it. The actor cost ~2 CPU-seconds to start on each fit and its share of a core beside
    # the workers (benchmarks/train_throughput.py, "cores by process while each arm trained").
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def ensure_ray(spec: JobSpec | None = None) -> bool:
    """Join the running cluster (ray job submit sets RAY_ADDRESS) or start an embedded one; True when
    this process started it (then nothing can be added to it: no autoscaler)."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS", "local") == "local":
        for key, value in EMBEDDED_RAY_ENV.items():  # a variable the user set wins
            os.environ.setdefault(key, value)
    env, held = worker_env(os.environ)
    if held and os.environ.get("RAY_ADDRESS", "local") != "local":
        print(f"[ftray] {', '.join(held)} not passed to the cluster's workers (a job's runtime_env shows in the "
              "dashboard and the state API): its nodes use their own role or environment", flush=True)
    ray.init(runtime_env={"env_vars": env} if env else None, log_to_driver=True, configure_logging=False)
    node = getattr(ray._private.worker, "_global_node", None)  # head=True: ray.init started this cluster
    return bool(node is not None and node.head)


def check_fits(spec: JobSpec, embedded: bool, log=print) -> None:
    """A job whose workers (and what its method deploys beside them) need more CPUs or GPUs than the
    cluster has would wait for them forever: refuse it on an embedded Ray, warn on a joined cluster
    (an autoscaler may add nodes)."""
    import ray

    from ftray.config import SpecError

    s = spec.scaling
    method = get_method(spec.method.kind)
    extra = method.extra_cpus(spec)
    have = ray.cluster_resources()
    needs = {"CPU": s.num_workers * s.cpus_per_worker + extra, "GPU": float(s.num_workers if s.use_gpu else 0)}
    for res, need in needs.items():
        if need > have.get(res, 0.0) + 1e-9:
            msg = (
                f"scaling: the job needs {need:g} {res}s (scaling.num_workers {s.num_workers} x "
                + (f"scaling.cpus_per_worker {s.cpus_per_worker:g}" if res == "CPU" else "1 GPU")
                + (f" + {extra:g} for the method's reward replica" if res == "CPU" and extra else "")
                + f"), the Ray cluster has {have.get(res, 0.0):g}"
            )
            if embedded:
                raise SpecError(msg + ": lower them, or join a larger cluster (RAY_ADDRESS)")
            log(f"[ftray] warning: {msg}; the job waits until the cluster grows", flush=True)


def _stored_checkpoint_line():
    """A line on the driver each time Ray Train has registered a checkpoint (every rank's part uploaded,
    the checkpoint manager's snapshot saved): from then on a restart or a rerun resumes from it. With
    `output.checkpoint_upload: async` that is some steps after the step that took it."""
    from ray.train.v2.api.callback import UserCallback

    class StoredCheckpointLine(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:
                print(f"[ftray] checkpoint at step {metrics[0].get('step')} stored: {checkpoint.path}", flush=True)

    return StoredCheckpointLine()


def _run_config(spec: JobSpec, callbacks=None, name: str = "checkpoints"):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    fs, path = storage.pyarrow_filesystem(spec.output.dir)
    return RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=spec.scaling.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=spec.output.keep_checkpoints),
        callbacks=[_stored_checkpoint_line(), *(callbacks or [])],
    )


RAY_DATA_MIN_ROWS = 50_000  # `data.prepare_with: auto`: below this, Ray Data's start-up outweighs its work


def prepare_data(plan: Plan, method, log=print, use_ray: bool = True) -> tuple[str, dict, float]:
    """Tokenize (+pack) the job's data into the cache (Ray Data, or in this process, per
    `data.prepare_with`; never Ray without `use_ray`); says what it did. Returns (prepared folder, meta, seconds)."""
    t0 = time.time()
    rows = len(plan.train_rows.rows) + (len(plan.eval_rows.rows) if plan.eval_rows else 0)
    how = plan.spec.data.prepare_with
    ray_data = use_ray and (how == "ray_data" or (how == "auto" and rows >= RAY_DATA_MIN_ROWS))
    prepared, meta = prepare(plan.spec, plan.resolved.tokenizer, plan.train_rows, plan.eval_rows, method, ray_data)
    tr = meta["train"]
    log(
        f"[ftray] data {meta['key']}{' (cached)' if meta.get('cached') else ''}: {tr['rows']} rows, "
        f"{tr['skipped_rows']} skipped, {tr['truncated']} truncated, {tr['dropped_no_answer']} dropped "
        f"(no answer within max_length), {tr['sequences']} sequences, padding {100 * tr['padding_share']:.1f}%",
        flush=True,
    )
    for line in plan.train_rows.first_skipped:
        log(f"[ftray] skipped {line}", flush=True)
    return prepared, meta, time.time() - t0


def fit_job(plan: Plan, callbacks=None, log=print, resume_from: str | None = None, run_name: str = "checkpoints"):
    """Prepare data and fit one TorchTrainer; returns (ray Result, data meta, timings).

    `resume_from`: a checkpoint folder (local or URL) to start from when the run `run_name` in the job's
    folder has no checkpoint of its own yet (Train V2 has no `resume_from_checkpoint`). A PBT trial
    continues another trial's checkpoint this way, under a new `run_name`."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from ftray.train.loop import train_fn_per_worker

    spec = plan.spec
    method = get_method(spec.method.kind)
    prepared, meta, t_prep = prepare_data(plan, method, log)
    rm = method.reward_model(spec)  # the served reward model a feedback method's rollouts are scored by
    if rm is not None:
        from ftray.rlhf.served import serve_reward_model

        serve_reward_model(rm)
    plan.tracking = start_run(spec, plan.tracking_parent)
    s = spec.scaling
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"spec": spec.model_dump(), "resolved": asdict(plan.resolved), "prepared": prepared,
                           "resume_from": resume_from, "tracking": plan.tracking},
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})},
            placement_strategy=s.placement_strategy,
        ),
        run_config=_run_config(spec, callbacks, run_name),
    )
    t1 = time.time()
    result = trainer.fit()
    if not result.error:  # every caller's run (`ftray train`, a Tune trial): no attempt can still be writing one
        prune_unregistered(storage.join(spec.output.dir, run_name), log)
    return result, meta, {"prepare_s": t_prep, "fit_s": time.time() - t1}


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for p in ("ftray", "torch", "ray", "deepspeed", "transformers", "peft", "trl", "datasets"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


def write_run_json(plan: Plan, result, meta: dict, timings: dict) -> dict:
    spec = plan.spec
    m = result.metrics or {}
    record = {
        "status": "completed",
        "name": spec.run_name,
        "spec": spec.model_dump(mode="json"),
        "parent_run": plan.resolved.parent_run,
        "base_model": plan.resolved.base,
        "data": {k: meta[k] for k in ("key", "path", "train", "eval") if k in meta},
        "data_hash": meta["key"],
        "eval": {"before": m.get("before", {}), "after": m.get("after", {})},
        "method_record": get_method(spec.method.kind).recorded(spec),  # read back by `methods.run_spec`
        "trainable": m.get("trainable", {}),
        "adapter": m.get("adapter", {}),  # what the adapter became (AdaLoRA: final ranks per module)
        "train": {
            "steps": m.get("step"),
            "final_loss": m.get("loss"),
            "trained_tokens": m.get("trained_tokens"),
            "process_trained_tokens": m.get("process_trained_tokens"),
            "precision": m.get("precision"),
            "train_seconds": m.get("train_seconds"),
            "finish_seconds": m.get("finish_seconds"),
            "checkpoint_seconds": m.get("checkpoint_seconds"),
            "checkpoint_upload_wait_seconds": m.get("checkpoint_upload_wait_seconds"),
            "resumed_from_step": m.get("resumed_from_step"),
            "resumed_optimizer_steps": m.get("resumed_optimizer_steps"),
            "publish": m.get("publish"),
        },
        # Which node each rank ran on (node id, IP, hostname, node labels) under the spec's strategy.
        "placement": {"strategy": spec.scaling.placement_strategy, "ranks": m.get("placement", [])},
        "timings": timings,
        "versions": _versions(),
        "outputs": sorted(n for n in storage.listdir(spec.output.dir) if not n.startswith(".")),
    }
    RunFolder(spec.output.dir).write_record(record)
    finish_run(plan.tracking, spec.output.dir)
    return record


def hold_output(spec: JobSpec, log=print):
    """The lease on `output.dir` for this job's driver (`train/lease.py`): a second run on the folder is refused
    while it runs. Taken once the job is checked (a refused job leaves no folder behind), before Ray."""
    from ftray.train.lease import Lease

    check_output_survives(spec.output.dir)
    storage.configure(spec.storage.endpoint_url, spec.storage.region)
    return Lease(spec.output.dir, log=log)


def prune_unregistered(run_dir: str, log=print) -> list[str]:
    """Remove the checkpoint folders of the Ray Train run `run_dir` that Ray Train never registered (an attempt
    killed after writing one, before its report reached the controller): Ray deletes only the ones it knows, so
    each such kill would leave a whole checkpoint behind, past `output.keep_checkpoints`. Called once the run
    has finished (`fit_job`, for every caller): no attempt can still be writing one. Returns the names removed."""
    snapshot = storage.join(run_dir, "checkpoint_manager_snapshot.json")
    if not storage.exists(snapshot):
        return []
    known = {c["checkpoint_dir_name"] for c in json.loads(storage.read_text(snapshot)).get("checkpoint_results", [])}
    gone = [n for n in storage.listdir(run_dir) if n.startswith("checkpoint_") and n != "checkpoint_manager_snapshot.json"
            and n not in known]
    for name in gone:
        storage.remove(storage.join(run_dir, name))
        log(f"[ftray] removed {storage.join(run_dir, name)}: a checkpoint Ray Train never registered "
            "(its attempt was killed before reporting it)", flush=True)
    return gone


def train(spec: JobSpec, log=print) -> dict:
    """`ftray train`: the whole job. Returns run.json's record."""
    t0 = time.time()
    plan = check_job(spec)
    with hold_output(spec, log):
        check_fits(spec, ensure_ray(spec), log=log)
        result, meta, timings = fit_job(plan, log=log)
        if result.error:
            finish_run(plan.tracking, None, "FAILED")
            raise result.error
        timings["total_s"] = time.time() - t0
        record = write_run_json(plan, result, meta, timings)
    nodes = [f"rank {r['rank']} on {r['hostname']} ({r['node_ip']}, node {r['node_id'][:8]})" for r in record["placement"]["ranks"]]
    log(f"[ftray] placement {spec.scaling.placement_strategy}: {'; '.join(nodes)}", flush=True)
    b, a = record["eval"]["before"], record["eval"]["after"]
    for k in a:
        if k in b:
            log(f"[ftray] {k}: {b[k]:.4f} -> {a[k]:.4f}", flush=True)
    return record
