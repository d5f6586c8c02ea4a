"""The sweep spec: a base job spec, a search space over its dotted fields, a metric, a scheduler and a
search algorithm. Everything here is checked before Ray starts; nothing here imports Ray.

Every sampled value is checked the way a trial will use it: substituted into the base job and
validated by `spec_from_dict`, so a key that is not a job field, or a bound the field refuses, is an
error that names the sweep file and line before any trial starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ftray import storage
from ftray.config import JobSpec, absolute_paths, resolve_paths, spec_from_dict
from ftray.yamlspec import SpecError, coerce_floats, format_error, load_mapping, merge, nest, override_items

__all__ = ["Dist", "SweepSpec", "load_sweep", "reported_metrics", "sample_points", "sweep_from_dict", "trial_spec"]

DIST_KINDS = ("loguniform", "uniform", "randint", "choice", "grid")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dist(_Strict):
    """One distribution: exactly one of the keys below, e.g. `{loguniform: [1.0e-4, 1.0e-2]}`."""

    loguniform: tuple[float, float] | None = Field(None, description="[low, high], both > 0, sampled log-uniformly.")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], sampled uniformly.")
    randint: tuple[int, int] | None = Field(None, description="[low, high): an integer, high excluded.")
    choice: list[Any] | None = Field(None, description="One of these values, at random (or by the search algorithm).")
    grid: list[Any] | None = Field(None, description="Every one of these values (crossed with the other grids).")

    @model_validator(mode="after")
    def _one(self) -> Dist:
        set_ = [k for k in DIST_KINDS if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"a distribution is exactly one of {', '.join(DIST_KINDS)}; got {set_ or 'none'}")
        k = set_[0]
        v = getattr(self, k)
        if k in ("choice", "grid") and not v:
            raise ValueError(f"`{k}` needs at least one value")
        if k == "loguniform" and v[0] <= 0:
            raise ValueError(f"`loguniform` bounds must be > 0, got low {v[0]}")
        if k in ("loguniform", "uniform") and not v[0] < v[1]:
            raise ValueError(f"`{k}` needs low < high, got [{v[0]}, {v[1]}]")
        if k == "randint" and not v[0] < v[1]:
            raise ValueError(f"`randint` needs low < high (high is excluded), got [{v[0]}, {v[1]}]")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DIST_KINDS if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)

    def edge_values(self) -> list[Any]:
        """The values a validation must try: both bounds of a range, every listed value."""
        k, v = self.kind, self.args
        if k == "randint":
            return [v[0], v[1] - 1]
        return list(v)


class Scheduler(_Strict):
    kind: Literal["asha", "hyperband", "pbt", "none"] = Field(
        "asha",
        description="`asha`: asynchronous successive halving. `hyperband`: asynchronous HyperBand (ASHA over "
        "`brackets` brackets). `pbt`: population based training: every `perturbation_interval` steps a trial in "
        "the bottom `quantile_fraction` continues from a top trial's checkpoint with that trial's values, the "
        "`mutate` keys perturbed. `none`: every trial to its full budget.",
    )
    grace_period: int = Field(1, ge=1, description="Steps every trial runs before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="Keep 1 / reduction_factor of the trials at each rung.")
    max_t: int | None = Field(
        None, ge=1, description="Steps of a full trial (default: the base job's `train.max_steps`)."
    )
    brackets: int = Field(3, ge=1, description="HyperBand brackets (`hyperband` only).")
    perturbation_interval: int | None = Field(
        None, ge=1, description="`pbt`: steps between exploit/explore decisions (default: the job's "
        "`train.eval_every`); a multiple of `train.eval_every`."
    )
    quantile_fraction: float = Field(
        0.25, gt=0, le=0.5, description="`pbt`: the bottom fraction that copies the top fraction."
    )
    resample_probability: float = Field(
        0.25, ge=0, le=1, description="`pbt`: chance a mutated value is drawn anew from its search "
        "distribution instead of perturbed (x0.8 / x1.2, or a neighbouring `choice`)."
    )
    synch: bool = Field(
        False, description="`pbt`: Ray's synchronous PBT: at each perturbation every trial waits (paused) until "
        "all have reached it, so a trial that started late is still compared; each perturbation then restarts "
        "every trial's Ray Train run. Off: asynchronous, a trial is compared with those running beside it.",
    )
    mutate: list[str] | None = Field(
        None, description="`pbt`: the search keys PBT changes during a trial (default: every searched key "
        f"among {', '.join(f'`{k}`' for k in ('train.lr', 'train.weight_decay'))}). Other searched keys are "
        "sampled once and copied with the weights."
    )


class Resources(_Strict):
    workers: int | None = Field(None, ge=1, description="Ray Train workers per trial (default: the job's).")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs per worker (default: the job's).")


class SweepOutput(_Strict):
    dir: str = Field(
        description="The sweep folder: results.csv/.md, best.yaml, sweep.png, trials/<id>/ run folders and "
        "Tune's state. Running the same sweep again with the same folder resumes it."
    )


class SweepSpec(_Strict):
    name: str | None = Field(None, description="A label (default: the sweep folder's name).")
    base: str | dict = Field(description="The job spec every trial starts from: a YAML path (relative to the "
                             "sweep file) or an inline mapping.")
    fixed: dict[str, Any] = Field(
        default_factory=dict, description="Dotted job fields set for every trial, e.g. `train.max_steps: 40`."
    )
    search: dict[str, Dist] = Field(description="Dotted job field -> distribution.")
    metric: str = Field("eval/eval_loss", description="A metric the job's method reports, e.g. `eval/eval_loss`.")
    mode: Literal["min", "max"] = Field("min", description="Whether a lower or higher metric is better.")
    scheduler: Scheduler = Field(default_factory=Scheduler)
    search_alg: Literal["random", "grid", "optuna"] = Field(
        "random",
        description="`random` (grid entries are crossed with random samples), `grid` (every distribution must "
        "be `grid` or `choice`; each combination once per sample), `optuna` (TPE via Ray Tune's OptunaSearch).",
    )
    num_samples: int = Field(8, ge=1, description="Trials (random/optuna), or repeats of the whole grid.")
    max_concurrent_trials: int = Field(1, ge=1, description="Trials running at once.")
    resources: Resources = Field(default_factory=Resources)
    seed: int = Field(0, description="Seeds the search algorithm (each trial keeps the job's `train.seed`).")
    output: SweepOutput

    @property
    def sweep_name(self) -> str:
        return self.name or self.output.dir.rstrip("/").rsplit("/", 1)[-1]

    def trial_count(self) -> int:
        """Trials Tune will run: `num_samples` x every grid combination."""
        n = self.num_samples
        for d in self.search.values():
            if d.kind == "grid" or (d.kind == "choice" and self.search_alg == "grid"):
                n *= len(d.args)
        return n


# ------------------------------------------------------------------------------------------- metrics


def reported_metrics(spec: JobSpec) -> set[str]:
    """What the loop reports to Ray Train for this job: `loss` every report; `eval/<m>` when held-out
    data is set, for each key the job's method declares it reports (`Method.metrics`)."""
    from ftray.methods import get_method

    out = {"loss"}
    if spec.data.eval:
        out |= {f"eval/{m}" for m in get_method(spec.method.kind).metrics(spec)}
    return out


# ------------------------------------------------------------------------------------------- building


def _base_dict(sweep: SweepSpec) -> dict:
    """The base job with `fixed` and `resources` applied, before any sampled value."""
    base = sweep.base if isinstance(sweep.base, dict) else load_mapping(sweep.base)[0]
    fixed = dict(sweep.fixed)
    if sweep.resources.workers is not None:
        fixed["scaling.num_workers"] = sweep.resources.workers
    if sweep.resources.cpus_per_worker is not None:
        fixed["scaling.cpus_per_worker"] = sweep.resources.cpus_per_worker
    return merge(base, nest(fixed.items()))


def trial_spec(sweep: SweepSpec, config: dict[str, Any], out_dir: str, source: str = "<sweep>") -> JobSpec:
    """The job a trial runs: base + fixed + resources + the sampled values, its own run folder."""
    d = merge(_base_dict(sweep), nest((k, config[k]) for k in sweep.search if k in config))
    d = merge(d, {"output": {"dir": out_dir}})
    out = d.get("output") or {}
    if out.get("publish_to"):
        # Trials publish side by side: the base job's name (or `publish_name`) is every trial's, and they would
        # overwrite one another's adapter under one name. Each gets `<name>-<trial folder>`, where name is the
        # base job's `publish_name`, else its `name`, else the sweep's.
        stem = out.get("publish_name") or d.get("name") or sweep.sweep_name
        d = merge(d, {"output": {"publish_name": f"{stem}-{out_dir.rstrip('/').rsplit('/', 1)[-1]}"}})
    if not (d.get("data") or {}).get("cache_dir"):
        # One data cache for the whole sweep (and for best.yaml), not one per trial folder.
        d = merge(d, {"data": {"cache_dir": storage.join(sweep.output.dir, ".ftray-cache")}})
    return resolve_paths(spec_from_dict(d, source))


def sample_points(sweep: SweepSpec) -> list[dict[str, Any]]:
    """Configs that together touch every bound and listed value of every search key: the first edge
    value of every other key, varied one key at a time."""
    first = {k: d.edge_values()[0] for k, d in sweep.search.items()}
    points = [first]
    for k, d in sweep.search.items():
        points += [{**first, k: v} for v in d.edge_values()[1:]]
    return points


# ------------------------------------------------------------------------------------------- checks


def _check(sweep: SweepSpec, where: dict[str, str]) -> list[JobSpec]:
    """Every check that needs no Ray. Returns the jobs of the sample points (the first: every key at
    its first value)."""

    def at(key: str) -> str:
        return where.get(key, where[""])

    points = sample_points(sweep)
    specs = []
    for point in points:
        try:
            specs.append(trial_spec(sweep, point, storage.join(sweep.output.dir, "trials", "_check")))
        except SpecError as e:
            msg = str(e).split(": ", 1)[-1]
            named = [k for k in sweep.search if msg.startswith((f"unknown key `{k}`", f"`{k}`"))]
            varied = [k for k in sweep.search if point[k] != points[0][k]]
            key = (named or varied or [None])[0]
            if key is None:
                raise SpecError(f"{at('base')}: the base job with the first value of every search key: {msg}") from None
            raise SpecError(f"{at('search.' + key)}: `search.{key}` = {point[key]!r}: {msg}") from None
    job = specs[0]

    for s in specs:
        have = reported_metrics(s)
        if sweep.metric not in have:
            raise SpecError(
                f"{at('metric')}: `metric: {sweep.metric}` is not reported by `{s.method.kind}` jobs "
                f"{'with `data.eval` ' if s.data.eval else 'without `data.eval` '}"
                f"(reported: {', '.join(sorted(have))})"
            )
        if sweep.metric.startswith("eval/") and sweep.scheduler.kind != "none":
            t = s.train
            if not t.eval_every:
                raise SpecError(
                    f"{at('metric')}: `{sweep.metric}` drives early stopping only if the job evaluates during "
                    "training: set `train.eval_every` (in the base job or `fixed`)"
                )
            if t.eval_every % t.log_every:
                raise SpecError(
                    f"{at('metric')}: the loop reports to Ray every `train.log_every` ({t.log_every}) steps, so "
                    f"`train.eval_every` ({t.eval_every}) must be a multiple of it for `{sweep.metric}` to reach Tune"
                )

    sch = sweep.scheduler
    if sch.kind == "pbt":
        _check_pbt(sweep, job, at)
    elif sch.mutate is not None or sch.perturbation_interval is not None or sch.synch:
        raise SpecError(f"{at('scheduler')}: `scheduler.mutate` / `perturbation_interval` / `synch` are for `kind: pbt`")
    if sch.kind in ("asha", "hyperband"):
        searched_len = {"train.max_steps", "train.epochs"} & set(sweep.search)
        if sch.max_t is None and (job.train.max_steps is None or searched_len):
            raise SpecError(
                f"{at('scheduler')}: set `scheduler.max_t` (the steps of a full trial): the job's "
                "`train.max_steps` is unset or searched"
            )
        max_t = sch.max_t or job.train.max_steps
        if sch.grace_period >= max_t:
            raise SpecError(
                f"{at('scheduler')}: `scheduler.grace_period` ({sch.grace_period}) must be below the full "
                f"trial's {max_t} steps, or no trial can be stopped early"
            )

    kinds = {k: d.kind for k, d in sweep.search.items()}
    if sweep.search_alg == "grid":
        bad = [k for k, kind in kinds.items() if kind not in ("grid", "choice")]
        if bad:
            raise SpecError(
                f"{at('search.' + bad[0])}: `search_alg: grid` enumerates values; `search.{bad[0]}` is "
                f"`{kinds[bad[0]]}` (use `grid` or `choice`)"
            )
    if sweep.search_alg == "optuna":
        bad = [k for k, kind in kinds.items() if kind == "grid"]
        if bad:
            raise SpecError(
                f"{at('search.' + bad[0])}: `search_alg: optuna` samples; use `choice` instead of `grid` "
                f"for `search.{bad[0]}`"
            )
    return specs


# Fields the loop can change between two steps of one run: it takes them from the job over the values
# restored with a checkpoint. Anything else (LoRA rank, model, data) shapes the weights or the data order.
PBT_MUTABLE = ("train.lr", "train.weight_decay")


def pbt_mutations(sweep: SweepSpec) -> list[str]:
    sch = sweep.scheduler
    return list(sch.mutate) if sch.mutate is not None else [k for k in sweep.search if k in PBT_MUTABLE]


def pbt_interval(sweep: SweepSpec, job: JobSpec) -> tuple[int, int, str]:
    """(perturbation interval, report interval of the metric, the field that sets it): the metric reaches
    Tune at evaluations (eval/ metrics) or at log steps (training metrics)."""
    t = job.train
    every, what = (t.eval_every, "train.eval_every") if sweep.metric.startswith("eval/") else (t.log_every, "train.log_every")
    return sweep.scheduler.perturbation_interval or every, every, what


def _check_pbt(sweep: SweepSpec, job: JobSpec, at) -> None:
    t = job.train
    keys = pbt_mutations(sweep)
    for k in keys:
        if k not in sweep.search:
            raise SpecError(f"{at('scheduler')}: `scheduler.mutate`: `{k}` is not a `search` key")
        if k not in PBT_MUTABLE:
            raise SpecError(
                f"{at('scheduler')}: `scheduler.mutate`: PBT cannot change `{k}` in a running trial (it can "
                f"change {', '.join(f'`{m}`' for m in PBT_MUTABLE)}); search it without mutating it"
            )
    if not keys:
        raise SpecError(
            f"{at('scheduler')}: `scheduler.kind: pbt` needs a searched key to mutate: search one of "
            f"{', '.join(f'`{m}`' for m in PBT_MUTABLE)}"
        )
    if sweep.search_alg != "random":
        raise SpecError(f"{at('search_alg')}: `scheduler.kind: pbt` samples its population at random; use "
                        "`search_alg: random`")
    if any(k in sweep.search for k in ("train.max_steps", "train.epochs")):
        raise SpecError(f"{at('scheduler')}: PBT trials share checkpoints, so they need one length: do not "
                        "search `train.max_steps` / `train.epochs`")
    interval, every, what = pbt_interval(sweep, job)
    if interval % every:
        raise SpecError(
            f"{at('scheduler')}: `scheduler.perturbation_interval` ({interval}) must be a multiple of "
            f"`{what}` ({every}): PBT compares trials on `{sweep.metric}`"
        )
    if not t.checkpoint_every or every % t.checkpoint_every:
        raise SpecError(
            f"{at('scheduler')}: PBT copies the checkpoint of each `{sweep.metric}` report: set "
            f"`train.checkpoint_every` to `{what}` ({every}) or a divisor of it (in the base job or `fixed`)"
        )
    n = sweep.trial_count()
    if n < 2:
        raise SpecError(f"{at('num_samples')}: PBT needs a population of at least 2 trials")
    if n > sweep.max_concurrent_trials:
        # Tune would run the population in turns, pausing trials at perturbations: each pause restarts a
        # Ray Train run (workers, DeepSpeed) from its checkpoint, and later trials meet only each other.
        raise SpecError(
            f"{at('max_concurrent_trials')}: PBT's population is the trials that train together: set "
            f"`max_concurrent_trials` to the {n} trials (and `resources` so that they fit the cluster)"
        )


def sweep_from_dict(
    raw: dict, source: str = "<sweep>", lines: dict | None = None
) -> tuple[SweepSpec, list[JobSpec]]:
    """Validate a sweep mapping; returns (sweep, the jobs of its sample points)."""
    lines = lines or {}
    try:
        sweep = SweepSpec.model_validate(coerce_floats(raw))
    except ValidationError as err:
        raise SpecError(format_error(err, source, lines, hidden=lambda part: isinstance(part, int))) from None
    where = {"": source}
    for path, line in lines.items():
        if len(path) <= 2 and all(isinstance(p, str) for p in path):
            where[".".join(path)] = f"{source}:{line}"
    if isinstance(sweep.base, str):
        # A relative base path is relative to the sweep file (then to the cwd, as `ftray train` reads it).
        if "://" not in sweep.base and not os.path.isabs(sweep.base) and source != "<sweep>":
            beside = Path(source).parent / sweep.base
            if beside.exists() and not Path(sweep.base).exists():
                sweep = sweep.model_copy(update={"base": str(beside)})
    return sweep, _check(sweep, where)


def load_sweep(path: str | os.PathLike, overrides: list[str] | None = None) -> tuple[SweepSpec, list[JobSpec]]:
    """Read and validate a sweep spec YAML; the sweep folder is made absolute. `overrides` (`ftray tune
    --set KEY=VALUE`, parsed as `ftray train --set`): a key under a sweep field (`output.dir`,
    `num_samples`, `scheduler.grace_period`, ...) sets it; any other key is a job field, fixed for every
    trial (`train.max_steps=50` → `fixed: {train.max_steps: 50}`)."""
    raw, lines = load_mapping(path, "sweep spec")
    sweep_items, job_items = [], []
    for key, value in override_items(overrides or []):
        (sweep_items if key.split(".", 1)[0] in SweepSpec.model_fields else job_items).append((key, value))
    raw = merge(raw, nest(sweep_items, "--set {}"))
    if job_items:
        raw["fixed"] = {**(raw.get("fixed") or {}), **dict(job_items)}
    sweep, jobs = sweep_from_dict(raw, str(path), lines)
    out = sweep.output.dir
    if "://" not in out:
        sweep = sweep.model_copy(update={"output": SweepOutput(dir=str(Path(out).expanduser().resolve()))})
    # Tune runs each trial in its own folder: a base job given by path (and the relative paths in it) is
    # read here, against this process's working directory, and travels inline.
    base = sweep.base if isinstance(sweep.base, dict) else load_mapping(sweep.base)[0]
    return sweep.model_copy(update={"base": absolute_paths(base)}), jobs
