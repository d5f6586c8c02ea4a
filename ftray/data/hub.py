"""Hugging Face datasets as data sources: `data.train` / `data.eval` may be `hf:SOURCE[?name=CONFIG&split=SPLIT]`,
where SOURCE is a dataset on the Hub (`org/name`, through `datasets.load_dataset`, its cache and
`HF_DATASETS_OFFLINE` honoured), a local dataset repository folder (data files named by split, or a
README with configs: `load_dataset` reads it as the Hub copy), or a folder written by `save_to_disk`
(`load_from_disk`). Files on the Hub can also be named directly as `hf://datasets/ORG/NAME/FILE`
(fsspec's HfFileSystem, like any other URL). Rows are the dataset's rows, numbered from 1 in errors."""

from __future__ import annotations

import functools
from pathlib import Path
from urllib.parse import parse_qs

__all__ = ["PREFIX", "fingerprint", "is_dataset", "load", "parse"]

PREFIX = "hf:"


def is_dataset(path: str | None) -> bool:
    return bool(path) and path.startswith(PREFIX) and not path.startswith("hf://")


def parse(path: str) -> tuple[str, str | None, str | None]:
    """(source, config name, split) of `hf:SOURCE?name=..&split=..`; unknown query keys are refused."""
    from ftray.data.rows import DataError

    body = path[len(PREFIX) :]
    source, _, query = body.partition("?")
    q = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(q) - {"name", "split"})
    if unknown or not source:
        raise DataError(f"{path}: write hf:ORG/NAME or hf:FOLDER, then optionally ?name=CONFIG&split=SPLIT"
                        + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    one = {k: v[-1] for k, v in q.items()}
    return source, one.get("name") or None, one.get("split") or None


def _pick_split(path: str, d, split: str | None):
    from ftray.data.rows import DataError

    if split is None:
        if len(d) != 1:
            raise DataError(f"{path}: the dataset has splits {', '.join(d)}: name one with ?split=")
        split = next(iter(d))
    if split not in d:
        raise DataError(f"{path}: no split {split!r} (the dataset has {', '.join(d)})")
    return d[split]


@functools.lru_cache(maxsize=8)
def load(path: str):
    """The `datasets.Dataset` a `hf:` source names (DataError, one line, when it cannot be had). Kept per
    process: the job's checks read its rows and the cache key its fingerprint from the same load."""
    import datasets

    from ftray.data.rows import DataError

    source, name, split = parse(path)
    local = Path(source)
    try:
        if (local / "state.json").exists() or (local / "dataset_dict.json").exists():  # save_to_disk
            d = datasets.load_from_disk(str(local))
            if isinstance(d, datasets.DatasetDict):
                return _pick_split(path, d, split)
            if split is not None:
                raise DataError(f"{path}: a saved dataset without splits: drop ?split=")
            return d
        d = datasets.load_dataset(source, name)
        return _pick_split(path, d, split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - not found, offline, bad config: one line that says which
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DataError(f"{path}: cannot load the dataset: {first}") from None


def fingerprint(path: str) -> str:
    """What identifies the dataset's content (its `datasets` fingerprint), for the prepared-data cache key."""
    ds = load(path)
    return f"{path}|{ds._fingerprint}|{len(ds)}"
