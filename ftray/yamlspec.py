"""YAML specs (job specs and sweep specs): reading a file into a mapping plus a key-path → line index,
`--set KEY=VALUE` overrides, dotted keys, and pydantic errors turned into one line that names the file and
line (or the `--set` flag) and the field.

`config.py` (the job spec) and `tune/spec.py` (the sweep spec) both read their files through here, so
the two kinds of spec report a bad file, an unknown key or a bad value the same way.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

__all__ = [
    "SpecError",
    "coerce_floats",
    "flat_keys",
    "format_error",
    "line_index",
    "load_mapping",
    "merge",
    "nest",
    "override_items",
    "parse_overrides",
]


class SpecError(ValueError):
    """A spec is invalid. The message is one line naming the file, line and field."""


def line_index(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = (*path, k.value)
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[(*path, i)] = v.start_mark.line + 1
                walk(v, (*path, i))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def load_mapping(path: str | os.PathLike, what: str = "job spec") -> tuple[dict, dict[tuple, int]]:
    """Read a YAML `what` (local or s3://) into a dict plus a key-path → line map."""
    from ftray import storage

    src = str(path)
    if not storage.exists(src):
        raise SpecError(f"{src}: no such {what}")
    text = storage.read_text(src)
    try:
        raw = yaml.safe_load(text)
        lines = line_index(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{src}{line}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{src}: a {what} is a YAML mapping, got {type(raw).__name__}")
    return raw, lines


def nest(items: Iterable[tuple[str, Any]], label: str = "`{}`") -> dict:
    """Dotted (key, value) pairs in order → nested dicts: ("a.b", 1) → {"a": {"b": 1}}. A key that is
    both a value and a section is an error named by `label.format(key)`."""
    out: dict = {}
    for key, value in items:
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SpecError(f"{label.format(key)}: `{p}` is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`a.b=c` → {"a": {"b": c}}, values parsed as YAML scalars (so `1e-4` is a float, `true` a bool)."""
    return nest(override_items(pairs), "--set {}")


def override_items(pairs: list[str]) -> list[tuple[str, Any]]:
    """`a.b=c` → ("a.b", c), the value parsed as `parse_overrides` parses it."""
    items = []
    for pair in pairs:
        if "=" not in pair:
            raise SpecError(f"--set {pair}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise SpecError(f"--set {key}: value {raw!r} is not valid YAML ({e.problem})") from None
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 as a string; users mean a number.
            try:
                value = float(value) if any(c in value for c in "eE.") else value
            except ValueError:
                pass
        items.append((key, value))
    return items


def merge(base: dict, extra: dict) -> dict:
    """`extra` laid over `base`, section by section (neither is changed)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flat_keys(d: dict, prefix: str = "") -> set[str]:
    """Every dotted key of a nested mapping, sections included."""
    keys = set()
    for k, v in d.items():
        keys.add(prefix + k)
        if isinstance(v, dict):
            keys |= flat_keys(v, prefix + k + ".")
    return keys


def coerce_floats(d: Any) -> Any:
    """YAML 1.1 (PyYAML) reads `1e-4` as a string; a spec means a number."""
    if isinstance(d, dict):
        return {k: coerce_floats(v) for k, v in d.items()}
    if isinstance(d, list):
        return [coerce_floats(v) for v in d]
    if isinstance(d, str):
        s = d.strip()
        if s and s[0] in "+-.0123456789" and any(c in s for c in "eE"):
            try:
                return float(s)
            except ValueError:
                return d
    return d


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the field at `loc` (for suggesting close keys)."""
    cur: Any = model
    for part in loc[:-1]:
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        ann = cur.model_fields[part].annotation
        args = getattr(ann, "__args__", None) or ()
        cands = [a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        cur = cands[0] if cands else None
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def format_error(
    err: ValidationError,
    source: str,
    lines: dict[tuple, int],
    set_keys: set[str] = frozenset(),
    hidden: Callable[[Any], bool] = lambda part: False,
    model: type[BaseModel] | None = None,
) -> str:
    """The first validation error as one line: `<source>:<line>` (or `--set <key>` when an override set
    it), the dotted field, the reason. `hidden` drops parts of pydantic's location the user did not write
    (a union's tag, a list index); with `model`, an unknown key gets the closest field as a hint."""
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not hidden(p))
    dotted = ".".join(str(p) for p in loc)
    where = source
    line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
    if dotted in set_keys:
        where = f"--set {dotted}"
    elif line is not None:
        where = f"{source}:{line}"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        owner = _model_at(model, loc) if model is not None else None
        hint = ""
        if owner is not None:
            key = str(loc[-1])
            close = difflib.get_close_matches(key, list(owner.model_fields), n=1)
            if not close:  # e.g. `learning_rate` -> `lr`: the words appear in the field's description
                words = key.replace("_", " ").lower()
                close = [n for n, f in owner.model_fields.items() if words in (f.description or "").lower()][:1]
            if close:
                hint = f"; did you mean `{'.'.join([*map(str, loc[:-1]), close[0]])}`?"
        return f"{where}: unknown key `{dotted}`{hint}"
    if e["type"] == "missing":
        return f"{where}: `{dotted}` is required"
    if not dotted:
        return f"{where}: {msg}"
    got = e.get("input")
    got_s = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
    return f"{where}: `{dotted}`: {msg}{got_s}"
