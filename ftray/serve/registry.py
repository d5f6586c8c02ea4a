"""Adapter lookup: a name from a request -> the adapter folder it stands for. No Ray, no torch.

Only two kinds of names resolve: those configured explicitly and the sub-folders of a registry
folder. A name is checked against `ADAPTER_NAME` before it touches a path, so "../x" or "a/b" never
reaches the filesystem. Registry folders are listed on each miss, so an adapter written there after
start-up (by a finished training run) is found without a restart; an adapter rewritten under the same
name (a run trained again into its folder) is noticed by `changed` and reloaded once it is complete.

Storage outages (S3 unreachable, timing out, answering 5xx): adapters already found keep being served,
unknown names answer 503 `storage_unavailable`, and for `outage_backoff_s` after a failure no request
waits on the store again (a refused connection costs botocore's retries, ~8 s, once).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

from ftray import storage
from ftray.serve.config import ADAPTER_NAME, GenerationModel

__all__ = ["AdapterError", "AdapterRegistry", "adapter_folder", "check_safetensors"]

log = logging.getLogger("ftray.serve")


class AdapterError(ValueError):
    """`status` is the HTTP status the ingress answers with."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_adapter"):
        super().__init__(message)
        self.status, self.code = status, code


def adapter_folder(path: str) -> str | None:
    """The folder holding adapter_config.json: `path` itself or `path/adapter` (an ftray run)."""
    for cand in (storage.join(path, "adapter"), path):
        if storage.exists(storage.file_in(cand, "adapter_config.json")):
            return cand
    return None


def check_safetensors(folder: str) -> None:
    if not storage.exists(storage.file_in(folder, "adapter_model.safetensors")):
        raise AdapterError(f"{Path(folder).name}: no adapter_model.safetensors (only safetensors are loaded)")


def _norm(p: str) -> str:
    return p.rstrip("/") if storage.is_remote(p) else str(Path(p).expanduser().resolve())


class AdapterRegistry:
    outage_backoff_s = 30.0

    def __init__(self, model: GenerationModel, base_path: str, miss_ttl_s: float = 1.0):
        self.model = model
        self.base_path = _norm(base_path)
        self._static = dict(model.adapters)
        self._found: dict[str, str] = {}
        # Unknown names, oldest first: kept for miss_ttl_s and at most `max_unknown_names` of them, so a
        # client sending endless new names (64 characters each) cannot grow a replica's memory.
        self._misses: OrderedDict[str, float] = OrderedDict()
        self._misses_lock = threading.Lock()  # the ingress looks names up from worker threads
        self._miss_ttl = miss_ttl_s  # the same unknown name asked again and again costs one listing a second
        self._stamps: dict[str, str | None] = {}  # name -> version of its adapter_model.safetensors
        self._checked: dict[str, float] = {}
        self._recheck = model.reload_check_s
        self._down_until, self._down_why = 0.0, ""  # the store failed: don't ask it again before this

    def validate(self, name: str) -> None:
        if not ADAPTER_NAME.match(name) or ".." in name:
            raise AdapterError(
                f"invalid adapter name {name[:80]!r}: use letters, digits, '.', '_', '-' (at most 64)",
                code="invalid_model",
            )

    def known(self, name: str) -> bool:
        """Whether `lookup(name)` answers from memory (no storage read)."""
        return name in self._found

    def lookup(self, name: str) -> str:
        """The adapter folder for `name`, or AdapterError (404 when no such adapter)."""
        self.validate(name)
        if name in self._found:
            return self._found[name]
        if name in self._static:
            with self.guard():
                folder = adapter_folder(self._static[name])
                if folder is None:
                    raise AdapterError(f"adapter {name}: {self._static[name]} holds no adapter_config.json", 500, "server_error")
                return self._remember(name, folder)
        if time.monotonic() - self._misses.get(name, -1e9) < self._miss_ttl:
            raise self._unknown(name)
        with self.guard():
            for reg in self.model.registry:
                if name in storage.listdir(reg):
                    folder = adapter_folder(storage.join(reg, name))
                    if folder is not None:
                        return self._remember(name, folder)
        self._missed(name)
        raise self._unknown(name)

    @contextmanager
    def guard(self):
        """Storage reads for a request: a 503 AdapterError while the store is down (at once within
        `outage_backoff_s` of the last failure, without waiting on it again)."""
        if time.monotonic() < self._down_until:
            raise self._down()
        try:
            yield
        except AdapterError:
            raise
        except Exception as e:
            if not storage.is_outage(e):
                raise
            if not self._down_why:
                log.warning("adapter storage unreachable (%s: %s): serving the adapters already loaded", type(e).__name__, e)
            self._down_until, self._down_why = time.monotonic() + self.outage_backoff_s, f"{type(e).__name__}: {e}"[:300]
            raise self._down() from e
        if self._down_why:
            log.warning("adapter storage reachable again")
            self._down_why = ""

    def _down(self) -> AdapterError:
        return AdapterError(
            f"adapter storage is unreachable ({self._down_why}); adapters already loaded keep answering, "
            f"retried within {self.outage_backoff_s:.0f} s",
            503,
            "storage_unavailable",
        )

    def _missed(self, name: str) -> None:
        now = time.monotonic()
        with self._misses_lock:
            self._misses.pop(name, None)
            self._misses[name] = now
            while len(self._misses) > self.model.max_unknown_names or now - next(iter(self._misses.values())) >= self._miss_ttl:
                self._misses.popitem(last=False)
                if not self._misses:
                    break

    def _unknown(self, name: str) -> AdapterError:
        return AdapterError(
            f"The model `{self.model.name}:{name}` does not exist (no adapter {name!r} in the registry)",
            404,
            "model_not_found",
        )

    def _remember(self, name: str, folder: str) -> str:
        run = folder.rstrip("/").rsplit("/", 1)[0] if folder.rstrip("/").endswith("/adapter") else None
        if run:  # a run folder: run.json is written last, so without it the run is still going
            rj = storage.join(run, "run.json")
            status = json.loads(storage.read_text(rj)).get("status") if storage.exists(rj) else "running"
            if status != "completed" or not storage.is_complete(folder):
                raise AdapterError(f"adapter {name}: its run is {status!r}, not completed", 409, "adapter_not_ready")
        cfg = json.loads(storage.read_text(storage.file_in(folder, "adapter_config.json")))
        kind = cfg.get("peft_type", "LORA")
        if kind != "LORA":  # peft selects adapters per request (mixed batches) for LoRA layers only
            raise AdapterError(
                f"adapter {name} is a {kind} adapter: the generation server batches LoRA adapters only; merge it "
                "into its base (`ftray export RUN --merge`) and serve the merged model as a base",
                400,
                "unsupported_adapter",
            )
        trained_on = cfg.get("base_model_name_or_path")
        if trained_on and (storage.is_remote(trained_on) or Path(trained_on).exists()):
            from ftray.models.load import resolve

            if _norm(resolve(trained_on).base) != self.base_path:
                raise AdapterError(f"adapter {name} was trained on {trained_on}, not on {self.model.name}", 400)
        check_safetensors(folder)
        self._found[name] = folder
        self._stamps[name] = storage.stamp(storage.file_in(folder, "adapter_model.safetensors"))
        self._checked[name] = time.monotonic()
        return folder

    def changed(self, name: str) -> bool:
        """True when the adapter `name` was rewritten since it was found and the new version is complete
        (then it is remembered as current). Checked at most every `reload_check_s` per name; while a
        rewrite is in progress (no weights, run not completed) the old version keeps being served."""
        if name not in self._found or self._recheck is None:
            return False
        now = time.monotonic()
        if now - self._checked.get(name, -1e9) < self._recheck:
            return False
        self._checked[name] = now
        folder = self._found[name]
        try:
            with self.guard():
                now_stamp = storage.stamp(storage.file_in(folder, "adapter_model.safetensors"))
                if now_stamp is None or now_stamp == self._stamps.get(name):
                    return False  # None: no weights this instant (a local folder renamed over by a new version)
                self._remember(name, folder)
        # Not complete yet, its files gone between two reads (replaced again), or the store down: the loaded
        # version keeps answering.
        except (AdapterError, FileNotFoundError):
            return False
        return True

    def names(self) -> list[str]:
        out = set(self._static) | set(self._found)
        try:
            with self.guard():
                for reg in self.model.registry:
                    for n in storage.listdir(reg):
                        if ADAPTER_NAME.match(n) and adapter_folder(storage.join(reg, n)) is not None:
                            out.add(n)
        except AdapterError:  # the store is down: what is known
            pass
        return sorted(out)
