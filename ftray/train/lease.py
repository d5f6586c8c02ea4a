"""One run at a time per folder: the driver of a job (or a sweep) holds a lease file in its `output.dir`, local or
s3://, for as long as it runs, and a second run started on that folder is refused before it takes anything.

The lease names its owner (host, pid, the process's start time, the command) and a heartbeat the owner rewrites
every `ttl_s / 4` seconds. A lease is stale, and the next run takes it over, when its owner's process is gone
(seen from the same host: a killed driver's rerun resumes at once) or its heartbeat is older than `ttl_s` (an
owner on another host, or one whose machine died). To take over by hand, delete `<output.dir>/.ftray-lease.json`.

Local folders: the lease is created by a hard link of a complete file (atomic, fails when one exists). Object
stores have no exclusive create: the lease is written, then read back after `S3_SETTLE_S`; of two runs that
raced, the one whose write landed last keeps it and the other is refused.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from ftray import storage
from ftray.config import SpecError

__all__ = ["LEASE", "Lease", "TTL_S"]

LEASE = ".ftray-lease.json"
TTL_S = 120.0  # a heartbeat every 30 s; an owner on another host is taken for dead 2 min after its last one
S3_SETTLE_S = 1.0  # read-back delay on an object store: far above one PUT's latency


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        p = psutil.Process(pid)
        return None if p.status() == psutil.STATUS_ZOMBIE else p.create_time()
    except psutil.Error:
        return None


def _read(path: str) -> dict | None:
    try:
        rec = json.loads(storage.read_text(path))
    except (FileNotFoundError, ValueError, OSError):
        return None
    return rec if isinstance(rec, dict) else None


def stale_reason(rec: dict, now: float | None = None) -> str | None:
    """Why the lease `rec` no longer holds its folder (None: its owner is alive)."""
    now = time.time() if now is None else now
    if rec.get("host") == socket.gethostname():
        start = _process_start(int(rec.get("pid", -1)))
        if start is None or abs(start - float(rec.get("pid_start") or 0)) > 1.0:
            return f"its process {rec.get('pid')} is gone"
    age = now - float(rec.get("heartbeat") or 0)
    if age > float(rec.get("ttl_s", TTL_S)):
        return f"no heartbeat for {age:.0f} s"
    return None


class Lease:
    """`with Lease(folder):` holds `folder` for the block (a heartbeat thread keeps it fresh); `field` names the
    spec field in the refusal."""

    def __init__(self, folder: str, field: str = "output.dir", ttl_s: float = TTL_S, log=print):
        self.folder, self.field, self.ttl_s, self.log = str(folder), field, ttl_s, log
        self.path = storage.join(self.folder, LEASE)
        self.token = uuid.uuid4().hex
        self.lost = False
        self._created = False  # this lease made the (local) folder: removed again when it is left empty
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        now = time.time()
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_start": _process_start(os.getpid()), "command": " ".join(sys.argv)[:300],
                "heartbeat": now, "ttl_s": self.ttl_s}

    def _refuse(self, rec: dict) -> SpecError:
        if not rec:
            return SpecError(f"{self.field}: {self.folder} holds a lease that cannot be read ({self.path}); if no "
                             "other run uses the folder, delete it")
        age = time.time() - float(rec.get("heartbeat") or 0)
        return SpecError(
            f"{self.field}: {self.folder} is in use by another run (pid {rec.get('pid')} on {rec.get('host')}, "
            f"`{rec.get('command', '?')}`, heartbeat {age:.0f} s ago); wait for it to end, or if it is dead delete "
            f"{self.path} (a lost owner's lease expires {rec.get('ttl_s', TTL_S):.0f} s after its last heartbeat)"
        )

    # ------------------------------------------------------------------ local: link/rename, both atomic
    def _write_local(self, rec: dict, exclusive: bool) -> bool:
        target = Path(storage.filesystem(self.path)[1])
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(rec))
            f.flush()
            os.fsync(f.fileno())
        try:
            if not exclusive:
                os.replace(tmp, target)
                return True
            try:
                os.link(tmp, target)
                return True
            except FileExistsError:
                return False
        finally:
            tmp.unlink(missing_ok=True)

    def _take_stale_local(self, stale: dict) -> None:
        """Move a stale lease aside, unless another run replaced it meanwhile (then put that one back)."""
        target = Path(storage.filesystem(self.path)[1])
        aside = target.with_name(f".{target.name}.{uuid.uuid4().hex}.stale")
        try:
            os.rename(target, aside)
        except FileNotFoundError:
            return
        moved = _read(str(aside))
        if moved is not None and moved.get("token") != stale.get("token"):
            try:
                os.link(aside, target)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    # ------------------------------------------------------------------
    def acquire(self) -> Lease:
        remote = storage.is_remote(self.path)
        self._created = not remote and not storage.exists(self.folder)
        for _ in range(3):
            held = _read(self.path)
            if held is not None:
                why = stale_reason(held)
                if why is None:
                    raise self._refuse(held)
                self.log(f"[ftray] {self.field}: taking over the lease of pid {held.get('pid')} on {held.get('host')} "
                         f"({why})", flush=True)
                if not remote:
                    self._take_stale_local(held)
                    continue
            if not remote:
                if self._write_local(self._record(), exclusive=True):
                    break
                continue  # another run created it first: read it again
            storage.write_text_atomic(self.path, json.dumps(self._record()))
            time.sleep(S3_SETTLE_S)
            now = _read(self.path)
            if now is None or now.get("token") != self.token:
                raise self._refuse(now or {})
            break
        else:
            raise self._refuse(_read(self.path) or {})
        self._thread = threading.Thread(target=self._beat, name="ftray-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.heartbeat()
            except Exception as e:  # noqa: BLE001 - a storage blip: the next beat tries again
                self.log(f"[ftray] warning: lease heartbeat on {self.path} failed: {e}", flush=True)

    def heartbeat(self) -> None:
        held = _read(self.path)
        if held is None or held.get("token") != self.token:
            if not self.lost:
                self.lost = True
                self.log(f"[ftray] warning: {self.path} was taken over by another run; two runs now write "
                         f"{self.folder}", flush=True)
            return
        rec = {**held, "heartbeat": time.time()}
        if storage.is_remote(self.path):
            storage.write_text_atomic(self.path, json.dumps(rec))
        else:
            self._write_local(rec, exclusive=False)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = _read(self.path)
        if held is not None and held.get("token") == self.token:
            storage.remove(self.path)
        if self._created:
            try:
                Path(storage.filesystem(self.folder)[1]).rmdir()  # only when nothing else was written there
            except OSError:
                pass

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
