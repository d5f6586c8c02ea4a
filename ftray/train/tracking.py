"""Experiment trackers a job reports to beside its run folder (`output.trackers`). The driver starts the
job's tracker runs (`start_run`: a ref per tracker, handed to rank 0 and to `finish_run`), rank 0 sends
every step's metrics while it trains (`MlflowSink`, `WandbSink`), and when the run folder is written the
driver logs it (checkpoints left out) and ends the runs. No Ray here.

MLflow: through `mlflow.MlflowClient` (the `mlflow-skinny` package) against the tracking server of
`output.tracking_uri` or `$MLFLOW_TRACKING_URI`; the driver creates the run (parameters: the resolved spec,
flattened to dotted keys; a sweep's trials are children of the sweep's run).

W&B: a run process-bound (`wandb.init`), so it is opened where it is written: rank 0 opens it with the
resolved spec as config and logs every step, then finishes it; after run.json is written the driver
resumes the same run id to log the run folder as an Artifact and finish with the job's exit code (a failed
job: 1). The id is derived from `output.dir`, so a rerun (a resume) of the folder continues the same W&B
run; a sweep's trials are grouped under the sweep. W&B's own variables ($WANDB_MODE, $WANDB_DIR,
$WANDB_API_KEY, $WANDB_ENTITY, ...) apply as wandb reads them; the project is `output.experiment`, else
$WANDB_PROJECT, else `ftray`."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time

from ftray import storage

__all__ = [
    "MlflowSink",
    "WandbSink",
    "check_trackers",
    "finish_run",
    "finish_sweep_run",
    "start_run",
    "start_sweep_run",
]

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
    """Before any Ray resource: each tracker's package is there and it can log (SpecError). Reads only:
    `ftray validate` writes nothing."""
    if "mlflow" in output.trackers:
        _check_mlflow(output)
    if "wandb" in output.trackers:
        _check_wandb()


def _check_mlflow(output) -> None:
    from ftray.config import SpecError

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


def _wandb_settings():
    """wandb's settings as it resolves them ($WANDB_*, `wandb offline`'s settings files), without starting
    its service process (`wandb.setup()` would)."""
    from wandb.sdk import wandb_setup

    return wandb_setup.singleton().settings


def _wandb_mode() -> str:
    # wandb fixes its settings from the environment once per process; $WANDB_MODE read now wins, as it does
    # over the settings files (a long-lived process, the tests, may change it between jobs).
    return os.environ.get("WANDB_MODE") or _wandb_settings().mode


def _check_wandb() -> None:
    from ftray.config import SpecError

    try:
        import wandb  # noqa: F401
    except ImportError:
        raise SpecError("output.trackers: wandb: the wandb client is not installed (pip install wandb)") from None
    if _wandb_mode() in ("offline", "dryrun", "disabled"):
        return
    from wandb.sdk.lib import wbauth

    # Where wandb.init looks for a key (its own order): the environment, then the netrc entry `wandb login`
    # writes. Without one, wandb.init in a worker fails after training has started (no terminal to ask at).
    settings = _wandb_settings()
    try:
        key = (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE")
               or wbauth.read_netrc_auth(host=settings.base_url))
    except Exception as e:  # noqa: BLE001 - a malformed key is the same refusal
        raise SpecError(f"output.trackers: wandb: its credentials for {settings.base_url} are unusable: {e}") from None
    if not key:
        raise SpecError(f"output.trackers: wandb logs online to {settings.base_url} and has no credentials: set "
                        "WANDB_API_KEY (or run `wandb login`), or WANDB_MODE=offline to log locally and `wandb sync` later")


def _flat(d: dict, prefix: str = "", text: bool = True) -> dict:
    """Nested dicts as dotted keys; `text`: values as strings (MLflow parameters), else as they are."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + ".", text))
        else:
            out[key] = str(v)[:6000] if text else v  # MLflow's limit on a parameter's value
    return out


def start_run(spec, parent: dict | None = None) -> dict | None:
    """The job's tracker runs (None when it tracks nothing): {"mlflow": {"tracking_uri", "run_id"}, "wandb":
    what `wandb.init` needs}, handed to rank 0 and to `finish_run`. `parent`: the sweep's (`start_sweep_run`).
    A rerun of the same run folder (a resume) continues the runs it made before."""
    parent = parent or {}
    ref = {}
    if "mlflow" in spec.output.trackers:
        ref["mlflow"] = _start_mlflow(spec, parent.get("mlflow"))
    if "wandb" in spec.output.trackers:
        ref["wandb"] = _wandb_ref(spec, parent.get("wandb"))
    return ref or None


def _start_mlflow(spec, parent_run_id: str | None) -> dict:
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


def _wandb_where() -> dict:
    """How and where W&B logs, as the launching process sees it ($WANDB_MODE, $WANDB_DIR, else its working
    folder, as wandb's default): rank 0 and a sweep's trials run in Ray workers, whose environment and
    working folder are Ray's, and log the same way."""
    return {"mode": _wandb_mode(), "dir": os.environ.get("WANDB_DIR") or os.getcwd()}


def _wandb_ref(spec, sweep: dict | None) -> dict:
    """Everything `wandb.init` gets, on rank 0 and again in the driver (a plain dict: it travels to rank 0
    in the train loop's config). The mode is the one `check_trackers` checked, so rank 0 logs the same way;
    `sweep`: the sweep's group, mode and folder (`start_sweep_run`)."""
    out = spec.output
    group = sweep["group"] if sweep else None
    return {
        "project": out.experiment or os.environ.get("WANDB_PROJECT") or "ftray",
        # 16 hex digits of the folder's hash: the same folder, the same W&B run (ids are unique per project).
        "id": hashlib.sha256(out.dir.encode()).hexdigest()[:16],
        "name": spec.run_name,
        "group": group,
        "job_type": "trial" if group else spec.method.kind,
        "tags": [spec.method.kind, spec.adapter.kind],
        "config": _flat(spec.model_dump(mode="json"), text=False),
        **({k: sweep[k] for k in ("mode", "dir")} if sweep else _wandb_where()),
    }


_WANDB_OPEN: dict = {}  # W&B runs open in this process, by id: rank 0's when the job runs in-process


def _wandb_init(ref: dict):
    import wandb

    # console off: the step lines are the job's log already (Ray's job logs); reinit create_new: never
    # touch a run the user's own code has open in this process.
    settings = wandb.Settings(console="off", silent=True, reinit="create_new")
    run = wandb.init(project=ref["project"], id=ref["id"], name=ref["name"], group=ref["group"],
                     job_type=ref["job_type"], tags=ref["tags"], config=ref["config"], mode=ref["mode"],
                     dir=ref["dir"], resume="allow", settings=settings)
    _WANDB_OPEN[ref["id"]] = run
    return run


def _wandb_finish(run, exit_code: int) -> None:
    run.finish(exit_code=exit_code)
    _WANDB_OPEN.pop(run.id, None)


def start_sweep_run(output, sweep_dir: str, name: str, params: dict) -> dict | None:
    """What the sweep's trials' runs hang from (None: no tracker): {"mlflow": the sweep's parent run id
    (its trials' runs are its children), "wandb": the group of its trials' runs (the sweep's name) and where they log};
    `output`: the base job's output spec. A resumed sweep keeps its parent run."""
    ref = {}
    if "mlflow" in output.trackers:
        ref["mlflow"] = _start_mlflow_sweep(output, sweep_dir, name, params)
    if "wandb" in output.trackers:
        ref["wandb"] = {"group": name, **_wandb_where()}
    return ref or None


def _start_mlflow_sweep(output, sweep_dir: str, name: str, params: dict) -> str:
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


def finish_sweep_run(output, parent: dict | None) -> None:
    """The sweep's MLflow run closed; its trials' runs that never finished (stopped early by the scheduler,
    their actor ended) marked KILLED, so that nothing stays RUNNING. (A W&B group has nothing to close.)"""
    parent_run_id = (parent or {}).get("mlflow")
    if parent_run_id is None:
        return
    client = _client(_uri(output))
    run = client.get_run(parent_run_id)
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=1000)
    for child in children:
        if child.info.status == "RUNNING":
            client.set_terminated(child.info.run_id, status="KILLED")
    client.set_terminated(parent_run_id, status="FINISHED")


def finish_run(ref: dict | None, run_dir: str | None, status: str = "FINISHED") -> None:
    """The run folder logged to each tracker (checkpoints left out: they are Ray Train's), and the runs
    ended with `status` (FINISHED or FAILED). `run_dir` None: a failed job, only the status."""
    if ref is None:
        return
    if "mlflow" in ref:
        _finish_mlflow(ref["mlflow"], run_dir, status)
    if "wandb" in ref:
        _finish_wandb(ref["wandb"], run_dir, status)


def _run_folder_entries(run_dir: str):
    """(name, local path, is a folder) for each entry of the run folder that a tracker keeps."""
    for name in storage.listdir(run_dir):
        if name == "checkpoints" or name.startswith("."):
            continue
        src = storage.join(run_dir, name)
        folder = storage.isdir(src)
        with storage.local_copy(src) if folder else _local_file(src) as local:
            yield name, str(local), folder


def _finish_mlflow(ref: dict, run_dir: str | None, status: str) -> None:
    client = _client(ref["tracking_uri"])
    if run_dir is not None:
        for name, local, folder in _run_folder_entries(run_dir):
            if folder:
                client.log_artifacts(ref["run_id"], local, artifact_path=name)
            else:
                client.log_artifact(ref["run_id"], local)
    client.set_terminated(ref["run_id"], status=status)


def _finish_wandb(ref: dict, run_dir: str | None, status: str) -> None:
    import wandb

    code = 0 if status == "FINISHED" else 1
    left = _WANDB_OPEN.get(ref["id"])  # an in-process rank 0 that failed left its run open: it ends first
    if left is not None:
        _wandb_finish(left, code)
    run = _wandb_init(ref)
    if run_dir is not None:
        art = wandb.Artifact(re.sub(r"[^\w.-]", "-", ref["name"]) or ref["id"], type="ftray-run",
                             metadata={"output_dir": run_dir})
        for name, local, folder in _run_folder_entries(run_dir):
            # The default policy copies each file into wandb's staging area now: a remote folder's
            # temporary copy is gone before the upload.
            if folder:
                art.add_dir(local, name=name)
            else:
                art.add_file(local, name=name)
        run.log_artifact(art)
    _wandb_finish(run, code)


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


class WandbSink:
    """Rank 0's live metrics in its W&B run: each step's record as that step's row. W&B streams what is
    logged, so `publish` has nothing to do; `close` finishes this part of the run (the driver resumes it
    for the run folder)."""

    def __init__(self, ref: dict):
        self.run = _wandb_init(ref)

    def add(self, rec: dict, flush: bool = False) -> None:
        row = {k: v for k, v in rec.items() if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}
        # A resumed run logs again the steps after its checkpoint: W&B keeps the first values (its steps
        # only go forward) and warns.
        self.run.log(row, step=int(rec["step"]))

    def publish(self) -> None:
        pass

    def close(self) -> None:
        _wandb_finish(self.run, 0)
