"""Read rows from JSONL/JSON/Parquet/CSV/TXT (local or s3://) with their line numbers, and check them.

A checked row is normalised to one of three shapes the tokenizer step understands:
    {"messages": [{"role", "content"}, ...]}   chat template, loss on assistant turns
    {"prompt": str, "completion": str}         plain text, loss on the completion
    {"text": str}                              plain text, loss on every token
and, for the encoder methods:
    {"anchor", "positive"[, "negative"]} or {"sentence1", "sentence2", "score": float}   (pairs)
    {"text": str, "label": str}                                                         (labels)
    {"source": str, "target": str}                                                      (translation)
and, for the preference methods (reward, dpo):
    {"prompt": str, "chosen": str, "rejected": str, "history": [{"role", "content"}, ...]}  (preference)
"""

from __future__ import annotations

import csv
import io
import json
import string
from collections.abc import Iterator
from dataclasses import dataclass

from ftray import storage

__all__ = ["DataError", "RowError", "check_row", "data_files", "iter_rows", "read_checked", "ROLES"]

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file is unusable. One line naming the file (and line)."""


class RowError(ValueError):
    """One row is malformed; the message says why, the caller adds file and line."""


def _suffix(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    for s in (".jsonl", ".json", ".parquet", ".csv", ".txt"):
        if name.endswith(s):
            return s
    raise DataError(f"{path}: unknown data file type (use .jsonl, .json, .parquet, .csv or .txt)")


def data_files(path: str) -> list[str]:
    """The file itself, or the .jsonl files of a folder / s3:// prefix in name order (served feedback
    writes one object per row there: S3 has no append). None for a Hugging Face dataset (`hf:`)."""
    from ftray.data import hub

    if hub.is_dataset(path):
        return []
    if storage.isdir(path):
        names = [n for n in storage.listdir(path) if n.endswith(".jsonl") and not n.startswith(".")]
        if not names:
            raise DataError(f"{path}: a data folder without .jsonl files")
        return [storage.join(path, n) for n in names]
    return [path]


def iter_rows(path: str) -> Iterator[tuple[int | str, object]]:
    """Yield (line or row number, raw row). A JSONL line that is not JSON yields a RowError as the row.
    For a folder, the place is `name.jsonl:line`; for a Hugging Face dataset (`hf:`), the row number."""
    from ftray.data import hub

    if hub.is_dataset(path):
        for i, row in enumerate(hub.load(path), start=1):
            yield i, row
        return
    if storage.isdir(path):
        for f in data_files(path):
            for line, row in iter_rows(f):
                yield f"{f.rstrip('/').rsplit('/', 1)[-1]}:{line}", row
        return
    suffix = _suffix(path)
    if not storage.exists(path):
        raise DataError(f"{path}: no such data file")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        with storage.open_file(path, "rb") as f:
            table = pq.read_table(f)
        for i, row in enumerate(table.to_pylist(), start=1):
            yield i, row
        return
    with storage.open_file(path, "rb") as f:
        text = f.read().decode("utf-8", errors="strict")
    if suffix == ".jsonl":
        # Lines end at "\n" only: str.splitlines() also splits at U+2028, U+0085 ... inside JSON strings.
        for i, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, RowError(f"not valid JSON ({e.msg} at column {e.colno})")
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of rows")
        for i, row in enumerate(data, start=1):
            yield i, row
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            yield reader.line_num, row
    else:  # .txt: documents are separated by blank lines
        start, buf = None, []
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                if start is None:
                    start = i
                buf.append(line)
            elif buf:
                yield start, {"text": "\n".join(buf)}
                start, buf = None, []
        if buf:
            yield start, {"text": "\n".join(buf)}


def _str_field(row: dict, key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise RowError(f"missing `{key}`")
        return ""
    v = row[key]
    if not isinstance(v, str):
        raise RowError(f"`{key}` must be a string, got {type(v).__name__}")
    return v


def _nonempty(row: dict, key: str) -> str:
    v = _str_field(row, key)
    if not v.strip():
        raise RowError(f"`{key}` is empty")
    return v


def _messages(value: object, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError(f"`{key}` must be a non-empty list of {{role, content}}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"`{key}[{j}]` must have `role` and `content`")
        if m["role"] not in ROLES:
            raise RowError(f"`{key}[{j}].role` is {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise RowError(f"`{key}[{j}].content` must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def check_row(row: object, fmt: str) -> dict:
    """Validate one raw row against a data format and normalise it (see module docstring)."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError(f"a row must be an object, got {type(row).__name__}")
    if fmt == "instruction":
        instruction = _str_field(row, "instruction")
        inp = _str_field(row, "input", required=False)
        output = _str_field(row, "output")
        if not instruction.strip():
            raise RowError("`instruction` is empty")
        if not output.strip():
            raise RowError("`output` is empty")
        user = instruction if not inp.strip() else f"{instruction}\n\n{inp}"
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}
    if fmt == "chat":
        msgs = _messages(row.get("messages"), "messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise RowError("`messages` has no assistant turn to learn from")
        return {"messages": msgs}
    if fmt == "prompt_completion":
        if "prompt" not in row:
            raise RowError("missing `prompt`")
        if "completion" not in row:
            raise RowError("missing `completion`")
        if isinstance(row["prompt"], list):  # conversational prompt/completion (TRL's layout)
            prompt = _messages(row["prompt"], "prompt")
            completion = row["completion"]
            if isinstance(completion, str):
                completion = [{"role": "assistant", "content": completion}]
            completion = _messages(completion, "completion")
            return {"messages": prompt + completion}
        prompt = _str_field(row, "prompt")
        completion = _str_field(row, "completion")
        if not completion.strip():
            raise RowError("`completion` is empty")
        return {"prompt": prompt, "completion": completion}
    if fmt == "text":
        text = _str_field(row, "text")
        if not text.strip():
            raise RowError("`text` is empty")
        return {"text": text}
    if fmt == "pairs":
        if "sentence1" in row or "sentence2" in row:
            out = {k: _nonempty(row, k) for k in ("sentence1", "sentence2")}
            score = row.get("score")
            if isinstance(score, bool) or not isinstance(score, int | float):
                raise RowError("a scored pair needs a numeric `score`" + ("" if "score" in row else " (missing)"))
            return {**out, "score": float(score)}
        if "anchor" not in row:
            raise RowError("a pairs row needs `anchor`/`positive`[/`negative`] or `sentence1`/`sentence2`/`score`")
        out = {k: _nonempty(row, k) for k in ("anchor", "positive")}
        if row.get("negative") is not None:
            out["negative"] = _nonempty(row, "negative")
        return out
    if fmt == "labels":
        text = _nonempty(row, "text")
        label = row.get("label")
        if label is None:
            raise RowError("missing `label`")
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise RowError(f"`label` must be a string or an integer, got {type(label).__name__}")
        if not str(label).strip():
            raise RowError("`label` is empty")
        return {"text": text, "label": str(label)}
    if fmt == "translation":
        return {k: _nonempty(row, k) for k in ("source", "target")}
    if fmt == "preference":
        out = {k: _nonempty(row, k) for k in ("prompt", "chosen", "rejected")}
        if out["chosen"].strip() == out["rejected"].strip():
            # Teaches nothing and, for Bradley-Terry, pins the margin at 0 (loss log 2 for ever).
            raise RowError("`chosen` and `rejected` are the same text")
        history = row.get("history")
        out["history"] = _messages(history, "history") if history else []
        return out
    raise RowError(f"unknown data format {fmt!r}")


def _column_names(source: str) -> list[str]:
    """The file's columns a `data.columns` value reads: itself, or the `{fields}` of a template."""
    if "{" not in source:
        return [source]
    return [name for _, name, _, _ in string.Formatter().parse(source) if name is not None]


def _renamed(raw: dict, columns: dict[str, str]) -> dict:
    """`columns` {format's name: the file's name, or a template such as "Translate into French: {source}"}."""
    missing = [name for src in columns.values() for name in _column_names(src) if name not in raw]
    if missing:
        raise RowError(f"missing column {missing[0]!r} named in `data.columns`")
    made = {k: src.format_map(raw) if "{" in src else raw[src] for k, src in columns.items()}
    return {**{k: v for k, v in raw.items() if k not in columns}, **made}


@dataclass
class Checked:
    rows: list[dict]
    skipped: int
    first_skipped: list[str]


def read_checked(
    path: str, fmt: str, on_bad_rows: str = "error", limit: int | None = None, columns: dict[str, str] | None = None
) -> Checked:
    """Read and check every row. `error`: raise DataError naming file:line; `skip`: count and keep going.
    `columns` ({format's name: the file's name, or a template of the file's `{names}`}) renames columns first."""
    rows: list[dict] = []
    skipped, first = 0, []
    for line, raw in iter_rows(path):
        try:
            if columns and isinstance(raw, dict):
                raw = _renamed(raw, columns)
            rows.append(check_row(raw, fmt))
        except RowError as e:
            where = f"{path}:{line}" if isinstance(line, int) else storage.join(path, line)
            if on_bad_rows == "error":
                raise DataError(f"{where}: {e}") from None
            skipped += 1
            if len(first) < 5:
                first.append(f"{where}: {e}")
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DataError(f"{path}: no usable rows" + (f" ({skipped} bad rows skipped)" if skipped else " (empty file)"))
    return Checked(rows, skipped, first)
