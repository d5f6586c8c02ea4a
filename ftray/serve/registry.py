"""Adapter lookup: a name from a request -> the adapter folder it stands for. No Ray, no torch.

Only two kinds of names resolve: those configured explicitly and the sub-folders of a registry
folder. A name is checked against `ADAPTER_NAME` before it touches a path, so "../x" or "a/b" never
reaches the filesystem. Registry folders are listed on each miss, so an adapter written there after
start-up (by a finished training run) is found without a restart; an adapter rewritten under the same
name (a run trained again into its folder) is noticed by `changed` and reloaded once it is complete.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from pathlib import Path

from ftray import storage
from ftray.serve.config import ADAPTER_NAME, GenerationModel

__all__ = ["AdapterError", "AdapterRegistry", "adapter_folder", "check_safetensors"]


class AdapterError(ValueError):
    """`status` is the HTTP status the ingress answers with."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_adapter"):
        super().__init__(message)
        self.status, self.code = status, code


def adapter_folder(path: str) -> str | None:
    """The folder holding adapter_config.json: `path` itself or `path/adapter` (an ftray run)."""
    for cand in (storage.join(path, "adapter"), path):
        if storage.exists(storage.join(cand, "adapter_config.json")):
            return cand
    return None


def check_safetensors(folder: str) -> None:
    if not storage.exists(storage.join(folder, "adapter_model.safetensors")):
        raise AdapterError(f"{Path(folder).name}: no adapter_model.safetensors (only safetensors are loaded)")


def _norm(p: str) -> str:
    return p.rstrip("/") if storage.is_remote(p) else str(Path(p).expanduser().resolve())


class AdapterRegistry:
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

    def validate(self, name: str) -> None:
        if not ADAPTER_NAME.match(name) or ".." in name:
            raise AdapterError(
                f"invalid adapter name {name[:80]!r}: use letters, digits, '.', '_', '-' (at most 64)",
                code="invalid_model",
            )

    def lookup(self, name: str) -> str:
        """The adapter folder for `name`, or AdapterError (404 when no such adapter)."""
        self.validate(name)
        if name in self._found:
            return self._found[name]
        if name in self._static:
            folder = adapter_folder(self._static[name])
            if folder is None:
                raise AdapterError(f"adapter {name}: {self._static[name]} holds no adapter_config.json", 500, "server_error")
            return self._remember(name, folder)
        if time.monotonic() - self._misses.get(name, -1e9) < self._miss_ttl:
            raise self._unknown(name)
        for reg in self.model.registry:
            if name in storage.listdir(reg):
                folder = adapter_folder(storage.join(reg, name))
                if folder is not None:
                    return self._remember(name, folder)
        self._missed(name)
        raise self._unknown(name)

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
        cfg = json.loads(storage.read_text(storage.join(folder, "adapter_config.json")))
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
        self._stamps[name] = storage.stamp(storage.join(folder, "adapter_model.safetensors"))
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
        if storage.stamp(storage.join(folder, "adapter_model.safetensors")) == self._stamps.get(name):
            return False
        try:
            self._remember(name, folder)
        except AdapterError:
            return False
        return True

    def names(self) -> list[str]:
        out = set(self._static)
        for reg in self.model.registry:
            for n in storage.listdir(reg):
                if ADAPTER_NAME.match(n) and adapter_folder(storage.join(reg, n)) is not None:
                    out.add(n)
        return sorted(out)
