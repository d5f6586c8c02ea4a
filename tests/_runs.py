"""The run farm: a test asks for a run by its job spec; each distinct spec is fitted once per session
(in this process, or on the session's Ray) and every test that reads it gets the same run folder."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from tests._specs import run_here, run_ray


class RunFarm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._done: dict[str, tuple[dict, Path]] = {}

    def get(self, d: dict, on_ray: bool = False) -> tuple[dict, Path]:
        """(run.json record, run folder) of the job `d` (its `output.dir` is the farm's choice). `on_ray`:
        through Ray Train (the caller holds the `ray_local` fixture), else in this process."""
        key_src = {**d, "output": {k: v for k, v in d.get("output", {}).items() if k != "dir"}, "_ray": on_ray}
        key = hashlib.sha1(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:12]
        if key not in self._done:
            out = self.root / key
            job = copy.deepcopy(d)
            job.setdefault("output", {})["dir"] = str(out)
            record = run_ray(job) if on_ray else run_here(job)
            self._done[key] = (record, out)
        return self._done[key]
