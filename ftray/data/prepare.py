"""Prepare a job's data: check rows (driver, before any Ray resource), tokenize and pack (Ray Data),
write token shards (Parquet) cached by a hash of (data bytes, tokenizer files, format, max length,
packing, method).

Layout of one prepared folder:
    train/*.parquet   input_ids, labels[, position_ids], key  (rows sorted by `key` give the order)
    eval/*.parquet    same, never packed (eval loss is per example)
    eval_rows.jsonl   the checked eval rows (for generation-based metrics)
    meta.json         counts: rows, skipped, truncated, dropped, tokens, padding share, written last
"""

from __future__ import annotations

import hashlib
import json

from ftray import storage
from ftray.data.encode import ensure_chat_template, pack_examples
from ftray.data.rows import Checked, read_checked

__all__ = ["PREP_VERSION", "cache_key", "check_data", "load_split", "prepare"]

PREP_VERSION = "2"


def check_data(spec) -> tuple[Checked, Checked | None]:
    """Read and check every train/eval row (raises DataError naming file:line). No Ray."""
    d = spec.data
    train = read_checked(d.train, d.format, d.on_bad_rows)
    ev = read_checked(d.eval, d.format, d.on_bad_rows, limit=d.eval_max_rows) if d.eval else None
    return train, ev


def _file_hash(path: str, h) -> None:
    with storage.open_file(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def cache_key(spec, tokenizer_dir: str) -> str:
    h = hashlib.sha256()
    for p in (spec.data.train, spec.data.eval):
        if p:
            _file_hash(p, h)
    for name in sorted(storage.listdir(tokenizer_dir)):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
            _file_hash(storage.join(tokenizer_dir, name), h)
    d = spec.data
    h.update(
        json.dumps(
            [PREP_VERSION, d.format, d.max_length, d.packing, d.on_bad_rows, d.eval_max_rows, spec.method.kind]
        ).encode()
    )
    return h.hexdigest()[:20]


def default_cache_dir(spec) -> str:
    if spec.data.cache_dir:
        return spec.data.cache_dir
    out = spec.output.dir.rstrip("/")
    parent = out.rsplit("/", 1)[0] if "/" in out else "."
    return storage.join(parent, ".ftray-cache")


def _table(cols: dict):
    """Columns as Arrow: token lists as list<int32>, scalars as they are. Returned as a pyarrow table,
    Ray Data keeps lists as plain lists; as Python lists of lists it would store its own tensor
    extension type, which Parquet readers without Ray see as structs."""
    import pyarrow as pa

    out = {}
    for k, v in cols.items():
        first = next((x for x in v if x is not None), None)
        out[k] = pa.array(v, type=pa.list_(pa.int32())) if isinstance(first, list) else pa.array(v)
    return pa.table(out)


class _Encode:
    """Ray Data UDF: the method turns each checked row into examples; the tokenizer loads once per actor."""

    def __init__(self, spec_json: str, tokenizer_dir: str):
        from ftray.config import JobSpec
        from ftray.methods import get_method
        from ftray.models.load import load_tokenizer

        self.spec = JobSpec.model_validate_json(spec_json)
        self.method = get_method(self.spec.method.kind)
        self.tok = load_tokenizer(tokenizer_dir, self.spec.model.trust_remote_code)
        ensure_chat_template(self.tok)

    def __call__(self, batch):
        batch = batch.to_pydict()
        rows: list[dict] = []
        for key, row_json in zip(batch["key"], batch["row"], strict=True):
            for j, ex in enumerate(self.method.examples(json.loads(row_json), self.tok, self.spec)):
                dropped = len(ex["input_ids"]) == 0
                rows.append({**ex, "truncated": bool(ex.get("truncated", False)), "dropped": dropped, "key": int(key) * 1000 + j})
        cols = sorted({k for r in rows for k in r})
        return _table({c: [r.get(c) for r in rows] for c in cols})


def _pack_batch(batch, max_length: int, pad_id: int):
    batch = batch.to_pydict()
    keep = [i for i, d in enumerate(batch["dropped"]) if not d]
    examples = [{"input_ids": list(batch["input_ids"][i]), "labels": list(batch["labels"][i])} for i in keep]
    packed = pack_examples(examples, max_length, pad_id)
    base = int(min(batch["key"])) * 1000
    return _table(
        {
            "input_ids": [p["input_ids"] for p in packed],
            "labels": [p["labels"] for p in packed],
            "position_ids": [p["position_ids"] for p in packed],
            "tokens": [p["tokens"] for p in packed],
            "key": [base + j for j in range(len(packed))],
        }
    )


def _drop_flags(batch):
    batch = batch.to_pydict()
    keep = [i for i, d in enumerate(batch["dropped"]) if not d]
    out = {k: [v[i] for i in keep] for k, v in batch.items() if k not in ("dropped", "truncated")}
    out["tokens"] = [len(x) for x in out["input_ids"]]
    return _table(out)


def prepare(spec, tokenizer_dir: str, train: Checked, ev: Checked | None) -> tuple[str, dict]:
    """Tokenize (+pack) with Ray Data into the cache; returns (prepared folder, meta). Needs Ray up."""
    import ray.data

    key = cache_key(spec, tokenizer_dir)
    out = storage.join(default_cache_dir(spec), key)
    meta_path = storage.join(out, "meta.json")
    if storage.exists(meta_path):
        meta = json.loads(storage.read_text(meta_path))
        meta["cached"] = True
        return out, meta

    from ftray.methods import get_method
    from ftray.models.load import load_tokenizer

    tok = load_tokenizer(tokenizer_dir, spec.model.trust_remote_code)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    packable = spec.data.packing and get_method(spec.method.kind).packable
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    fs, _ = storage.pyarrow_filesystem(out)
    meta: dict = {"key": key, "format": spec.data.format, "max_length": spec.data.max_length}

    for split, checked in (("train", train), ("eval", ev)):
        if checked is None:
            continue
        items = [{"key": i, "row": json.dumps(r)} for i, r in enumerate(checked.rows)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(16, len(items) // 256)))
        ds = ds.map_batches(
            _Encode,
            fn_constructor_args=(spec.model_dump_json(), tokenizer_dir),
            batch_size=256,
            # One tokenizer actor per ~50k rows, up to the cluster's CPUs: start-up (~5 s) dominates small data.
            compute=ray.data.ActorPoolStrategy(
                min_size=1, max_size=max(1, min(int(ray.cluster_resources().get("CPU", 1)), len(items) // 50_000))
            ),
            batch_format="pyarrow",
        ).materialize()
        stats = {
            "rows": len(checked.rows),
            "skipped_rows": checked.skipped,
            "examples": ds.count(),
            "truncated": int(ds.sum("truncated") or 0),
            "dropped_no_answer": int(ds.sum("dropped") or 0),
        }
        if split == "train" and packable:
            ds = ds.map_batches(
                _pack_batch,
                fn_kwargs={"max_length": spec.data.max_length, "pad_id": pad_id},
                batch_size=4096,
                batch_format="pyarrow",
            )
        else:
            ds = ds.map_batches(_drop_flags, batch_size=4096, batch_format="pyarrow")
        ds = ds.materialize()
        stats["sequences"] = ds.count()
        if stats["sequences"] == 0:
            from ftray.data.rows import DataError

            raise DataError(f"{getattr(spec.data, split)}: every example was dropped (no answer token within max_length)")
        ds.write_parquet(storage.pyarrow_filesystem(storage.join(out, split))[1], filesystem=fs)
        meta[split] = stats

    if ev is not None:
        storage.write_text_atomic(storage.join(out, "eval_rows.jsonl"), "".join(json.dumps(r) + "\n" for r in ev.rows))
    # Token and padding counts come from the shards themselves.
    train_split = load_split(out, "train")
    total = sum(len(x) for x in train_split["input_ids"])
    real = sum(train_split["tokens"])
    meta["train"]["tokens"] = real
    meta["train"]["padding_share"] = (total - real) / total if total else 0.0
    if "labels" in train_split and train_split["labels"] and isinstance(train_split["labels"][0], list):
        meta["train"]["label_tokens"] = sum(1 for row in train_split["labels"] for t in row if t != -100)
    storage.write_text_atomic(meta_path, json.dumps(meta, indent=1))
    meta["cached"] = False
    return out, meta


def load_split(prepared: str, split: str) -> dict[str, list]:
    """Read a prepared split (local or s3) in its canonical order: every column as a list
    (`input_ids`, `tokens`, and whatever else the method's examples carry; `position_ids` is None
    when the rows are not packed)."""
    import pyarrow.dataset as pads

    fs, p = storage.pyarrow_filesystem(storage.join(prepared, split))
    table = pads.dataset(p, filesystem=fs, format="parquet").to_table().sort_by("key")
    cols = {c: table.column(c).to_pylist() for c in table.column_names if c != "key"}
    cols.setdefault("position_ids", None)
    return cols
