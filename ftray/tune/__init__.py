"""Sweeps: a sweep spec (search space over a job spec), a Tune trainable that fits one job per trial,
the Tuner (schedulers, search algorithms, resume) and the results (table, best.yaml, plot)."""

from ftray.tune.spec import SweepSpec, load_sweep, sweep_from_dict
from ftray.tune.sweep import run_sweep

__all__ = ["SweepSpec", "load_sweep", "run_sweep", "sweep_from_dict"]
