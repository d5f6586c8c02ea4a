"""What a finished sweep leaves in its folder: results.csv, results.md, best.yaml, sweep.png (each
trial's run folder is under trials/<trial id>/, written by the trial itself)."""

from __future__ import annotations

import csv
import io
import json
import math
import re

import yaml

from ftray import storage
from ftray.tune.spec import SweepSpec, trial_spec
from ftray.tune.trial import COMPLETED, SEGMENTS, trial_dir

__all__ = ["collect", "write_results"]


def _trial_id(result) -> str:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return tid
    m = re.search(r"_([0-9a-f]{5}_\d{5})_", str(result.path))
    return m.group(1) if m else str(result.path).rstrip("/").rsplit("/", 1)[-1]


def _tune_status(grid) -> dict[str, str]:
    """Tune's own status per trial id (TERMINATED, ERROR, PENDING...): a trial Tune did not end is
    unfinished (the sweep was interrupted), not stopped early."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    return {t.trial_id: t.status for t in trials}


def collect(sweep: SweepSpec, grid) -> list[dict]:
    """One row per trial: id, status, why it stopped, steps run, metric, params, history."""
    rows = []
    tune_status = _tune_status(grid)
    for r in grid:
        m = r.metrics or {}
        df = r.metrics_dataframe
        hist = []
        if df is not None and sweep.metric in df and "step" in df:
            hist = [(int(s), float(v)) for s, v in zip(df["step"], df[sweep.metric], strict=True)
                    if v == v and s == s]
        tid = _trial_id(r)
        ended = tune_status.get(tid, "TERMINATED") in ("TERMINATED", "ERROR")
        if r.error is not None:
            status, why = "failed", f"error: {str(r.error).strip().splitlines()[-1][:120]}"
        elif m.get(COMPLETED):
            status, why = "completed", "full budget"
        elif not ended or m.get("step") is None:
            status, why = "unfinished", f"sweep interrupted at step {m.get('step') or 0}; rerun to resume"
        else:
            status, why = "stopped", f"stopped early by {sweep.scheduler.kind} at step {m.get('step')}"
        metric = m.get(sweep.metric)
        seg_file = storage.join(trial_dir(sweep.output.dir, tid), SEGMENTS)
        segments = json.loads(storage.read_text(seg_file)) if storage.exists(seg_file) else []
        rows.append({
            "trial": tid,
            "status": status,
            "why": why,
            "steps": int(m.get("step") or 0),
            "metric": float(metric) if isinstance(metric, int | float) else math.nan,
            "params": {k: r.config.get(k) for k in sweep.search},
            "run": trial_dir(sweep.output.dir, tid),
            "history": hist,
            # PBT: each stretch that continued a checkpoint (another trial's after an exploit).
            "continued": [f"step {g['start_step']} of {g['from_trial']}" if g.get("from_trial") != tid
                          else f"restarted at step {g['start_step']}" for g in segments[1:]],
        })
    sign = 1 if sweep.mode == "min" else -1
    order = {"completed": 0, "stopped": 1, "unfinished": 2, "failed": 3}
    rows.sort(key=lambda x: (order[x["status"]], math.inf if math.isnan(x["metric"]) else sign * x["metric"]))
    return rows


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_results(sweep: SweepSpec, grid, wall_s: float) -> dict:
    rows = collect(sweep, grid)
    out = sweep.output.dir
    keys = list(sweep.search)

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "status", "why", "steps", sweep.metric, *keys, "run"])
    for x in rows:
        w.writerow([x["trial"], x["status"], x["why"], x["steps"], x["metric"], *[x["params"][k] for k in keys], x["run"]])
    storage.write_text_atomic(storage.join(out, "results.csv"), buf.getvalue())

    done = [x for x in rows if x["status"] == "completed"]
    best = done[0] if done else next((x for x in rows if not math.isnan(x["metric"])), None)
    summary = {
        "trials": len(rows),
        "completed": len(done),
        "stopped_early": sum(x["status"] == "stopped" for x in rows),
        "failed": sum(x["status"] == "failed" for x in rows),
        "unfinished": sum(x["status"] == "unfinished" for x in rows),
        "total_steps": sum(x["steps"] for x in rows),
        "wall_s": wall_s,
        "best_trial": best["trial"] if best else None,
        "best_metric": best["metric"] if best else math.nan,
        "best_params": best["params"] if best else {},
        "rows": rows,
    }

    s = sweep.scheduler
    md = [
        f"# Sweep `{sweep.sweep_name}`",
        "",
        f"{sweep.metric} ({sweep.mode}), scheduler `{s.kind}`, search `{sweep.search_alg}`: {summary['trials']} trials, "
        f"{summary['completed']} completed, {summary['stopped_early']} stopped early, {summary['failed']} failed, "
        f"{summary['unfinished']} unfinished; "
        f"{summary['total_steps']} training steps in all; {wall_s:.0f} s (this run of the command).",
        "",
        "Completed trials first, then early-stopped ones (their metric is the last one they reported), each "
        "sorted by the metric.",
        "",
        "| # | trial | " + sweep.metric + " | steps | " + " | ".join(f"`{k}`" for k in keys) + " | why stopped |",
        "|---|---|---|---|" + "---|" * len(keys) + "---|",
    ]
    for i, x in enumerate(rows, 1):
        md.append(f"| {i} | {x['trial']} | {_fmt(x['metric'])} | {x['steps']} | "
                  + " | ".join(_fmt(x["params"][k]) for k in keys) + f" | {x['why']} |")
    if s.kind == "pbt":
        md += ["", "PBT: the values above are each trial's last ones. Exploits (a trial continuing another's "
               "checkpoint with perturbed values) and restarts from the trial's own checkpoint (a synchronous PBT's wait at a perturbation, or a resumed sweep); "
               "`trials/<id>/segments.json` has each stretch's values:", ""]
        md += [f"- {x['trial']}: " + (", then ".join(x["continued"]) if x["continued"] else "none") for x in rows]
    if best:
        md += ["", f"Best: trial {best['trial']} ({sweep.metric} {_fmt(best['metric'])}); `best.yaml` is its job "
               f"spec; run folder `{best['run']}`."]
    storage.write_text_atomic(storage.join(out, "results.md"), "\n".join(md) + "\n")

    if best:
        spec = trial_spec(sweep, best["params"], storage.join(out, "best"))
        d = spec.model_dump(mode="json")
        d["name"] = f"{sweep.sweep_name}-best"
        head = (f"# The winner of sweep `{sweep.sweep_name}`: trial {best['trial']}, {sweep.metric} "
                f"{_fmt(best['metric'])} after {best['steps']} steps.\n# Run it: ftray train {storage.join(out, 'best.yaml')}\n")
        if s.kind == "pbt":
            head += (f"# PBT: the trial's weights came from a schedule of values ({best['run']}/{SEGMENTS});\n"
                     f"# this spec trains with its last values from the start. Its trained model: {best['run']}\n")
        storage.write_text_atomic(storage.join(out, "best.yaml"), head + yaml.safe_dump(d, sort_keys=False))
    _plot(sweep, rows, best)
    return summary


def _plot(sweep: SweepSpec, rows: list[dict], best: dict | None) -> None:
    import tempfile
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for x in rows:
        if not x["history"]:
            continue
        steps, vals = zip(*x["history"], strict=True)
        label = f"{x['trial']} " + " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in x["params"].items())
        if x["status"] == "stopped":
            (line,) = ax.plot(steps, vals, "--", alpha=0.7, label=label + " (stopped)")
            ax.plot(steps[-1], vals[-1], "x", color=line.get_color(), markersize=9)
        else:
            ax.plot(steps, vals, "-o", markersize=3, lw=2.5 if best is x else 1.2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(sweep.metric)
    ax.set_title(f"{sweep.sweep_name}: {sweep.metric} per trial (x: stopped early)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "sweep.png"
        fig.savefig(p, dpi=100)
        fs, dst = storage.filesystem(storage.join(sweep.output.dir, "sweep.png"))
        fs.put_file(str(p), dst)
    plt.close(fig)
