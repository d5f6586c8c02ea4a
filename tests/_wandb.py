"""Reading back what W&B wrote in offline mode, for the tests: the records of each run's `.wandb` files."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["history_rows", "records_of", "wandb_records"]


def wandb_records(wandb_dir: Path) -> dict[str, list[list]]:
    """Per W&B run id under `wandb_dir`: the records of each of its offline parts, in the order they started
    (a part per `wandb.init`). A `.wandb` file is a LevelDB-style log (wandb-core writes it; the Python
    package has no reader): a 7-byte header, then 32 KiB blocks of chunks (crc32, length, kind: 1 whole,
    2 first, 3 middle, 4 last), each record a `Record` protobuf."""
    import wandb
    from wandb.proto.wandb_internal_pb2 import Record

    # wandb-core writes the files behind `finish()` (a read right after found one without its run record
    # once): its teardown waits for them.
    wandb.teardown()
    runs: dict[str, list[list]] = {}
    for f in (wandb_dir / "wandb").glob("offline-run-*/run-*.wandb"):
        data, pos, buf, recs = f.read_bytes(), 7, b"", []
        assert data[:4] == b":W&B", f
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7 or data[pos + 6] == 0:  # a block's padding
                pos += 32768 - pos % 32768
                continue
            n, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
            if pos + 7 + n > len(data):  # a process killed mid-write (a trial stopped by its scheduler)
                break
            buf += data[pos + 7 : pos + 7 + n]
            pos += 7 + n
            if kind in (1, 4):
                recs.append(Record.FromString(buf))
                buf = b""
        found = records_of(recs, "run")
        if found:  # none: its process was killed before wandb-core wrote the run's first record
            runs.setdefault(found[0].run_id, []).append(recs)
    # Two parts started in the same second are `...-ID` and `...-ID-1`: order them by their start time.
    return {k: sorted(v, key=lambda recs: records_of(recs, "run")[0].start_time.ToNanoseconds()) for k, v in runs.items()}


def records_of(recs: list, kind: str) -> list:
    return [getattr(r, kind) for r in recs if r.WhichOneof("record_type") == kind]


def history_rows(recs: list) -> dict[int, dict]:
    """The logged history rows by step."""
    rows = {}
    for h in records_of(recs, "history"):
        row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in h.item}
        rows[row["_step"]] = row
    return rows
