"""The adapter published while a job trains (`output.publish_to`): after each checkpoint and at the end, rank 0
puts the current adapter into `<publish_to>/<publish_name>/`, a complete peft folder that an endpoint serving
that registry folder (`ftray/serve/registry.py`) picks up on its next use, without a restart.

What a reader can rely on (the registry's rules): a folder is an adapter once its adapter_config.json is there,
and a new version replaces the old one whole. Locally it is written aside and renamed into place; on S3 the first
version is uploaded with adapter_config.json last, and every later one beside the current one and switched to by
one PUT of the `.complete` marker (`storage.publish_dir`). `ftray_publish.json` beside the weights says which
step they are, and their sha256.

The step path pays for the adapter's `save_pretrained` into a local folder (under ZeRO-3 its parameters are
gathered first: every rank calls `publish`, only rank 0 writes); the copy or upload runs on a background thread
while the next steps train. A failed publish is reported and training goes on: the next one publishes newer
weights."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ftray import storage

__all__ = ["PUBLISH_FILE", "Publisher"]

PUBLISH_FILE = "ftray_publish.json"


def _log(*a, **k):
    print(*a, **{**k, "file": sys.__stdout__})  # as the loop's rank-0 lines (Ray Train's print shows each twice)


class Publisher:
    def __init__(self, spec, base: str, steps: int, rank: int, log=_log):
        self.spec, self.base, self.steps, self.rank, self.log = spec, base, steps, rank, log
        self.dest = storage.join(spec.output.publish_to, spec.publish_name)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftray-publish") if rank == 0 else None
        self._pending: Future | None = None
        self.step_path_s: list[float] = []  # per publish: saving the adapter (+ waiting for the one before)
        self.background_s: list[float] = []  # per publish: the sha256, the copy or upload, the switch
        self.published: list[int] = []
        self.failed: list[int] = []

    def publish(self, engine, step: int, final: bool = False) -> None:
        """The adapter as it is after `step`. Collective under ZeRO-3."""
        import deepspeed

        t0 = time.time()
        model = engine.module
        staging = Path(tempfile.mkdtemp(prefix="ftray-publish-")) if self.rank == 0 else None
        try:
            trainable = [p for p in model.parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters(trainable, enabled=self.spec.deepspeed.zero_stage == 3):
                if self.rank == 0:
                    # The registry serves an adapter only on the base it was trained on.
                    model.peft_config["default"].base_model_name_or_path = self.base
                    model.save_pretrained(str(staging), safe_serialization=True)
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.rank != 0:
            return
        self._wait()  # versions go out in step order, and one staging folder waits at a time
        self.step_path_s.append(time.time() - t0)
        self._pending = self._pool.submit(self._write, staging, step, final, self.step_path_s[-1])

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def _write(self, staging: Path, step: int, final: bool, step_path_s: float) -> None:
        t0 = time.time()
        try:
            with open(staging / "adapter_model.safetensors", "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            record = {"name": self.spec.publish_name, "run": self.spec.run_name, "output_dir": self.spec.output.dir,
                      "step": step, "steps": self.steps, "final": final, "base": self.base, "sha256": digest,
                      "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (staging / PUBLISH_FILE).write_text(json.dumps(record, indent=1) + "\n")
            storage.publish_dir(staging, self.dest, last=("adapter_config.json",))
        except Exception as e:  # noqa: BLE001 - the store is the serving side's; the checkpoint is already stored
            self.failed.append(step)
            self.log(f"[ftray] warning: publishing the adapter of step {step} to {self.dest} failed "
                     f"({type(e).__name__}: {str(e)[:200]}); training goes on, the next one publishes again", flush=True)
            return
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.background_s.append(time.time() - t0)
        self.published.append(step)
        self.log(f"[ftray] published the adapter of step {step} to {self.dest} "
                 f"({step_path_s:.3f} s on the step path, "
                 f"{self.background_s[-1]:.3f} s in the background)", flush=True)

    def close(self) -> dict | None:
        """Waits for the last publish. What publishing cost (rank 0; None on the other ranks), for run.json."""
        if self._pool is None:
            return None
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)

        def stats(xs: list[float]) -> dict:
            return {"mean": sum(xs) / len(xs), "max": max(xs)} if xs else {}

        return {"to": self.dest, "steps": self.published, "failed_steps": self.failed,
                "step_path_seconds": stats(self.step_path_s), "background_seconds": stats(self.background_s)}
