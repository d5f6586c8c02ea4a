"""Human feedback on served answers, written as `preference` rows that `reward` and `dpo` jobs read.

The ingress remembers the prompt and text of its recent completions (an LRU of `feedback.remember`
choices per ingress replica, so a deployment with several ingress replicas should keep one, or send
feedback soon). `POST /v1/feedback` then names them:

    {"chosen": "chatcmpl-1", "rejected": "chatcmpl-2:1"}   a pair for the same prompt (`ID:N` = choice N)
    {"id": "chatcmpl-1", "rating": 4}                      a rating; two differently rated answers to
                                                           the same prompt make a pair (higher = chosen)

Where rows go (`feedback.path`):
- a local `.jsonl` file: appended under a lock (a thread lock plus `flock`, for several replicas on one
  host), each line one `write` on an `O_APPEND` descriptor, then fsync: concurrent posts never tear or
  lose a line;
- a folder, local or `s3://` prefix: one object per row (`<time>-<uuid>.jsonl`); S3 has no append, and
  a PUT is atomic, so no row is ever half written. Training jobs read such a folder as one data file
  (`data.train: s3://bucket/feedback/`).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

from ftray import storage

__all__ = ["FeedbackError", "FeedbackStore", "append_line"]


class FeedbackError(ValueError):
    def __init__(self, message: str, param: str, code: str = "invalid_feedback"):
        super().__init__(message)
        self.param, self.code = param, code


_LOCK = threading.Lock()


def append_line(path: str, line: str) -> None:
    """Append one line durably: one write() of the whole line on an O_APPEND descriptor, under a lock."""
    import fcntl

    data = (line.rstrip("\n") + "\n").encode("utf-8")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with _LOCK:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            written = os.write(fd, data)
            if written != len(data):  # a regular file takes the whole line or fails; never leave half of one
                raise OSError(f"{path}: short write ({written} of {len(data)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the flock


class FeedbackStore:
    def __init__(self, path: str, remember: int = 10_000):
        self.path, self.remember = path, remember
        self.per_record = storage.is_remote(path) or not path.endswith(".jsonl")
        self.recent: OrderedDict[str, dict] = OrderedDict()
        self.ratings: dict[str, dict[str, float]] = {}  # prompt key -> {completion ref: rating}
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
        entry["key"] = json.dumps([model, entry["history"], entry["prompt"]], sort_keys=True)
        with self._lock:
            for i, t in enumerate(texts, start=start):
                self.recent[f"{cid}:{i}"] = {**entry, "text": t}
                if i == 0:
                    self.recent[cid] = self.recent[f"{cid}:0"]
            while len(self.recent) > self.remember:
                self.recent.popitem(last=False)

    def _get(self, ref, field: str) -> dict:
        if not isinstance(ref, str) or not ref:
            raise FeedbackError(f"`{field}` must be a completion id string", field)
        with self._lock:
            hit = self.recent.get(ref)
        if hit is None:
            raise FeedbackError(
                f"`{field}`: no recent completion `{ref}` on this server (unknown, or older than the last "
                f"{self.remember} remembered)", field, "unknown_completion",
            )
        return hit

    # feedback ---------------------------------------------------------------------------------------
    def handle(self, body: dict) -> dict:
        """Validate one feedback body; write the preference rows it yields. Returns a summary."""
        unknown = set(body) - {"id", "rating", "chosen", "rejected", "comment"}
        if unknown:
            f = sorted(unknown)[0]
            raise FeedbackError(f"`{f}`: unknown field; send `id` + `rating`, or `chosen` + `rejected`", f)
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
            entry = self._get(body["id"], "id")
            rows = []
            with self._lock:
                seen = self.ratings.setdefault(entry["key"], {})
                others = dict(seen)
                seen[body["id"]] = float(rating)
            for ref, other in others.items():
                o = self.recent.get(ref)
                if o is None or other == rating or o["text"].strip() == entry["text"].strip():
                    continue
                hi, lo = ((entry, body["id"]), (o, ref)) if rating > other else ((o, ref), (entry, body["id"]))
                rows.append(self._row(hi[0], lo[0], hi[1], lo[1], "rating"))
        for row in rows:
            self._write(row)
        return {"object": "feedback", "accepted": True, "rows_written": len(rows)}

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

    def _write(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False)
        if self.per_record:
            name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
            storage.write_text_atomic(storage.join(self.path, name), line + "\n")
        else:
            append_line(self.path, line)
