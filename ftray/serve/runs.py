"""Turn run folders into a serve config (`ftray serve RUN [RUN...]`). No Ray, no torch weights read.

Adapter runs are grouped by their base: each base becomes one generation model named `--name` (or
the base folder's name) and each run one adapter named after its folder. A run with model/ is a
full model: a classifier (several labels) or a reward model (one label) when its architecture is
`*ForSequenceClassification`, else a generation model named after the run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ftray import storage
from ftray.models.load import ModelError, resolve

__all__ = ["config_from_runs"]


def _name(path: str) -> str:
    n = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(str(path).rstrip("/")).name).strip("-.") or "model"
    return n[:64]


def config_from_runs(
    runs: list[str], name: str | None = None, registry: list[str] | None = None, embedding: list[str] | None = None
) -> dict:
    bases: dict[str, dict] = {}
    scorers: list[dict] = []
    for run in runs:
        r = resolve(run, field=f"run {run}")
        if r.adapter:
            g = bases.setdefault(r.base, {"name": name or _name(r.base), "base": r.base, "adapters": {}, "registry": []})
            g["adapters"][_name(run)] = run
            continue
        cfg = json.loads(storage.read_text(storage.join(r.base, "config.json")))
        arch = (cfg.get("architectures") or [""])[0]
        if arch.endswith("ForSequenceClassification"):
            n = len(cfg.get("id2label") or {}) or cfg.get("num_labels", 2)
            scorers.append({"name": _name(run), "path": run, "kind": "reward" if n == 1 else "classifier"})
        else:
            bases.setdefault(r.base, {"name": _name(run), "base": run, "adapters": {}, "registry": []})
    for path in embedding or []:
        scorers.append({"name": _name(path), "path": path, "kind": "embedding"})
    gens = list(bases.values())
    if registry:
        if not gens:
            raise ModelError("--registry needs a base: name at least one adapter run (or a base model)")
        gens[0]["registry"] = list(registry)
    if name and len(gens) > 1:
        raise ModelError(f"--name {name}: the runs have {len(gens)} different bases; serve them separately")
    return {"generation": gens, "scorers": scorers}
