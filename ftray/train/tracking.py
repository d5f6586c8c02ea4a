"""Experiment trackers a job reports to beside its run folder (`output.trackers`). MLflow: the driver
creates one MLflow run per job (its parameters: the resolved spec, flattened to dotted keys; a sweep's
trials are children of the sweep's run), rank 0 sends every step's metrics while it trains (at each log
step), and when the run folder is written the driver logs it as artifacts (checkpoints left out) and
closes the MLflow run. Through `mlflow.MlflowClient` (the `mlflow-skinny` package) against the tracking
server of `output.tracking_uri` or `$MLFLOW_TRACKING_URI`. No Ray here."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time

from ftray import storage

__all__ = ["MlflowSink", "check_trackers", "finish_run", "finish_sweep_run", "start_run", "start_sweep_run"]

_ENV_URI, _ENV_EXPERIMENT = "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"


def _uri(output) -> str | None:
    return output.tracking_uri or os.environ.get(_ENV_URI)


def _experiment(output) -> str:
    return output.experiment or os.environ.get(_ENV_EXPERIMENT) or "ftray"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(name)


def check_trackers(output) -> None:
    """Before any Ray resource: the tracker's package is there and its server answers (SpecError)."""
    from ftray.config import SpecError

    if "mlflow" not in output.trackers:
        return
    uri = _uri(output)
    if not uri:
        raise SpecError(f"output.trackers: mlflow needs a tracking server: set output.tracking_uri or ${_ENV_URI}")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise SpecError("output.trackers: mlflow: the mlflow client is not installed (pip install mlflow-skinny)") from None
    try:
        if uri.startswith(("http://", "https://")):  # one quick look first: the client retries for minutes
            import urllib.request

            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        _client(uri).get_experiment_by_name(_experiment(output))  # a read: `ftray validate` writes nothing
    except Exception as e:  # noqa: BLE001 - any failure to reach it is the same refusal
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise SpecError(f"output.tracking_uri: the MLflow server at {uri} did not answer: {first}") from None


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = str(v)[:6000]  # MLflow's limit on a parameter's value
    return out


def start_run(spec, parent_run_id: str | None = None) -> dict | None:
    """The job's MLflow run (None when it tracks nothing): {"tracking_uri", "run_id"}, handed to rank 0
    and to `finish_run`. A rerun of the same run folder (a resume) continues the run it made before."""
    if "mlflow" not in spec.output.trackers:
        return None
    from mlflow.entities import Param, RunTag

    uri = _uri(spec.output)
    client = _client(uri)
    exp = _experiment_id(client, _experiment(spec.output))
    found = client.search_runs([exp], filter_string=f"tags.`ftray.output_dir` = '{spec.output.dir}'", max_results=1)
    if found and found[0].info.status != "FINISHED":
        client.update_run(found[0].info.run_id, status="RUNNING")
        return {"tracking_uri": uri, "run_id": found[0].info.run_id}
    tags = {"ftray.output_dir": spec.output.dir, "ftray.method": spec.method.kind, "ftray.adapter": spec.adapter.kind}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp, run_name=spec.run_name, tags=tags)
    params = [Param(k, v) for k, v in sorted(_flat(spec.model_dump(mode="json")).items())]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
        client.log_batch(run.info.run_id, params=params[i : i + 100], tags=[RunTag("ftray.kind", "job")] if i == 0 else [])
    return {"tracking_uri": uri, "run_id": run.info.run_id}


def start_sweep_run(output, sweep_dir: str, name: str, params: dict) -> str | None:
    """The sweep's parent MLflow run (its trials' runs are its children), or None; `output`: the base
    job's output spec (its trackers, server and experiment). A resumed sweep keeps its run."""
    if "mlflow" not in output.trackers:
        return None
    from mlflow.entities import Param

    client = _client(_uri(output))
    exp = _experiment_id(client, _experiment(output))
    found = client.search_runs([exp], filter_string=f"tags.`ftray.output_dir` = '{sweep_dir}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp, run_name=name, tags={"ftray.kind": "sweep", "ftray.output_dir": sweep_dir})
    ps = [Param(k, v) for k, v in sorted(_flat(params).items())]
    for i in range(0, len(ps), 100):
        client.log_batch(run.info.run_id, params=ps[i : i + 100])
    return run.info.run_id


def finish_sweep_run(output, parent_run_id: str | None) -> None:
    """The sweep's run closed; its trials' runs that never finished (stopped early by the scheduler, their
    actor ended) marked KILLED, so that nothing stays RUNNING."""
    if parent_run_id is None:
        return
    client = _client(_uri(output))
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=1000)
    for run in children:
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")
    client.set_terminated(parent_run_id, status="FINISHED")


def finish_run(ref: dict | None, run_dir: str | None, status: str = "FINISHED") -> None:
    """The run folder as the MLflow run's artifacts (checkpoints left out: they are Ray Train's), and its
    status. `run_dir` None: a failed job, only the status."""
    if ref is None:
        return
    client = _client(ref["tracking_uri"])
    if run_dir is not None:
        for name in storage.listdir(run_dir):
            if name == "checkpoints" or name.startswith("."):
                continue
            src = storage.join(run_dir, name)
            folder = storage.isdir(src)
            with storage.local_copy(src) if folder else _local_file(src) as local:
                if folder:
                    client.log_artifacts(ref["run_id"], str(local), artifact_path=name)
                else:
                    client.log_artifact(ref["run_id"], str(local))
    client.set_terminated(ref["run_id"], status=status)


@contextlib.contextmanager
def _local_file(path: str):
    """A local path to the file `path` (a temporary copy, same name, when it is remote)."""
    if not storage.is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="ftray-art-") as d:
        fs, p = storage.filesystem(path)
        local = os.path.join(d, path.rstrip("/").rsplit("/", 1)[-1])
        fs.get_file(p, local)
        yield local


class MlflowSink:
    """Rank 0's live metrics: each step's record, sent in one batch at each log step (and at the end)."""

    def __init__(self, ref: dict):
        self.client, self.run_id = _client(ref["tracking_uri"]), ref["run_id"]
        self.pending: list = []

    def add(self, rec: dict, flush: bool = False) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for k, v in rec.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                self.pending.append(Metric(k, float(v), ts, int(rec["step"])))
        if flush:
            self.publish()

    def publish(self) -> None:
        for i in range(0, len(self.pending), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=self.pending[i : i + 1000])
        self.pending = []

    def close(self) -> None:
        self.publish()
