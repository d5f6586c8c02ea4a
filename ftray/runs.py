"""The run-folder contract, read and written in one place.

A finished run folder (local or `s3://`) holds:

- `run.json`: written last, by the driver, as the commit marker (`status: completed`); its `spec` is the
  whole resolved job (so `spec.method.kind` says what the run is), `parent_run` its lineage;
- `adapter/` (a peft adapter) or `model/` (a full model), optionally `merged/`, and `tokenizer/`, each
  published whole (a `.complete` marker written last); beside the weights, `ftray_heads.safetensors` holds the
  modules the method adds (ppo's value head; `models.adapters.save_heads` / `load_heads`);
- `metrics.jsonl`, `curves.png`, `tb/`, `checkpoints/`.

Training writes `run.json` through `RunFolder.write_record`; serve, eval and the tests read through
`RunFolder` rather than opening the files themselves. Storage only: no torch, no Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ftray import storage

__all__ = ["RunFolder", "RUN_JSON", "find_runs", "lineage", "summary"]

RUN_JSON = "run.json"


@dataclass(frozen=True)
class RunFolder:
    path: str

    def join(self, *parts: str) -> str:
        return storage.join(self.path, *parts)

    def has_record(self) -> bool:
        """A finished run (its run.json exists); a plain model folder has none."""
        return storage.exists(self.join(RUN_JSON))

    def record(self) -> dict | None:
        return json.loads(storage.read_text(self.join(RUN_JSON))) if self.has_record() else None

    def method(self) -> str | None:
        """The run's method kind (`spec.method.kind`), None for a folder that is not a run."""
        rec = self.record()
        return ((rec or {}).get("spec") or {}).get("method", {}).get("kind")

    def spec(self):
        """The run's resolved job spec (a JobSpec), None for a folder that is not a run."""
        from ftray.config import JobSpec

        rec = self.record()
        return JobSpec.model_validate(rec["spec"]) if rec and rec.get("spec") else None

    def write_record(self, record: dict) -> None:
        """run.json, atomically: a reader sees the whole record or none."""
        storage.write_text_atomic(self.join(RUN_JSON), json.dumps(record, indent=1, default=str))


# The headline metric of a run, by preference: the first of these its final evaluation has.
HEADLINE = ("exact_match", "accuracy", "reward_accuracy", "spearman", "nmi", "masked_accuracy", "chrf", "reward_mean",
            "eval_loss")
RUN_PARTS = {"adapter", "model", "merged", "tokenizer", "tb", "checkpoints", ".ftray-eval", ".ftray-cache"}


def summary(run: RunFolder) -> dict:
    """One row of `ftray runs`: what the run is, where it came from and what it reached."""
    rec = run.record()
    name = run.path.rstrip("/").rsplit("/", 1)[-1]
    if rec is None:  # checkpoints but no run.json: still training, or stopped before its end
        return {"run": run.path, "name": name, "status": "unfinished", "method": None, "adapter": None, "base": None,
                "metric": None, "before": None, "after": None, "parent": None, "when": _when(run.join("checkpoints"))}
    spec = rec.get("spec") or {}
    before, after = (rec.get("eval") or {}).get("before") or {}, (rec.get("eval") or {}).get("after") or {}
    metric = next((k for k in HEADLINE if k in after), None)
    return {
        "run": run.path,
        "name": rec.get("name") or name,
        "status": rec.get("status", "?"),
        "method": (spec.get("method") or {}).get("kind"),
        "adapter": (spec.get("adapter") or {}).get("kind"),
        "base": rec.get("base_model"),
        "metric": metric,
        "before": before.get(metric) if metric else None,
        "after": after.get(metric) if metric else None,
        "parent": rec.get("parent_run"),
        "when": _when(run.join(RUN_JSON)),
    }


def _when(path: str) -> str | None:
    """The modification time of a file or folder, as an ISO timestamp (UTC); None when it is absent."""
    import datetime

    fs, p = storage.filesystem(path)
    try:
        info = fs.info(p)
    except FileNotFoundError:
        return None
    t = info.get("mtime") or info.get("LastModified") or info.get("created")
    if isinstance(t, int | float):
        t = datetime.datetime.fromtimestamp(t, datetime.UTC)
    return t.strftime("%Y-%m-%d %H:%M") if hasattr(t, "strftime") else None


def find_runs(root: str, depth: int = 3) -> list[RunFolder]:
    """Run folders under `root` (itself included), `depth` levels down: a folder with run.json (finished) or
    checkpoints/ (unfinished); a sweep's trials are found under its trials/."""
    found, level = [], [str(root)]
    for _ in range(depth + 1):
        nxt = []
        for folder in level:
            names = storage.listdir(folder)
            if RUN_JSON in names or "checkpoints" in names:
                found.append(RunFolder(folder))
                continue
            nxt += [storage.join(folder, n) for n in names if not n.startswith(".") and n not in RUN_PARTS
                    and storage.isdir(storage.join(folder, n))]
        level = nxt
    return sorted(found, key=lambda r: r.path)


def lineage(run: RunFolder, limit: int = 32) -> list[dict]:
    """The run, its parent run, the parent's parent, ... (as `summary` rows), newest first."""
    chain, seen = [], set()
    current: RunFolder | None = run
    while current is not None and current.path not in seen and len(chain) < limit:
        seen.add(current.path)
        row = summary(current)
        chain.append(row)
        parent = row["parent"]
        current = RunFolder(parent) if parent and storage.exists(storage.join(parent, RUN_JSON)) else None
        if parent and current is None:
            chain.append({"run": parent, "name": parent.rstrip("/").rsplit("/", 1)[-1], "status": "missing"})
    return chain
