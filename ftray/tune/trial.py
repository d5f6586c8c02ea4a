"""The driver layer of a sweep (STYLE habit 8): one Tune trial = one validated job = one TorchTrainer.

    train_fn_per_worker (ftray.train.loop)  <-  run_trial (here)  <-  Tuner (ftray.tune.sweep)

The trial fits its TorchTrainer in a thread and reports the loop's intermediate metrics to Tune as they
arrive (so a scheduler can stop it early), with the run's checkpoint when the scheduler is PBT (Tune
keeps a copy, which another trial may continue from), and its final metrics itself, once the run folder
is complete: a scheduler that stops a trial at its last step must not cut off the writing of its adapter
and run.json.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time

from ray.train.v2.api.callback import UserCallback

from ftray import storage

__all__ = ["COMPLETED", "SEGMENTS", "run_trial", "trial_dir"]

COMPLETED = "trial_completed"  # in the final report only: the trial ran its whole budget
# In a PBT trial's folder: each stretch of it, from which step, with which values: the first from scratch,
# then each that continued a checkpoint (another trial's after an exploit, its own after PBT paused it).
SEGMENTS = "segments.json"


def trial_dir(sweep_dir: str, trial_id: str) -> str:
    return storage.join(sweep_dir, "trials", trial_id)


class _MetricToTrial(UserCallback):
    """Runs in the Train controller. Passes the reports that carry the sweep's metric (the loop adds
    `eval/...` keys on eval steps only, and Tune refuses a result without its metric), not the final one,
    to the trial through a Ray queue, with the path of the checkpoint reported with them."""

    def __init__(self, metric: str, queue):
        self.metric = metric
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0]
        if self.metric in m and "after" not in m:
            self.queue.put(({k: v for k, v in m.items() if _scalar(v)}, checkpoint.path if checkpoint else None))


def _scalar(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _segment_start(spec, config: dict, checkpoint: str | None) -> str:
    """Record in SEGMENTS where this stretch of a PBT trial starts and with which values; returns the Train
    run name for it: a run name already holding checkpoints would resume from its own, not `checkpoint`."""
    path = storage.join(spec.output.dir, SEGMENTS)
    segments = json.loads(storage.read_text(path)) if storage.exists(path) else []
    if checkpoint is None:
        if not segments:
            segments.append({"start_step": 0, "from_checkpoint": None, "from_trial": None, "config": config,
                             "time": time.time()})
            storage.write_text_atomic(path, json.dumps(segments, indent=1))
        return "checkpoints"  # (re)started without a Tune checkpoint: Train resumes its own run, if any
    state = json.loads(storage.read_text(storage.join(checkpoint, "state.json")))
    donor = re.search(r"_([0-9a-f]{5}_\d{5})_", checkpoint)  # Tune's trial folder name holds the id
    segments.append({"start_step": state["step"], "from_checkpoint": checkpoint,
                     "from_trial": donor.group(1) if donor else None, "config": config, "time": time.time()})
    storage.write_text_atomic(path, json.dumps(segments, indent=1))
    return f"checkpoints-{len(segments) - 1}"


def run_trial(config: dict, sweep: dict, tracking_parent: dict | None = None) -> None:
    """A Tune function trainable: build the trial's job from the sweep and the sampled `config`, check
    it, fit it (from Tune's checkpoint when there is one), write its run folder, report its metrics."""
    from ray import tune
    from ray.util.queue import Empty, Queue

    from ftray.train.launch import check_job, fit_job, write_run_json
    from ftray.tune.spec import SweepSpec, trial_spec

    sw = SweepSpec.model_validate(sweep)
    trial_id = tune.get_context().get_trial_id()
    spec = trial_spec(sw, config, trial_dir(sw.output.dir, trial_id), source=f"trial {trial_id}")
    with_checkpoints = sw.scheduler.kind == "pbt"
    # The sweep's tracker refs: this trial's runs hang from them. PBT changes a trial's searched values between
    # the stretches of its run: those may differ from its folder's checkpoints.
    plan = check_job(spec, tracking_parent, allow_changes=tuple(sw.search) if with_checkpoints else ())
    start = tune.get_checkpoint()  # after a PBT exploit: the other trial's; after a sweep resume: its own
    start_url = storage.url_like(start.path, sw.output.dir) if start is not None else None
    run_name = _segment_start(spec, config, start_url) if with_checkpoints else "checkpoints"

    queue = Queue(actor_options={"num_cpus": 0})
    out: dict = {}

    def fit():
        try:
            out["fit"] = fit_job(plan, callbacks=[_MetricToTrial(sw.metric, queue)],
                                 resume_from=start_url, run_name=run_name)
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread
            out["error"] = e

    # A daemon: when Tune stops the trial (a scheduler's decision), its actor exits without waiting.
    fitting = threading.Thread(target=fit, name="ftray-fit", daemon=True)
    fitting.start()

    def forward(block: bool) -> bool:
        try:
            metrics, path = queue.get(block=block, timeout=1.0 if block else None)
        except Empty:
            return False
        ckpt = None
        if with_checkpoints and path:
            fs, p = storage.pyarrow_filesystem(storage.url_like(path, spec.output.dir))
            ckpt = tune.Checkpoint(path=p, filesystem=fs)
        tune.report(metrics, checkpoint=ckpt)
        return True

    while fitting.is_alive():
        forward(block=True)
    while forward(block=False):
        pass
    if "error" in out:
        raise out["error"]
    result, meta, timings = out["fit"]
    if result.error:
        raise result.error
    record = write_run_json(plan, result, meta, timings)
    final = {k: v for k, v in (result.metrics or {}).items() if _scalar(v)}
    tune.report({**final, "train_seconds": record["train"]["train_seconds"] or 0.0, COMPLETED: 1})
