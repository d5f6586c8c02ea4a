"""Turn run folders into a serve config (`ftray serve RUN [RUN...]`). No Ray, no torch weights read.

A run is served as what its method made it (`spec.method.kind` in run.json, read through
`ftray.runs.RunFolder`): `classify` → a classifier (`/v1/classify`, its label names), `reward` → a
reward model (`/v1/rewards`), `contrastive` / `cluster` → an embedding model (`/v1/embeddings`), each
with its adapter merged when it has one; `sft`, `causal_lm`, `dpo`, `grpo`, `ppo` → generation.
Generation adapters are grouped by their base: each base becomes one generation model named `--name`
(or the base folder's name) and each run one adapter named after its folder. `masked_lm`,
`sentence_order` and `seq2seq` runs are refused with the reason. A folder without run.json (a plain
model) is judged by its architecture: `*ForSequenceClassification` → classifier or reward (1 label),
else generation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ftray import storage
from ftray.models.load import ModelError, resolve
from ftray.runs import RunFolder

__all__ = ["config_from_runs", "GENERATION", "SCORERS", "NOT_SERVED"]

GENERATION = ("sft", "causal_lm", "dpo", "grpo", "ppo")
SCORERS = {"classify": "classifier", "reward": "reward", "contrastive": "embedding", "cluster": "embedding"}
NOT_SERVED = {
    "masked_lm": "a masked-LM encoder fills in masked tokens, which no endpoint here serves; serve its model/ "
    "as embeddings (`--embedding RUN/model`) or continue from it with classify or contrastive",
    "sentence_order": "its head predicts how a text's sentences were shuffled, which no endpoint here serves; "
    "continue from it with classify or contrastive",
    "seq2seq": "an encoder-decoder model; `ftray serve` generates with decoder-only models",
}


def _name(path: str) -> str:
    n = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(str(path).rstrip("/")).name).strip("-.") or "model"
    return n[:64]


def config_from_runs(
    runs: list[str], name: str | None = None, registry: list[str] | None = None, embedding: list[str] | None = None
) -> dict:
    bases: dict[str, dict] = {}
    scorers: list[dict] = []
    for run in runs:
        kind = RunFolder(run).method()
        if kind in NOT_SERVED:
            raise ModelError(f"run {run}: a `{kind}` run is not served: {NOT_SERVED[kind]}")
        if kind in SCORERS:
            resolve(run, field=f"run {run}")  # complete and loadable
            scorers.append({"name": _name(run), "path": run, "kind": SCORERS[kind]})
            continue
        r = resolve(run, field=f"run {run}")
        if r.adapter:
            g = bases.setdefault(r.base, {"name": name or _name(r.base), "base": r.base, "adapters": {}, "registry": []})
            g["adapters"][_name(run)] = run
            continue
        cfg = json.loads(storage.read_text(storage.file_in(r.base, "config.json")))
        arch = (cfg.get("architectures") or [""])[0]
        if kind is None and arch.endswith("ForSequenceClassification"):
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
