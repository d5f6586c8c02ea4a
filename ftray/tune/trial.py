"""The driver layer of a sweep (STYLE habit 8): one Tune trial = one validated job = one TorchTrainer.

    train_fn_per_worker (ftray.train.loop)  <-  run_trial (here)  <-  Tuner (ftray.tune.sweep)

The trial reports the loop's intermediate metrics to Tune as they arrive (so a scheduler can stop it
early) and its final metrics itself, once the run folder is complete: a scheduler that stops a trial at
its last step must not cut off the writing of its adapter and run.json.
"""

from __future__ import annotations

import math

from ray.tune.integration.ray_train import TuneReportCallback

from ftray import storage

__all__ = ["COMPLETED", "run_trial", "trial_dir"]

COMPLETED = "trial_completed"  # in the final report only: the trial ran its whole budget


def trial_dir(sweep_dir: str, trial_id: str) -> str:
    return storage.join(sweep_dir, "trials", trial_id)


class _MetricToTune(TuneReportCallback):
    """Forward to Tune only the reports that carry the sweep's metric (the loop adds `eval/...` keys on
    eval steps only, and Tune refuses a result without its metric), and not the final one."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0]
        if self.metric in m and "after" not in m:
            super().after_report(run_context, [{k: v for k, v in m.items() if _scalar(v)}], checkpoint)


def _scalar(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def run_trial(config: dict, sweep: dict) -> None:
    """A Tune function trainable: build the trial's job from the sweep and the sampled `config`, check
    it, fit it, write its run folder, report its final metrics."""
    from ray import tune

    from ftray.train.launch import check_job, fit_job, write_run_json
    from ftray.tune.spec import SweepSpec, trial_spec

    sw = SweepSpec.model_validate(sweep)
    trial_id = tune.get_context().get_trial_id()
    spec = trial_spec(sw, config, trial_dir(sw.output.dir, trial_id), source=f"trial {trial_id}")
    plan = check_job(spec)
    result, meta, timings = fit_job(plan, callbacks=[_MetricToTune(sw.metric)])
    if result.error:
        raise result.error
    record = write_run_json(plan, result, meta, timings)
    final = {k: v for k, v in (result.metrics or {}).items() if _scalar(v)}
    tune.report({**final, "train_seconds": record["train"]["train_seconds"] or 0.0, COMPLETED: 1})
