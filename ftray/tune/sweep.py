"""The Tuner over the trial driver: search space, scheduler, search algorithm, resources, resume,
progress lines. `run_sweep` is what `ftray tune` calls."""

from __future__ import annotations

import time
from typing import Any

from ftray import storage
from ftray.config import JobSpec, SpecError
from ftray.tune.spec import SweepSpec

__all__ = ["TRIAL_CPU", "check_resources", "param_space", "run_sweep"]

# The trial function only waits on its TorchTrainer; its workers hold the real CPUs. Tune cannot
# schedule a 0-CPU function trainable, so it asks for this much.
TRIAL_CPU = 0.1


def _domain(sweep: SweepSpec, d):
    from ray import tune

    k, v = d.kind, d.args
    if k == "loguniform":
        return tune.loguniform(v[0], v[1])
    if k == "uniform":
        return tune.uniform(v[0], v[1])
    if k == "randint":
        return tune.randint(v[0], v[1])
    if k == "grid" or (k == "choice" and sweep.search_alg == "grid"):
        return tune.grid_search(list(v))
    return tune.choice(list(v))


def param_space(sweep: SweepSpec) -> dict[str, Any]:
    return {key: _domain(sweep, d) for key, d in sweep.search.items()}


def _scheduler(sweep: SweepSpec, jobs: list[JobSpec]):
    from ray.tune.schedulers import (
        ASHAScheduler,
        AsyncHyperBandScheduler,
        FIFOScheduler,
        PopulationBasedTraining,
    )

    from ftray.tune.spec import pbt_interval, pbt_mutations

    s = sweep.scheduler
    max_t = s.max_t or jobs[0].train.max_steps
    # time_attr is the loop's optimizer step, so grace_period and max_t read in steps whatever the
    # report interval is.
    if s.kind == "asha":
        return ASHAScheduler(time_attr="step", max_t=max_t, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    if s.kind == "hyperband":
        return AsyncHyperBandScheduler(time_attr="step", max_t=max_t, grace_period=s.grace_period,
                                       reduction_factor=s.reduction_factor, brackets=s.brackets)
    if s.kind == "pbt":
        from ftray.tune.trial import COMPLETED

        class PBT(PopulationBasedTraining):
            """Ray's PBT, less two pauses. A trial's final report comes after its run folder is written:
            nothing is left to exploit. And asynchronous PBT pauses a trial at a perturbation whenever
            another is pending or paused, to take turns; the whole population runs at once here (checked at
            validation), so the only other paused trial is one being restarted from an exploit, and a pause
            would only cost this trial a restart of its Ray Train run. (Synchronous PBT's pauses are its
            point: they are kept.)"""

            def on_trial_result(self, tune_controller, trial, result):
                if result.get(COMPLETED):
                    return self.CONTINUE
                decision = super().on_trial_result(tune_controller, trial, result)
                return self.CONTINUE if decision == self.PAUSE and not s.synch else decision

        return PBT(
            time_attr="step",
            perturbation_interval=pbt_interval(sweep, jobs[0])[0],
            # A `grid` key cannot be resampled from; it is perturbed between its listed values.
            hyperparam_mutations={k: (list(sweep.search[k].args) if sweep.search[k].kind == "grid"
                                      else _domain(sweep, sweep.search[k])) for k in pbt_mutations(sweep)},
            quantile_fraction=s.quantile_fraction,
            resample_probability=s.resample_probability,
            log_config=True,
            synch=s.synch,
        )
    return FIFOScheduler()


def _search_alg(sweep: SweepSpec):
    if sweep.search_alg == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:
            raise SpecError(f"`search_alg: optuna` needs the `optuna` package ({e})") from None
        return OptunaSearch(metric=sweep.metric, mode=sweep.mode, seed=sweep.seed)
    from ray.tune.search import BasicVariantGenerator

    # Tune ignores `max_concurrent_trials` for a generator instance; it takes the limit itself.
    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials)


def trial_cpus(jobs: list[JobSpec]) -> float:
    return max(j.scaling.num_workers * j.scaling.cpus_per_worker for j in jobs) + TRIAL_CPU


def check_resources(sweep: SweepSpec, jobs: list[JobSpec], cluster: dict) -> None:
    """`max_concurrent_trials` trials, each its workers' CPUs plus the trial function's, must fit."""
    per = trial_cpus(jobs)
    need = sweep.max_concurrent_trials * per
    have = float(cluster.get("CPU", 0.0))
    if need > have + 1e-9:
        w = max(jobs, key=lambda j: j.scaling.num_workers * j.scaling.cpus_per_worker).scaling
        raise SpecError(
            f"`max_concurrent_trials: {sweep.max_concurrent_trials}` needs {need:g} CPUs "
            f"({sweep.max_concurrent_trials} x ({w.num_workers} workers x {w.cpus_per_worker:g} CPU + "
            f"{TRIAL_CPU:g} for the trial)) but the cluster has {have:g}; lower it to "
            f"{int(have // per) or 1}, or `resources.workers` / `resources.cpus_per_worker`"
        )


def _short(config: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


def _progress(sweep: SweepSpec, table_every_s: float = 30.0):
    from ray import tune

    from ftray.tune.trial import COMPLETED

    metric = sweep.metric

    class Progress(tune.Callback):
        """One line per trial event; a table of the running trials every `table_every_s`."""

        def __init__(self):
            self._last_table = 0.0
            self._started: set[str] = set()

        def _p(self, msg: str) -> None:
            print(f"[sweep] {msg}", flush=True)

        def on_trial_start(self, iteration, trials, trial, **info):
            again = trial.trial_id in self._started
            self._started.add(trial.trial_id)
            how = "continues from a checkpoint (PBT)" if again and sweep.scheduler.kind == "pbt" else "started"
            self._p(f"trial {trial.trial_id} {how}: {_short(trial.config)}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if COMPLETED not in result:
                self._p(f"trial {trial.trial_id} step {result.get('step')} {metric} {result.get(metric, float('nan')):.4g}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            how = "completed" if r.get(COMPLETED) else f"stopped early by {sweep.scheduler.kind}"
            self._p(f"trial {trial.trial_id} {how} at step {r.get('step')}: {metric} {r.get(metric, float('nan')):.4g}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._p(f"trial {trial.trial_id} failed at step {(trial.last_result or {}).get('step')}: "
                    f"see {trial.path}/error.txt")

        def on_step_end(self, iteration, trials, **info):
            now = time.time()
            if now - self._last_table < table_every_s:
                return
            self._last_table = now
            running = [t for t in trials if t.status == "RUNNING"]
            counts: dict[str, int] = {}
            for t in trials:
                counts[t.status] = counts.get(t.status, 0) + 1
            self._p("trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())))
            if running:
                print(f"  {'trial':<18} {'step':>5} {metric:>16}  params", flush=True)
                for t in running:
                    r = t.last_result or {}
                    m = r.get(metric)
                    print(f"  {t.trial_id:<18} {r.get('step', '-')!s:>5} "
                          f"{(f'{m:.4g}' if m is not None else '-'):>16}  {_short(t.config)}", flush=True)

    return Progress()


def _pin_ray_address() -> None:
    """With several Ray instances on one machine (CI, shared dev boxes), Train's placement-group cleaner
    looks its cluster up with address "auto", fails ("Found multiple active Ray instances"), and a trial
    that a scheduler stops leaks its workers' placement group: later trials then wait forever. Tune puts
    these variables into every trial actor's runtime env; Train's controller and cleaner inherit them."""
    import ray
    from ray.tune.execution import class_cache

    class_cache.DEFAULT_ENV_VARS.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def _prepare_once(jobs: list[JobSpec], log) -> None:
    """Check every sample point's job (model, adapter fit, every data row) and prepare its data into the
    shared cache before trials start: trials then hit the cache instead of competing for CPUs."""
    from ftray.data.prepare import cache_key
    from ftray.methods import get_method
    from ftray.train.launch import check_job, prepare_data

    seen = set()
    for job in jobs:
        plan = check_job(job)
        key = (cache_key(job, plan.resolved.tokenizer), job.data.cache_dir)
        if key in seen:
            continue
        seen.add(key)
        _, meta, _ = prepare_data(plan, get_method(job.method.kind), log=lambda *a, **k: None)
        log(f"[sweep] data {meta['key']}{' (cached)' if meta.get('cached') else ''} ready", flush=True)


def run_sweep(sweep: SweepSpec, jobs: list[JobSpec], log=print) -> dict:
    """Start or resume the sweep in `sweep.output.dir`; write its results. Returns the summary."""
    from ftray.train.launch import check_output_survives
    from ftray.train.lease import Lease

    t0 = time.time()
    check_output_survives(sweep.output.dir)
    storage.configure(jobs[0].storage.endpoint_url, jobs[0].storage.region)
    # One sweep driver per folder (its trials, in their own folders under it, take no lease of their own).
    with Lease(sweep.output.dir, log=log):
        return _run_sweep(sweep, jobs, log, t0)


def _keep_credentials_out_of_trial_actors() -> None:
    """Ray Tune copies the driver's static AWS keys into every trial actor's runtime_env
    (`ray/tune/execution/class_cache.py`, ENV_VARS_TO_PROPAGATE), where the dashboard and the state API show
    them; as `ensure_ray` does for a job, they stay out: an embedded Ray's actors inherit them from this
    process, a cluster's nodes have their own."""
    from ray.tune.execution import class_cache

    from ftray.train.launch import SECRET_ENV

    names = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(names, set):
        names.difference_update({*SECRET_ENV, "AWS_SECURITY_TOKEN"})


def _run_sweep(sweep: SweepSpec, jobs: list[JobSpec], log, t0: float) -> dict:
    import ray
    from ray import tune

    from ftray.train.launch import ensure_ray
    from ftray.tune.results import write_results
    from ftray.tune.trial import run_trial

    ensure_ray(jobs[0])
    check_resources(sweep, jobs, ray.cluster_resources())
    _pin_ray_address()
    _keep_credentials_out_of_trial_actors()
    # The sample points' jobs ran `spec_from_dict` with a placeholder run folder; check data and model.
    _prepare_once(jobs, log)

    fs, path = storage.pyarrow_filesystem(sweep.output.dir)
    exp = storage.join(sweep.output.dir, "tune")
    from ftray.train.tracking import finish_sweep_run, start_sweep_run

    # The trials' tracker runs hang from the sweep (`output.trackers` of the base job): MLflow children of
    # the sweep's run, a W&B group named after the sweep.
    parent = start_sweep_run(jobs[0].output, sweep.output.dir, sweep.output.dir.rstrip("/").rsplit("/", 1)[-1],
                             sweep.model_dump(mode="json", exclude={"base"}))
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep.model_dump(), tracking_parent=parent),
                                    {"CPU": TRIAL_CPU})
    if tune.Tuner.can_restore(exp, storage_filesystem=fs if "://" in exp else None):
        log(f"[sweep] resuming {exp}", flush=True)
        tuner = tune.Tuner.restore(exp, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs if "://" in exp else None)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                num_samples=sweep.num_samples,
                # BasicVariantGenerator takes the limit itself (see _search_alg); Searchers get it here.
                max_concurrent_trials=sweep.max_concurrent_trials if sweep.search_alg == "optuna" else None,
                scheduler=_scheduler(sweep, jobs),
                search_alg=_search_alg(sweep),
                # A trial actor holds a Train controller; reused actors never start the next trial.
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=path,
                storage_filesystem=fs,
                callbacks=[_progress(sweep)],
                verbose=0,
            ),
        )
    grid = tuner.fit()
    summary = write_results(sweep, grid, wall_s=time.time() - t0)
    if not summary["unfinished"]:  # an interrupted sweep's run stays open for its resume
        finish_sweep_run(jobs[0].output, parent)
    log(
        f"[sweep] {'interrupted' if summary['unfinished'] else 'done'}: {summary['trials']} trials, "
        f"{summary['completed']} completed, {summary['stopped_early']} stopped early, {summary['failed']} failed, "
        f"{summary['unfinished']} unfinished; {summary['total_steps']} steps, {summary['wall_s']:.0f} s",
        flush=True,
    )
    if summary["unfinished"]:
        log("[sweep] run the same command again to resume", flush=True)
    if summary["best_trial"]:
        log(f"[sweep] best: trial {summary['best_trial']} {sweep.metric} {summary['best_metric']:.4g} "
            f"{_short(summary['best_params'])} -> {storage.join(sweep.output.dir, 'best.yaml')}", flush=True)
    return summary
