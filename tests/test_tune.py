"""Sweeps: the sweep spec's checks (no Ray), then real Tune sweeps whose trials are Ray Train jobs on the
nano model (ASHA early stopping, best.yaml reproducing its trial, PBT's exploit, resume after a kill, bad
input refused before any trial starts). Their trials run 1 Ray Train worker each: what they check is Tune's,
and each start of a 2-worker trial costs ~10-45 s more on this 2-core machine (PBT with 2-worker trials took
175 s, with 1 82 s). Sweeps of 2-worker trials: `benchmarks/tune_pbt.py` (jobs/sweep_pbt.yaml)."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ftray.config import SpecError, load_spec
from ftray.tune.spec import sample_points, sweep_from_dict
from ftray.tune.sweep import check_resources
from tests._specs import ROOT, assert_no_credentials_in_runtime_envs, job_dict

FAKE = Path("/nonexistent")


def sweep_dict(base: dict, out: Path, **over) -> dict:
    d = {
        "base": base,
        "fixed": {"train.max_steps": 8, "train.eval_every": 2, "train.log_every": 2},
        "search": {"train.lr": {"loguniform": [1e-4, 3e-2]}, "adapter.r": {"choice": [2, 4, 8]}},
        "metric": "eval/eval_loss",
        "mode": "min",
        "scheduler": {"kind": "asha", "grace_period": 2, "reduction_factor": 2},
        "num_samples": 8,
        "max_concurrent_trials": 1,
        "resources": {"workers": 2, "cpus_per_worker": 0.9},
        "output": {"dir": str(out)},
    }
    d.update(over)
    return d


def fake_base(**over) -> dict:
    return job_dict(FAKE / "model", FAKE / "train.jsonl", FAKE / "test.jsonl", FAKE / "out", FAKE / "cache", **over)


# ----------------------------------------------------------------------------- unit: no Ray


def test_valid_sweep_checks_every_bound_and_value(tmp_path):
    sweep, jobs = sweep_from_dict(sweep_dict(fake_base(), tmp_path))
    # 1 (every key at its first value) + the other loguniform bound + 2 more choices.
    assert len(sample_points(sweep)) == len(jobs) == 4
    assert {j.adapter.r for j in jobs} == {2, 4, 8} and {j.train.lr for j in jobs} == {1e-4, 3e-2}
    assert all(j.scaling.num_workers == 2 and j.scaling.cpus_per_worker == 0.9 for j in jobs)
    assert all(j.train.max_steps == 8 for j in jobs)
    assert jobs[0].data.cache_dir == str(FAKE / "cache")


def test_trials_publish_under_their_own_names(tmp_path):
    """A base job that publishes its adapter (`output.publish_to`): each trial under its own name, or they would
    overwrite one another's versions under the base job's one name."""
    from ftray.tune.spec import trial_spec

    for over, stem in (({"output__publish_name": "live"}, "live-"), ({"name": "sft"}, "sft-"), ({}, "sweep-")):
        name = over.pop("name", None)
        base = {**fake_base(output__publish_to=str(tmp_path / "registry"), **over), **({"name": name} if name else {})}
        sweep, jobs = sweep_from_dict(sweep_dict(base, tmp_path / "sweep"))
        names = [trial_spec(sweep, {}, str(tmp_path / "sweep" / "trials" / t)).output.publish_name for t in ("a_1", "a_2")]
        assert names == [f"{stem}a_1", f"{stem}a_2"], (over, names)
    plain, _ = sweep_from_dict(sweep_dict(fake_base(), tmp_path / "plain"))
    assert trial_spec(plain, {}, str(tmp_path / "t" / "a_1")).output.publish_to is None


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["search"].update({"train.learning_rate": {"choice": [1e-3]}}),
         "`search.train.learning_rate` = 0.001: unknown key `train.learning_rate`; did you mean `train.lr`?"),
        (lambda d: d.update(metric="eval/accuracy"), "`metric: eval/accuracy` is not reported by `sft` jobs"),
        (lambda d: d["search"].update({"train.lr": {"loguniform": [0, 1e-2]}}),
         "`search.train.lr`: `loguniform` bounds must be > 0, got low 0.0"),
        (lambda d: d["search"].update({"train.lr": {"uniform": [1e-2, 1e-3]}}), "`uniform` needs low < high"),
        (lambda d: d["search"].update({"adapter.r": {"choice": [4, 0]}}),
         "`search.adapter.r` = 0: `adapter.r`: Input should be greater than or equal to 1"),
        (lambda d: d["search"].update({"train.lr": {"uniform": [0, 1e-2]}}),
         "`search.train.lr` = 0.0: `train.lr`: Input should be greater than 0"),
        (lambda d: d["search"].update({"train.lr": {"logunifrom": [1e-4, 1e-2]}}),
         "unknown key `search.train.lr.logunifrom`"),
        (lambda d: d["search"].update({"train.lr": {"loguniform": [1e-4, 1e-2], "choice": [1]}}),
         "exactly one of"),
        (lambda d: d["fixed"].update({"train.eval_every": 3}), "must be a multiple of it"),
        (lambda d: d["fixed"].pop("train.eval_every"), "set `train.eval_every`"),
        (lambda d: d.update(search_alg="grid"), "`search_alg: grid` enumerates values"),
        (lambda d: (d["scheduler"].update(kind="pbt"), d.update(max_concurrent_trials=8)),
         "PBT copies the checkpoint of each"),
        (lambda d: (d["scheduler"].update(kind="pbt", mutate=["adapter.r"]), d["fixed"].update({"train.checkpoint_every": 2}), d.update(max_concurrent_trials=8)),
         "PBT cannot change `adapter.r` in a running trial"),
        (lambda d: (d["scheduler"].update(kind="pbt", mutate=["train.weight_decay"]), d["fixed"].update({"train.checkpoint_every": 2}), d.update(max_concurrent_trials=8)),
         "`scheduler.mutate`: `train.weight_decay` is not a `search` key"),
        (lambda d: (d["scheduler"].update(kind="pbt", perturbation_interval=3), d["fixed"].update({"train.checkpoint_every": 2}), d.update(max_concurrent_trials=8)),
         "`scheduler.perturbation_interval` (3) must be a multiple of `train.eval_every` (2)"),
        (lambda d: (d["scheduler"].update(kind="pbt"), d["fixed"].update({"train.checkpoint_every": 2}), d.update(num_samples=1)),
         "PBT needs a population of at least 2 trials"),
        (lambda d: d["scheduler"].update(mutate=["train.lr"]), "are for `kind: pbt`"),
        (lambda d: d["scheduler"].update(synch=True), "are for `kind: pbt`"),
        (lambda d: (d["scheduler"].update(kind="pbt"), d["fixed"].update({"train.checkpoint_every": 2})),
         "set `max_concurrent_trials` to the 8 trials"),
        (lambda d: d["scheduler"].update(grace_period=8), "must be below the full trial's 8 steps"),
        (lambda d: d.update(bogus=1), "unknown key `bogus`"),
    ],
)
def test_bad_sweeps_are_refused_naming_the_key(tmp_path, change, message):
    d = sweep_dict(fake_base(), tmp_path)
    change(d)
    with pytest.raises(SpecError) as e:
        sweep_from_dict(d)
    assert message in str(e.value), str(e.value)


def test_metric_depends_on_the_method(tmp_path):
    d = sweep_dict(fake_base(), tmp_path, metric="eval/exact_match", mode="max")
    with pytest.raises(SpecError, match="reported: eval/eval_loss, eval/perplexity, loss"):
        sweep_from_dict(d)
    d["fixed"]["method.exact_match"] = True
    sweep_from_dict(d)
    no_eval = sweep_dict(fake_base(), tmp_path, metric="eval/perplexity")
    no_eval["fixed"]["data.eval"] = None
    with pytest.raises(SpecError, match="without `data.eval`"):
        sweep_from_dict(no_eval)
    sweep_from_dict({**sweep_dict(fake_base(), tmp_path), "metric": "loss"})


def test_errors_name_the_sweep_file_and_line(tmp_path):
    from ftray.tune.spec import load_sweep

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(fake_base()))
    d = sweep_dict("base.yaml", tmp_path / "out")
    d["search"]["train.lr"] = {"loguniform": [-1e-3, 1e-2]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(SpecError) as e:
        load_sweep(tmp_path / "sweep.yaml")  # base.yaml is found beside the sweep file
    line = next(i for i, s in enumerate((tmp_path / "sweep.yaml").read_text().splitlines(), 1) if "train.lr" in s)
    assert str(e.value).startswith(f"{tmp_path / 'sweep.yaml'}:{line}: `search.train.lr`"), str(e.value)


def test_too_many_concurrent_trials_for_the_cluster(tmp_path):
    sweep, jobs = sweep_from_dict(sweep_dict(fake_base(), tmp_path, max_concurrent_trials=2))
    check_resources(sweep, jobs, {"CPU": 4.0})  # 2 x (2 x 0.9 + 0.1) = 3.8
    with pytest.raises(SpecError, match=r"needs 3.8 CPUs .* the cluster has 3; lower it to 1"):
        check_resources(sweep, jobs, {"CPU": 3.0})


def test_a_sweep_on_a_folder_another_run_holds_is_refused_before_ray(tmp_path, ray_down):
    """One sweep driver per folder (its lease: ftray/train/lease.py); a second `ftray tune` on it is refused
    before Ray starts. A killed sweep's lease does not block its resume (the test at the end of this file)."""
    from ftray.train.lease import Lease
    from ftray.tune import run_sweep

    out = tmp_path / "sweep"
    sweep, jobs = sweep_from_dict(sweep_dict(fake_base(), out))
    with Lease(str(out)), pytest.raises(SpecError, match=rf"^output.dir: {out} is in use by another run \(pid {os.getpid()} "):
        run_sweep(sweep, jobs)
    assert not ray_down.is_initialized()


def test_schedulers_and_search_algorithms_build(tmp_path):
    from ray import tune
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    from ftray.tune.sweep import _scheduler, _search_alg, param_space

    d = sweep_dict(fake_base(), tmp_path)
    d["search"]["adapter.dropout"] = {"grid": [0.0, 0.1]}
    d["search"]["train.seed"] = {"randint": [0, 3]}
    sweep, jobs = sweep_from_dict(d)
    space = param_space(sweep)
    assert isinstance(space["train.lr"], tune.search.sample.Float) and space["adapter.dropout"] == {"grid_search": [0.0, 0.1]}
    asha = _scheduler(sweep, jobs)
    assert isinstance(asha, AsyncHyperBandScheduler) and asha._max_t == 8 and asha._time_attr == "step"
    hb = sweep.model_copy(update={"scheduler": sweep.scheduler.model_copy(update={"kind": "hyperband", "brackets": 2})})
    assert len(_scheduler(hb, jobs)._brackets) == 2
    none = sweep.model_copy(update={"scheduler": sweep.scheduler.model_copy(update={"kind": "none"})})
    assert isinstance(_scheduler(none, jobs), FIFOScheduler)
    assert _search_alg(sweep).max_concurrent == 1
    grid = sweep_from_dict({**sweep_dict(fake_base(), tmp_path, search_alg="grid"),
                            "search": {"adapter.r": {"choice": [2, 4]}, "train.lr": {"grid": [1e-3, 1e-2]}}})[0]
    assert param_space(grid)["adapter.r"] == {"grid_search": [2, 4]}
    pbt_d = sweep_dict(fake_base(), tmp_path, scheduler={"kind": "pbt", "perturbation_interval": 4},
                       max_concurrent_trials=8)
    pbt_d["fixed"]["train.checkpoint_every"] = 2
    pbt_sweep, pbt_jobs = sweep_from_dict(pbt_d)
    pbt = _scheduler(pbt_sweep, pbt_jobs)
    # Only the lr is mutated by default: the LoRA rank shapes the weights, so it is copied with them.
    from ray.tune.schedulers import PopulationBasedTraining

    assert isinstance(pbt, PopulationBasedTraining) and list(pbt._hyperparam_mutations) == ["train.lr"]
    assert pbt._perturbation_interval == 4 and pbt._time_attr == "step" and not pbt._synch
    pytest.importorskip("optuna", reason="`search_alg: optuna` needs the optuna package")
    d.pop("search")
    opt = sweep_from_dict({**d, "search": {"train.lr": {"loguniform": [1e-4, 1e-2]}}, "search_alg": "optuna"})[0]
    assert type(_search_alg(opt)).__name__ == "OptunaSearch"


def test_a_sweep_metric_is_checked_against_what_the_method_reports():
    """Each method declares the keys its evaluation reports (`Method.metrics`): a classify sweep on
    eval/accuracy is valid, a dpo sweep on eval/perplexity (which it never reports) is refused."""
    from ftray.config import spec_from_dict
    from ftray.tune.spec import reported_metrics
    from tests._specs import method_spec

    lora = {"kind": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}

    def base(kind, **over):
        return method_spec(kind, FAKE / "m", FAKE / "t.jsonl", FAKE / "e.jsonl", FAKE / "o", lora, **over)

    def job(kind, **over):
        return spec_from_dict(base(kind, **over))

    assert {"eval/accuracy", "eval/macro_f1", "eval/eval_loss"} <= reported_metrics(job("classify"))
    assert "eval/perplexity" not in reported_metrics(job("dpo")) and "eval/reward_accuracy" in reported_metrics(job("dpo"))
    assert "eval/exact_match" in reported_metrics(spec_from_dict(fake_base(method__exact_match=True)))
    assert "eval/exact_match" not in reported_metrics(spec_from_dict(fake_base(method__exact_match=False)))
    assert reported_metrics(job("classify", data__eval=None)) == {"loss"}
    d = sweep_dict(fake_base(), FAKE / "sweep", metric="eval/accuracy", mode="max")
    d["base"] = base("classify")
    d["search"] = {"train.lr": {"loguniform": [1e-4, 1e-2]}}
    sweep_from_dict(d)
    d["base"] = base("dpo")
    d["metric"] = "eval/perplexity"
    with pytest.raises(SpecError, match=r"`metric: eval/perplexity` is not reported by `dpo` jobs"):
        sweep_from_dict(d)


def test_tune_set_overrides_sweep_fields_and_fixes_job_fields(tmp_path, tiny_model, arith, capsys):
    """`ftray tune --set`, parsed as `ftray train --set`: a sweep field is set, a job field is fixed for
    every trial; a bad key or value is one line naming it."""
    from ftray.cli import main
    from ftray.tune.spec import load_sweep

    d = sweep_dict(real_base(tiny_model, arith, tmp_path / "cache"), tmp_path / "out")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(d))
    sweep, jobs = load_sweep(tmp_path / "sweep.yaml", [f"output.dir={tmp_path / 'other'}", "num_samples=3",
                                                       "scheduler.grace_period=4", "train.max_steps=16", "train.warmup_steps=2"])
    assert sweep.output.dir == str(tmp_path / "other") and sweep.num_samples == 3 and sweep.scheduler.grace_period == 4
    assert sweep.fixed["train.max_steps"] == 16 and all(j.train.max_steps == 16 and j.train.warmup_steps == 2 for j in jobs)
    assert main(["tune", str(tmp_path / "sweep.yaml"), "--check", "--set", "num_samples=4"]) == 0
    for bad, says in (("num_samples=many", "num_samples"), ("train.learning_rate=1e-3", "train.learning_rate"),
                      ("num_samples", "expected KEY=VALUE")):
        assert main(["tune", str(tmp_path / "sweep.yaml"), "--check", "--set", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err


def test_shipped_sweeps_validate(tmp_path, tiny_model, arith):
    """`ftray tune jobs/sweep_*.yaml --check` from a folder laid out as `make quickstart-tiny` leaves it (its
    runs/tiny-micro and runs/data built here), so a clean clone checks every shipped sweep."""
    from ftray.cli import main

    (tmp_path / "jobs").symlink_to(ROOT / "jobs")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny-micro").symlink_to(tiny_model)
    (tmp_path / "runs" / "data").symlink_to(Path(arith[0]).parent)
    sweeps = sorted(p.name for p in (ROOT / "jobs").glob("sweep_*.yaml"))
    assert sweeps == ["sweep_lora.yaml", "sweep_pbt.yaml"], sweeps
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        for name in sweeps:
            assert main(["tune", f"jobs/{name}", "--check"]) == 0, name
    finally:
        os.chdir(cwd)


# ----------------------------------------------------------------------------- integration: real sweeps


def real_base(tiny_model, arith, cache_dir) -> dict:
    return job_dict(tiny_model, arith[0], arith[1], FAKE / "unused", cache_dir)


ASHA_STEPS = 8  # rungs at steps 2 and 4
ASHA_LRS = [1e-2, 1e-4]  # the first learns; the second barely moves (its step-2 loss is worse)


@pytest.fixture(scope="module")
def asha_sweep(tmp_path_factory, tiny_model, arith, cache_dir, ray_local, mlflow_server):
    from ftray.tune import run_sweep

    out = tmp_path_factory.mktemp("sweep") / "asha"
    # What this checks is Tune's scheduling (trials stopped early, results, best.yaml): 1-worker trials (the
    # best trial's curve is then this process's to 1e-6), one at a time, in grid order, so the trial that learns
    # reaches each rung first and the one that barely moves is cut at its first rung. Trials at once left the
    # cut to the order in which their step-2 results arrived: bad trials first, none was stopped (CI,
    # 2026-12-03). The machine's speed does not matter: a trial's report to Tune blocks until Tune has taken it
    # (and ASHA decided), so no trial reports its end before the rung's decision. Multi-worker trials: the
    # module docstring. Every trial reports to MLflow as a
    # child of the sweep's run, and to W&B (offline, into out/../wandb) in the sweep's group: from Tune's
    # trial actors and Ray Train workers, whose environment is not this process's.
    base = real_base(tiny_model, arith, cache_dir)
    base["output"].update(trackers=["mlflow", "wandb"], tracking_uri=mlflow_server, experiment="ftray-tests-sweep")
    d = sweep_dict(base, out, search_alg="grid", num_samples=1, max_concurrent_trials=1,
                   search={"train.lr": {"grid": ASHA_LRS}, "adapter.r": {"choice": [4]}},
                   resources={"workers": 1, "cpus_per_worker": 0.9})
    d["fixed"]["train.max_steps"] = ASHA_STEPS
    sweep, jobs = sweep_from_dict(d)
    t0 = time.time()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(out.parent))
        summary = run_sweep(sweep, jobs)
    summary["elapsed"] = time.time() - t0
    return sweep, summary, out


@pytest.mark.integration
def test_asha_sweep_stops_losing_trials_early(asha_sweep):
    sweep, s, out = asha_sweep
    print(f"ASHA sweep: {s['trials']} trials x 1 worker, {s['stopped_early']} stopped early, "
          f"{s['total_steps']} steps of {ASHA_STEPS * s['trials']}, {s['elapsed']:.0f} s")
    assert s["trials"] == len(ASHA_LRS) and s["failed"] == 0
    rows = s["rows"]
    assert [r["params"]["train.lr"] for r in rows if r["status"] == "completed"] == [ASHA_LRS[0]]
    assert s["stopped_early"] == len(ASHA_LRS) - 1 and s["total_steps"] < ASHA_STEPS * len(ASHA_LRS)
    for name in ("results.csv", "results.md", "best.yaml", "sweep.png"):
        assert (out / name).exists(), name
    for r in rows:
        assert Path(r["run"]).is_dir(), r["run"]
        assert (Path(r["run"]) / "run.json").exists() == (r["status"] == "completed")
        assert r["steps"] == (ASHA_STEPS if r["status"] == "completed" else r["history"][-1][0])
        assert r["steps"] < ASHA_STEPS or r["status"] == "completed"
    md = (out / "results.md").read_text()
    assert "stopped early by asha at step" in md and s["best_trial"] in md


@pytest.mark.integration
def test_each_trial_is_a_child_of_the_sweeps_mlflow_run(asha_sweep, mlflow_server):
    from mlflow import MlflowClient

    _, s, out = asha_sweep
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("ftray-tests-sweep").experiment_id
    (parent,) = client.search_runs([exp], filter_string=f"tags.`ftray.output_dir` = '{out}'")
    assert parent.data.tags["ftray.kind"] == "sweep" and parent.info.status == "FINISHED"
    assert parent.data.params["metric"] == "eval/eval_loss" and parent.data.params["scheduler.kind"] == "asha"
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_dir = {c.data.tags["ftray.output_dir"]: c for c in children}
    assert set(by_dir) == {r["run"] for r in s["rows"]}  # one child per trial, in the trial's run folder
    for r in s["rows"]:
        child = by_dir[r["run"]]
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "loss"))
        # Every step it reported (a trial stopped early may have trained a step more before it was stopped).
        assert steps[: r["steps"]] == list(range(1, r["steps"] + 1)), (r["trial"], steps)
        assert r["status"] != "completed" or len(steps) == r["steps"]
        # Completed: closed with its run folder; stopped early by ASHA: closed by the sweep as KILLED.
        assert child.info.status == ("FINISHED" if r["status"] == "completed" else "KILLED"), r
        assert child.data.params["train.lr"] == str(r["params"]["train.lr"])


@pytest.mark.integration
def test_each_trial_is_a_wandb_run_in_the_sweeps_group(asha_sweep):
    """W&B offline: one run per trial (its id from the trial's folder), grouped under the sweep, with every
    step it trained; a completed trial's run ends with its run folder as an artifact and exit code 0. A
    trial stopped by ASHA loses its process mid-run: what wandb had written of it, if anything, is kept."""
    from tests._wandb import history_rows, records_of, wandb_records

    _, s, out = asha_sweep
    runs = wandb_records(out.parent)
    by_dir = {}
    for parts in runs.values():
        (run,) = records_of(parts[0], "run")
        assert (run.run_group, run.job_type, run.project) == ("asha", "trial", "ftray-tests-sweep")
        config = {c.key: json.loads(c.value_json) for r in [run, *records_of(parts[0], "config")] for c in r.config.update}
        by_dir[config["output.dir"]] = parts
    done = {r["run"] for r in s["rows"] if r["status"] == "completed"}
    assert done and done <= set(by_dir) <= {r["run"] for r in s["rows"]}
    for run_dir in done:
        r = next(r for r in s["rows"] if r["run"] == run_dir)
        parts = by_dir[run_dir]
        steps = sorted(k for k, row in history_rows(parts[0]).items() if "loss" in row)
        assert steps == list(range(1, r["steps"] + 1)), (r["trial"], steps)
        assert len(parts) == 2 and [e.exit_code for p in parts for e in records_of(p, "exit")] == [0, 0]
        (art,) = records_of(parts[1], "artifact")
        assert "run.json" in {m.path for m in art.manifest.contents}


@pytest.mark.integration
def test_best_yaml_reproduces_the_trial(asha_sweep, ray_local, tmp_path, monkeypatch):
    from ftray.train.local import run_local

    sweep, s, out = asha_sweep
    monkeypatch.setenv("WANDB_MODE", "offline")  # the sweep's trackers come with the job
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    spec = load_spec(out / "best.yaml")
    assert spec.output.dir == str(out / "best")
    assert spec.train.lr == s["best_params"]["train.lr"] and spec.adapter.r == s["best_params"]["adapter.r"]
    # The loop in this process is the trial's loop (tests/test_train.py: the same curve within 1e-6).
    record = run_local(spec)
    got = record["eval"]["after"]["eval_loss"]
    print(f"best trial {s['best_trial']}: eval_loss {s['best_metric']:.7f}, best.yaml rerun {got:.7f}")
    # Same seed, same data order, 1 worker, fp32 on CPU: the same arithmetic. The trial ran the loop in a
    # Ray Train worker, the rerun in this process (`run_local`, no Ray): one loop, one loss curve.
    assert abs(got - s["best_metric"]) <= 1e-6
    trial = next(Path(r["run"]) for r in s["rows"] if r["trial"] == s["best_trial"])

    def curve(run: Path) -> list[float]:
        return [h["loss"] for h in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in h]

    ray_curve, here_curve = curve(trial), curve(Path(spec.output.dir))
    assert len(here_curve) == ASHA_STEPS and max(abs(a - b) for a, b in zip(ray_curve, here_curve, strict=True)) < 1e-6
    assert record["placement"]["ranks"][0]["node_id"] == "local"


@pytest.mark.integration
def test_too_many_concurrent_trials_refused_before_any_trial(tmp_path, tiny_model, arith, cache_dir, ray_local):
    from ftray.tune import run_sweep

    d = sweep_dict(real_base(tiny_model, arith, cache_dir), tmp_path / "big", max_concurrent_trials=2,
                   resources={"workers": 2, "cpus_per_worker": 1.0})
    sweep, jobs = sweep_from_dict(d)
    t0 = time.time()
    with pytest.raises(SpecError, match=r"needs 4.2 CPUs .* the cluster has 4"):
        run_sweep(sweep, jobs)
    assert time.time() - t0 < 10 and not (tmp_path / "big" / "tune").exists()


@pytest.mark.integration
def test_pbt_trial_continues_the_better_trials_checkpoint_with_a_perturbed_lr(tmp_path, tiny_model, arith, cache_dir, ray_local):
    """Synchronous PBT, population 2, 1 worker per trial: at the perturbation (step 4) the trial behind
    continues the other's checkpoint (its weights, optimizer, data position and LoRA rank) with the other's
    lr x 0.8 or x 1.2, and the loop trains on with that lr; the one ahead continues its own."""
    # Synchronous: asynchronous PBT compares live trials only, and a trial that starts late (its Ray Train
    # workers and DeepSpeed come up seconds after the other's) may find the other finished: no exploit in
    # 1 of about 20 runs, CI's among them. Here each trial waits at step 4 until both are there. 1 worker per
    # trial (the module docstring).
    from ftray.train.loop import lr_lambda
    from ftray.tune import run_sweep

    out = tmp_path / "pbt"
    d = sweep_dict(real_base(tiny_model, arith, cache_dir), out, num_samples=2, max_concurrent_trials=2,
                   scheduler={"kind": "pbt", "perturbation_interval": 4, "resample_probability": 0.0, "synch": True},
                   resources={"workers": 1, "cpus_per_worker": 0.9})
    d["search"] = {"train.lr": {"loguniform": [3e-4, 3e-2]}, "adapter.r": {"choice": [2, 8]}}
    d["fixed"] = {"train.max_steps": 8, "train.eval_every": 4, "train.log_every": 4, "train.checkpoint_every": 4}
    sweep, jobs = sweep_from_dict(d)
    s = run_sweep(sweep, jobs)
    assert s["trials"] == 2 and s["completed"] == 2 and s["failed"] == 0
    rows = {r["trial"]: r for r in s["rows"]}

    def lines(tid, name):
        return [json.loads(x) for x in (Path(rows[tid]["run"]) / name).read_text().splitlines() if x.strip()]

    sched = lr_lambda(jobs[0], 8)  # the schedule's shape; each trial's peak lr scales it
    exploits = 0
    for tid, r in rows.items():
        seg_file = Path(r["run"]) / "segments.json"
        segments = json.loads(seg_file.read_text()) if seg_file.exists() else []
        mine = lines(tid, "metrics.jsonl")
        # An exploit replaces the trial's history with the donor's: the run folder shows the last stretch.
        assert segments[0]["start_step"] == 0 and segments[0]["from_trial"] is None
        for seg, end in zip(segments[-1:], [8], strict=True):
            start, donor = seg["start_step"], seg["from_trial"] or tid
            assert start in (0, 4) and donor in rows, seg
            theirs = lines(donor, "metrics.jsonl")
            # Up to the exploit (or pause) the trial's history is the donor's: it continued that run ...
            upto = [h for h in mine if h["step"] <= start and "loss" in h]
            assert upto == [h for h in theirs if h["step"] <= start and "loss" in h] and len(upto) == start
            # ... then it trained with the stretch's lr on the same schedule.
            new_lr = seg["config"]["train.lr"]
            stretch = [h for h in mine if start < h["step"] <= end and "lr" in h]
            assert stretch and all(abs(h["lr"] - new_lr * sched(h["step"])) < 1e-12 for h in stretch), stretch[:2]
        for seg in segments[1:]:
            start, donor, new_lr = seg["start_step"], seg["from_trial"], seg["config"]["train.lr"]
            if donor != tid:  # an exploit: the donor's lr then, x 0.8 or x 1.2 (no resampling)
                exploits += 1
                theirs = json.loads((Path(rows[donor]["run"]) / "segments.json").read_text())
                donor_lr = [g for g in theirs if g["time"] < seg["time"]][-1]["config"]["train.lr"]
                assert min(abs(new_lr / donor_lr - f) for f in (0.8, 1.2)) < 1e-6, (new_lr, donor_lr)
                print(f"PBT: trial {tid} continued {donor}'s checkpoint at step {start} with lr {new_lr:.4g} "
                      f"(donor {donor_lr:.4g}), r {seg['config']['adapter.r']}")
        if segments:
            assert r["params"] == segments[-1]["config"]  # the trial's final values: its last stretch's
        # The LoRA rank came with the weights: the saved adapter has the trial's final rank.
        assert json.loads((Path(r["run"]) / "adapter" / "adapter_config.json").read_text())["r"] == r["params"]["adapter.r"]
    assert exploits >= 1, "no PBT exploit happened"
    # Tune would copy this process's static S3 keys into each trial actor's runtime_env; the sweep keeps them out.
    assert_no_credentials_in_runtime_envs()
    md = (out / "results.md").read_text()
    assert "Exploits" in md and " of " in md
    assert "# PBT:" in (out / "best.yaml").read_text()


# ----------------------------------------------------------------------------- resume after a kill


def _spawn(sweep_yaml: Path, log: Path, address: str) -> subprocess.Popen:
    # The sweep joins the session's Ray as its own job (a Ray start-up costs 10-30 s on a busy 2-core
    # machine); killing the job's driver ends its trial actors and frees their placement groups.
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "ftray", "tune", str(sweep_yaml)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT,
    )


def _finished_in_state(tune_dir: Path) -> set[str]:
    """Trials the saved experiment state records as TERMINATED (what a restore will not re-run)."""
    done = set()
    for f in tune_dir.glob("experiment_state-*.json"):
        try:
            state = json.loads(f.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        for trial_json, _ in state.get("trial_data", []):
            t = json.loads(trial_json)
            if t.get("status") == "TERMINATED":
                done.add(t["trial_id"])
    return done


@pytest.mark.integration
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, tiny_model, arith, cache_dir, ray_local):
    address = ray_local.get_runtime_context().gcs_address
    out = tmp_path / "resumed"
    # 1 worker per trial keeps this test short: what it checks is Tune's restore, not Train's workers.
    d = sweep_dict(real_base(tiny_model, arith, cache_dir), out, num_samples=2, max_concurrent_trials=1,
                   scheduler={"kind": "none"}, resources={"workers": 1, "cpus_per_worker": 1.0})
    d["fixed"] = {"train.max_steps": 4, "train.eval_every": 2, "train.log_every": 2}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(d))
    first = _spawn(tmp_path / "sweep.yaml", tmp_path / "first.log", address)
    try:
        t0 = time.time()
        while not _finished_in_state(out / "tune"):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() - t0 < 900, "no trial finished in time"
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not (out / "results.csv").exists()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*/run.json")}
    assert finished
    # What a worker killed after writing a checkpoint, before Ray Train registered it, leaves in the trial that
    # did not finish: the resumed trial removes it once its fit ends, as `ftray train` does (Ray deletes only
    # the checkpoints it knows).
    prefix = next(iter(finished)).rsplit("_", 1)[0]  # Tune's trial ids: <experiment>_<index>
    unfinished = [tid for tid in (f"{prefix}_{i:05d}" for i in range(2)) if tid not in finished]
    assert unfinished, finished
    stray = [out / "trials" / tid / "checkpoints" / "checkpoint_2000-01-01_00-00-00.000000" for tid in unfinished]
    for folder in stray:
        folder.mkdir(parents=True)
        (folder / "model.pt").write_bytes(b"written, never reported")
    second = _spawn(tmp_path / "sweep.yaml", tmp_path / "second.log", address)
    assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert not [f for f in stray if f.exists()], stray
    text = (tmp_path / "second.log").read_text()
    assert "resuming" in text
    started_again = {tid for tid in finished if f"trial {tid} started" in text}
    assert not started_again, started_again
    for tid, mtime in finished.items():
        assert (out / "trials" / tid / "run.json").stat().st_mtime_ns == mtime, tid
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows), rows
    assert finished.keys() <= {r["trial"] for r in rows}
    print(f"resume: {len(finished)} finished before the kill, not re-run; 2/2 completed after the rerun")
    assert not math.isnan(float(yaml.safe_load((out / "best.yaml").read_text())["train"]["lr"]))
