"""TensorBoard events written while a job trains (rank 0), so `tensorboard --logdir RUN/tb` shows a run
as it goes: a local run folder gets them in place at each log step; an `s3://` one gets a copy of the
events at each checkpoint and at the end (S3 cannot append to an object)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ftray import storage

__all__ = ["Live", "LiveTensorBoard"]


class LiveTensorBoard:
    def __init__(self, out_dir: str, resumed_at: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.remote = storage.is_remote(out_dir)
        self.dst = storage.join(out_dir, "tb")
        self.local = Path(tempfile.mkdtemp(prefix="ftray-tb-")) if self.remote else Path(self.dst)
        if self.remote and storage.exists(self.dst):  # a resumed run continues the events it published
            storage.download_dir(self.dst, self.local)
            (self.local / ".complete").unlink(missing_ok=True)
        # Resumed at step T: events logged after T by the attempt that died are dropped (their steps are
        # trained again), so each step has one value.
        self.writer = SummaryWriter(str(self.local), purge_step=resumed_at + 1 if resumed_at else None)

    def add(self, rec: dict, flush: bool = False) -> None:
        for k, v in rec.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, rec["step"])
        if flush:
            self.writer.flush()

    def publish(self) -> None:
        """Flush; a remote run folder gets the events so far (a local one has them already)."""
        self.writer.flush()
        if self.remote:
            storage.sync_dir(self.local, self.dst)

    def close(self) -> None:
        self.writer.close()
        if self.remote:
            storage.sync_dir(self.local, self.dst, complete=True)
            shutil.rmtree(self.local, ignore_errors=True)
        else:
            (self.local / ".complete").write_text("ok\n")


class Live:
    """Rank 0's live sinks as one: TensorBoard events always, and a sink per tracker of `output.trackers`
    (`tracking`: `start_run`'s refs). `add` each step's record (`flush` at log steps), `publish` at
    checkpoints, `close` at the end."""

    def __init__(self, out_dir: str, resumed_at: int = 0, tracking: dict | None = None):
        self.sinks: list = [LiveTensorBoard(out_dir, resumed_at)]
        tracking = tracking or {}
        if "mlflow" in tracking:
            from ftray.train.tracking import MlflowSink

            self.sinks.append(MlflowSink(tracking["mlflow"]))
        if "wandb" in tracking:
            from ftray.train.tracking import WandbSink

            self.sinks.append(WandbSink(tracking["wandb"]))

    def add(self, rec: dict, flush: bool = False) -> None:
        for s in self.sinks:
            s.add(rec, flush)

    def publish(self) -> None:
        for s in self.sinks:
            s.publish()

    def close(self) -> None:
        for s in self.sinks:
            s.close()
