"""Human feedback on served answers, written as `preference` rows that `reward` and `dpo` jobs read.

The ingress remembers the prompt and text of its recent completions (the last `feedback.remember`
choices and at most `feedback.remember_bytes` of text per ingress replica, so a deployment with several
ingress replicas should keep one, or send feedback soon); ratings are kept only for remembered choices. `POST /v1/feedback` then names them:

    {"chosen": "chatcmpl-1", "rejected": "chatcmpl-2:1"}   a pair for the same prompt (`ID:N` = choice N)
    {"id": "chatcmpl-1", "rating": 4}                      a rating; two differently rated answers to
                                                           the same prompt make a pair (higher = chosen)

Where rows go (`feedback.path`):
- a local `.jsonl` file: appended under a lock (a thread lock plus `flock`, for several replicas on one
  host) on an `O_APPEND` descriptor, then fsync: concurrent posts never tear or lose a line. The rows of
  one post go in one append; a write that fails part way (a full disk) is cut back to the file's previous
  size, so no half line is left and nothing written before is lost (`FeedbackStorageError`, a 503);
- a folder, local or `s3://` prefix: one object per row (`<time>-<uuid>.jsonl`); S3 has no append, and
  a PUT is atomic, so no row is ever half written. Training jobs read such a folder as one data file
  (`data.train: s3://bucket/feedback/`).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import math
import os
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from ftray import storage

__all__ = ["FeedbackError", "FeedbackStorageError", "FeedbackStore", "append_line"]

log = logging.getLogger("ftray.serve")


class FeedbackError(ValueError):
    def __init__(self, message: str, param: str, code: str = "invalid_feedback"):
        super().__init__(message)
        self.param, self.code = param, code


class FeedbackStorageError(RuntimeError):
    """The rows could not be stored (full disk, I/O error); none of them was written. The ingress answers 503."""


_LOCK = threading.Lock()


def _open_append(path: str) -> io.FileIO:
    return io.FileIO(path, "a", opener=lambda p, flags: os.open(p, flags, 0o644))


def append_line(path: str, line: str, open_file: Callable[[str], io.FileIO] = _open_append) -> None:
    """Append `line` (one or more lines) durably, all or nothing: on an O_APPEND descriptor under a lock; a
    write that fails part way is cut back to the file's size before it, then the OSError is raised.
    `open_file` opens the file for appending (a seam for tests that fill the disk)."""
    import fcntl

    data = memoryview((line.rstrip("\n") + "\n").encode("utf-8"))
    with _LOCK:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open_file(path) as f:  # closing releases the flock
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            size = os.fstat(f.fileno()).st_size  # every ftray writer holds the flock: nobody appends meanwhile
            try:
                while data:  # a full disk takes part of a write, then refuses the rest
                    n = f.write(data)
                    if not n:
                        raise OSError(errno.ENOSPC, "the file took no bytes")
                    data = data[n:]
                os.fsync(f.fileno())
            except OSError:
                _cut_back(f.fileno(), size, path)
                raise


def _cut_back(fd: int, size: int, path: str) -> None:
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as e:  # the half line stays: say so where an operator looks
        log.error("feedback: %s: could not cut a failed append back to %d bytes (%s)", path, size, e)


class FeedbackStore:
    def __init__(
        self, path: str, remember: int = 10_000, remember_bytes: int = 64 << 20,
        open_file: Callable[[str], io.FileIO] = _open_append,
    ):
        self.path, self.remember, self.remember_bytes = path, remember, remember_bytes
        self.per_record = storage.is_remote(path) or not path.endswith(".jsonl")
        self.recent: OrderedDict[str, dict] = OrderedDict()
        self.ratings: dict[str, dict[str, float]] = {}  # prompt key -> {ref: rating}, refs in `recent` only
        self._cost: dict[str, int] = {}  # ref -> bytes charged for it (choice 0's cost is on its id alias)
        self._bytes = 0
        self._open = open_file
        self._lock = threading.Lock()

    # remembering ------------------------------------------------------------------------------------
    def remember_completion(
        self, cid: str, model: str, messages: list[dict] | None, prompt: str | None, texts: list[str], start: int = 0
    ) -> None:
        """Choices `start`, `start + 1`, ... of one response (`cid`). Chat: `messages` (the prompt is the last
        user turn, the turns before it the history); completions: the raw `prompt` text."""
        if messages is not None:
            last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
            if last is None:
                return  # nothing to call a prompt
            history = [m for m in messages[:last] if m["role"] in ("system", "user", "assistant")]
            entry = {"prompt": messages[last]["content"], "history": history}
        else:
            entry = {"prompt": prompt or "", "history": []}
        entry["model"] = model
        key = json.dumps([model, entry["history"], entry["prompt"]], sort_keys=True)
        entry["key"] = hashlib.sha256(key.encode()).hexdigest()  # not a 2nd prompt copy
        # Counted per choice (a prompt shared by n choices counts n times): an upper bound, in real bytes.
        shared = sys.getsizeof(entry["prompt"]) + sum(sys.getsizeof(str(m.get("content", ""))) for m in entry["history"])
        with self._lock:
            for i, t in enumerate(texts, start=start):
                ref = f"{cid}:{i}"
                self._forget(ref)
                self.recent[ref] = {**entry, "text": t}
                self._cost[ref] = shared + sys.getsizeof(t)
                self._bytes += self._cost[ref]
                if i == 0:  # the id alias, stored last, carries the cost: forgetting it frees the entry
                    self._forget(cid)
                    self.recent[cid] = self.recent[ref]
                    self._cost[cid] = self._cost.pop(ref)
            while self.recent and (len(self.recent) > self.remember or self._bytes > self.remember_bytes):
                self._forget(next(iter(self.recent)))

    def _forget(self, ref: str) -> None:
        """Drop `ref` with its bytes and its rating (under the lock)."""
        entry = self.recent.pop(ref, None)
        if entry is None:
            return
        self._bytes -= self._cost.pop(ref, 0)
        seen = self.ratings.get(entry["key"])
        if seen is not None and seen.pop(ref, None) is not None and not seen:
            del self.ratings[entry["key"]]

    def _get(self, ref, field: str) -> dict:
        if not isinstance(ref, str) or not ref:
            raise FeedbackError(f"`{field}` must be a completion id string", field)
        with self._lock:
            hit = self.recent.get(ref)
        if hit is None:
            raise FeedbackError(
                f"`{field}`: no recent completion `{ref}` on this server (unknown, or no longer remembered: "
                f"the last {self.remember} answers, {self.remember_bytes} bytes in all, are kept)", field,
                "unknown_completion",
            )
        return hit

    # feedback ---------------------------------------------------------------------------------------
    def handle(self, body: dict) -> dict:
        """Validate one feedback body; write the preference rows it yields. Returns a summary."""
        unknown = set(body) - {"id", "rating", "chosen", "rejected", "comment"}
        if unknown:
            f = sorted(unknown)[0]
            raise FeedbackError(f"`{f}`: unknown field; send `id` + `rating`, or `chosen` + `rejected`", f)
        undo = None
        if ("chosen" in body) != ("rejected" in body):
            f = "rejected" if "chosen" in body else "chosen"
            raise FeedbackError(f"`{f}` is required with `{'chosen' if f == 'rejected' else 'rejected'}`", f)
        if "chosen" in body:
            if "rating" in body or "id" in body:
                f = "rating" if "rating" in body else "id"
                raise FeedbackError(f"`{f}`: send either a `chosen`/`rejected` pair or `id` + `rating`, not both", f)
            if body["chosen"] == body["rejected"]:
                raise FeedbackError("`rejected` names the same completion as `chosen`", "rejected")
            c, r = self._get(body["chosen"], "chosen"), self._get(body["rejected"], "rejected")
            if c["key"] != r["key"]:
                raise FeedbackError("`rejected` answers a different prompt (or model) than `chosen`", "rejected")
            if c["text"].strip() == r["text"].strip():
                raise FeedbackError("`rejected` has the same text as `chosen`: no preference to learn", "rejected")
            rows = [self._row(c, r, body["chosen"], body["rejected"], "pair")]
        else:
            if "id" not in body:
                raise FeedbackError("`id` is required (or send `chosen` + `rejected`)", "id")
            rating = body.get("rating")
            if rating is None:
                raise FeedbackError("`rating` is required with `id`", "rating")
            if isinstance(rating, bool) or not isinstance(rating, int | float) or not math.isfinite(rating):
                raise FeedbackError("`rating` must be a finite number", "rating")
            ref = body["id"]
            entry = self._get(ref, "id")
            rows = []
            with self._lock:
                if ref not in self.recent:  # forgotten since _get: a rating of it would never be pruned
                    raise FeedbackError(f"`id`: completion `{ref}` is no longer remembered", "id", "unknown_completion")
                seen = self.ratings.setdefault(entry["key"], {})
                before = seen.get(ref)
                for other_ref, other in seen.items():
                    o = self.recent.get(other_ref)
                    if o is None or other == rating or o["text"].strip() == entry["text"].strip():
                        continue
                    hi, lo = ((entry, ref), (o, other_ref)) if rating > other else ((o, other_ref), (entry, ref))
                    rows.append(self._row(hi[0], lo[0], hi[1], lo[1], "rating"))
                seen[ref] = float(rating)
            undo = (entry["key"], ref, before)
        try:
            self._write(rows)
        except FeedbackStorageError:
            if undo is not None:  # not stored: as if never rated, so a retry pairs it again
                self._unrate(*undo)
            raise
        return {"object": "feedback", "accepted": True, "rows_written": len(rows)}

    def _unrate(self, key: str, ref: str, before: float | None) -> None:
        with self._lock:
            seen = self.ratings.get(key)
            if seen is None:
                return
            if before is not None:
                seen[ref] = before
            elif seen.pop(ref, None) is not None and not seen:
                del self.ratings[key]

    def _row(self, chosen: dict, rejected: dict, cid: str, rid: str, how: str) -> dict:
        return {
            "prompt": chosen["prompt"],
            "chosen": chosen["text"],
            "rejected": rejected["text"],
            "history": chosen["history"],
            "id": f"fb-{uuid.uuid4().hex}",
            "source": f"feedback:{how}",
            "model": chosen["model"],
            "completions": [cid, rid],
            "time": time.time(),
        }

    def _write(self, rows: list[dict]) -> None:
        """All rows of one post in one append (or one object): stored together or not at all."""
        if not rows:
            return
        lines = "\n".join(json.dumps(row, ensure_ascii=False) for row in rows)
        try:
            if self.per_record:
                name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
                storage.write_text_atomic(storage.join(self.path, name), lines + "\n")
            else:
                append_line(self.path, lines, self._open)
        except OSError as e:
            log.error("feedback: could not store %d row(s) in %s: %s", len(rows), self.path, e)
            raise FeedbackStorageError(
                f"feedback storage failed ({e.strerror or type(e).__name__}); nothing of this feedback was stored: retry later"
            ) from None
