"""Prepare a job's data: check rows (driver, before any Ray resource), tokenize and pack (Ray Data),
write token shards (Parquet) cached by a hash of (data bytes, tokenizer files, format, max length,
packing, method, and the source of the code that makes examples: `code_fingerprint`).

Layout of one prepared folder:
    train/*.parquet   input_ids, labels[, position_ids], key  (rows sorted by `key` give the order)
    eval/*.parquet    same, never packed (eval loss is per example)
    eval_rows.jsonl   the checked eval rows (for generation-based metrics)
    meta.json         counts: rows, skipped, truncated, dropped, tokens, padding share, written last
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from ftray import storage
from ftray.data import hub
from ftray.data.encode import ensure_chat_template, pack_examples
from ftray.data.rows import Checked, data_files, read_checked
from ftray.progress import bar

__all__ = ["cache_key", "check_data", "code_fingerprint", "load_split", "prepare"]


def _code_files() -> list[Path]:
    """Everything that turns rows into a method's examples: `ftray/data` and `ftray/methods` (found by path:
    `data` sits below `methods` and imports nothing of it)."""
    pkg = Path(__file__).resolve().parents[1]
    return sorted(p for sub in ("data", "methods") for p in (pkg / sub).glob("*.py"))


@functools.lru_cache(maxsize=8)
def code_fingerprint(files: tuple[Path, ...] | None = None) -> str:
    """A hash of the source files that make examples (`_code_files`), part of the cache key: shards prepared by
    other code are never reused. (A hand-bumped version number was here; `reward`'s cut changed without a bump
    and the cache served the old cut's shards to every later run.)"""
    h = hashlib.sha256()
    for p in files if files is not None else _code_files():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def check_data(spec) -> tuple[Checked, Checked | None]:
    """Read and check every train/eval row (raises DataError naming file:line). No Ray."""
    d = spec.data
    train = read_checked(d.train, d.format, d.on_bad_rows, columns=d.columns)
    ev = read_checked(d.eval, d.format, d.on_bad_rows, limit=d.eval_max_rows, columns=d.columns) if d.eval else None
    return train, ev


def _file_hash(path: str, h) -> None:
    with storage.open_file(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def cache_key(spec, tokenizer_dir: str) -> str:
    h = hashlib.sha256()
    for p in (spec.data.train, spec.data.eval):
        if hub.is_dataset(p):
            h.update(hub.fingerprint(p).encode())
        for f in data_files(p) if p else []:
            _file_hash(f, h)
    for name in sorted(storage.listdir(tokenizer_dir)):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
            _file_hash(storage.join(tokenizer_dir, name), h)
    d = spec.data
    h.update(
        json.dumps(
            [code_fingerprint(), d.format, d.max_length, d.packing, d.on_bad_rows, d.eval_max_rows, d.columns,
             spec.method.model_dump(mode="json")]
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


_STATS = ("n_rows", "n_truncated", "n_dropped")


class _Encode:
    """Ray Data UDF (one actor loads the tokenizer once): checked rows -> the method's examples ->
    packed rows for the train split when packing is on. Counts ride along as columns (non-zero on
    one row per batch), so one pass over the data yields both the shards and the report."""

    def __init__(self, spec_json: str, tokenizer_dir: str, pack: bool, pad_id: int, method):
        from ftray.config import JobSpec
        from ftray.models.load import load_tokenizer

        self.spec = JobSpec.model_validate_json(spec_json)
        self.method = method
        self.tok = load_tokenizer(tokenizer_dir, self.spec.model.trust_remote_code)
        ensure_chat_template(self.tok)
        self.pack, self.pad_id = pack, pad_id

    def __call__(self, batch):
        batch = batch.to_pydict()
        out: list[dict] = []
        for split in ("train", "eval"):
            idx = [i for i, s in enumerate(batch["split"]) if s == split]
            if not idx:
                continue
            examples, truncated, dropped = [], 0, 0
            for i in idx:
                for j, ex in enumerate(self.method.examples(json.loads(batch["row"][i]), self.tok, self.spec)):
                    truncated += bool(ex.pop("truncated", False))
                    if len(ex["input_ids"]) == 0:
                        dropped += 1
                        continue
                    examples.append({**ex, "key": int(batch["key"][i]) * 1000 + j})
            if split == "train" and self.pack and examples:
                base = examples[0]["key"]
                rows = [{**p, "key": base + k} for k, p in enumerate(pack_examples(examples, self.spec.data.max_length, self.pad_id))]
            else:
                rows = [{**e, "tokens": len(e["input_ids"]), "position_ids": None} for e in examples]
            stats = {"n_rows": len(idx), "n_truncated": truncated, "n_dropped": dropped}
            if not rows:  # keep the counts even when every example of the batch was dropped
                rows = [{"input_ids": None, "tokens": 0, "position_ids": None, "key": -1}]
            for k, r in enumerate(rows):
                out.append({**r, "split": split, **{n: (v if k == 0 else 0) for n, v in stats.items()}})
        cols = sorted({k for r in out for k in r})
        return _table({c: [r.get(c) for r in out] for c in cols})


_BATCH = 4096  # examples per encode batch: packing quality grows with it (a few % padding at most)


def _encode_here(items: list[dict], encode: _Encode, out_path: str, fs) -> None:
    """The same pass as the Ray Data one, in this process (no Ray): the same batches of `_BATCH`
    items, the same UDF, the same `split=<name>/` parquet layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts: dict[str, list] = {}
    progress = bar(desc="tokenize", total=len(items), unit="row")
    for b in range(0, len(items), _BATCH):
        table = encode(pa.Table.from_pylist(items[b : b + _BATCH]))
        progress.update(min(_BATCH, len(items) - b))
        for split in ("train", "eval"):
            mask = pa.compute.equal(table.column("split"), split)
            part = table.filter(mask).drop_columns(["split"])
            if part.num_rows:
                parts.setdefault(split, []).append(part)
    progress.close()
    for split, tables in parts.items():
        fs.create_dir(f"{out_path}/split={split}", recursive=True)
        table = pa.concat_tables(tables, promote_options="permissive")
        pq.write_table(table, f"{out_path}/split={split}/part-0.parquet", filesystem=fs)


def prepare(spec, tokenizer_dir: str, train: Checked, ev: Checked | None, method, use_ray: bool = True) -> tuple[str, dict]:
    """Tokenize (+pack) both splits in one pass into the cache; returns (prepared folder, meta).
    `method` is the job's method (its `examples`, `packable`). With `use_ray` the pass is a Ray Data
    job (Ray must be up); without, it runs in this process and writes the same shards. Each attempt
    writes its own folder and `meta.json` (written last) names the finished one, so an interrupted
    preparation never leaves half a dataset behind a valid key."""
    import uuid

    from ftray.data.rows import DataError
    from ftray.models.load import load_tokenizer

    key = cache_key(spec, tokenizer_dir)
    root = storage.join(default_cache_dir(spec), key)
    meta_path = storage.join(root, "meta.json")
    if storage.exists(meta_path):
        meta = json.loads(storage.read_text(meta_path))
        meta["cached"] = True
        meta["path"] = storage.join(root, meta["dir"])
        return meta["path"], meta

    tok = load_tokenizer(tokenizer_dir, spec.model.trust_remote_code)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pack = spec.data.packing and method.packable
    attempt = uuid.uuid4().hex[:12]
    out = storage.join(root, attempt)
    fs, out_path = storage.pyarrow_filesystem(out)

    items = [{"key": i, "split": "train", "row": json.dumps(r)} for i, r in enumerate(train.rows)]
    if ev is not None:
        items += [{"key": i, "split": "eval", "row": json.dumps(r)} for i, r in enumerate(ev.rows)]
    args = (spec.model_dump_json(), tokenizer_dir, pack, pad_id, method)
    if use_ray:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        cpus = int(ray.cluster_resources().get("CPU", 1))
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(4 * cpus, len(items) // 2048)))
        ds.map_batches(
            _Encode,
            fn_constructor_args=args,
            batch_size=_BATCH,
            # One tokenizer actor per ~50k rows, up to the cluster's CPUs: start-up (~5 s) dominates small data.
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, min(cpus, len(items) // 50_000))),
            batch_format="pyarrow",
        ).write_parquet(out_path, filesystem=fs, partition_cols=["split"])
    else:
        _encode_here(items, _Encode(*args), out_path, fs)

    meta: dict = {"key": key, "dir": attempt, "format": spec.data.format, "max_length": spec.data.max_length}
    for split, checked in (("train", train), ("eval", ev)):
        if checked is None:
            continue
        cols = load_split(out, split, with_stats=True)
        n = len(cols["input_ids"])
        if n == 0:
            raise DataError(f"{getattr(spec.data, split)}: every example was dropped (no answer token within max_length)")
        total = sum(len(x) for x in cols["input_ids"])
        meta[split] = {
            "rows": len(checked.rows),
            "skipped_rows": checked.skipped,
            "truncated": sum(cols["n_truncated"]),
            "dropped_no_answer": sum(cols["n_dropped"]),
            "sequences": n,
            "tokens": sum(cols["tokens"]),
            "padding_share": (total - sum(cols["tokens"])) / total if total else 0.0,
        }
    if ev is not None:
        storage.write_text_atomic(storage.join(out, "eval_rows.jsonl"), "".join(json.dumps(r) + "\n" for r in ev.rows))
    storage.write_text_atomic(meta_path, json.dumps(meta, indent=1))
    meta["cached"] = False
    meta["path"] = out
    return out, meta


def load_split(prepared: str, split: str, with_stats: bool = False) -> dict[str, list]:
    """Read a prepared split (local or s3) in its canonical order: every column as a list
    (`input_ids`, `tokens`, and whatever else the method's examples carry; `position_ids` is None
    when the rows are not packed)."""
    import pyarrow.dataset as pads

    fs, p = storage.pyarrow_filesystem(storage.join(prepared, f"split={split}"))
    table = pads.dataset(p, filesystem=fs, format="parquet").to_table().sort_by("key")
    keep = table.filter(pads.field("key") >= 0)  # rows that only carry counts have key -1
    cols = {c: keep.column(c).to_pylist() for c in keep.column_names if c not in ("key", *_STATS)}
    if with_stats:
        cols.update({c: table.column(c).to_pylist() for c in _STATS})
    if cols.get("position_ids") is not None and all(x is None for x in cols["position_ids"]):
        cols["position_ids"] = None
    cols.setdefault("position_ids", None)
    return cols
