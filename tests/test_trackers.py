"""`output.trackers: [mlflow]` against a real `mlflow server` on loopback (conftest's `mlflow_server`): a
job's run carries the resolved spec as parameters, every step's metrics and the run folder as artifacts,
read back through `mlflow.search_runs` and the client; bad tracker settings are refused before anything
starts. A sweep's trials as children of the sweep's run: tests/test_tune.py."""

from __future__ import annotations

import json

import pytest

from ftray.config import SpecError, resolve_paths, spec_from_dict
from tests._specs import free_port, job_dict, run_here


def _job(tiny_model, arith, out, cache_dir, **output) -> dict:
    return job_dict(tiny_model, arith[0], arith[1], out, cache_dir, scaling__num_workers=1, train__max_steps=5,
                    train__global_batch_size=4, train__eval_every=2, **{f"output__{k}": v for k, v in output.items()})


def test_tracker_settings_are_refused_before_anything_starts(tiny_model, arith, cache_dir, tmp_path, monkeypatch):
    from ftray.train.launch import check_job

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SpecError, match=r"output.trackers: mlflow needs a tracking server: set output.tracking_uri"):
        check_job(resolve_paths(spec_from_dict(_job(tiny_model, arith, tmp_path / "a", cache_dir, trackers=["mlflow"]))))
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SpecError, match=rf"output.tracking_uri: the MLflow server at {closed} did not answer"):
        check_job(resolve_paths(spec_from_dict(_job(tiny_model, arith, tmp_path / "b", cache_dir, trackers=["mlflow"],
                                                    tracking_uri=closed))))
    with pytest.raises(SpecError, match=r"output.trackers.0"):
        spec_from_dict(_job(tiny_model, arith, tmp_path / "c", cache_dir, trackers=["neptune"]))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_job_reports_params_every_step_and_its_run_folder(tiny_model, arith, cache_dir, tmp_path, mlflow_server):
    import mlflow
    from mlflow import MlflowClient

    out = tmp_path / "tracked"
    record = run_here(_job(tiny_model, arith, out, cache_dir, trackers=["mlflow"], tracking_uri=mlflow_server,
                           experiment="ftray-tests-job"))
    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["ftray-tests-job"], output_format="list")
    (run,) = [r for r in runs if r.data.tags.get("ftray.output_dir") == str(out)]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    p = run.data.params
    assert p["method.kind"] == "sft" and p["adapter.kind"] == "lora" and float(p["train.lr"]) == 1e-3
    assert p["model.path"] == str(tiny_model) and p["train.max_steps"] == "5"
    client = MlflowClient(mlflow_server)
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in ("loss", "eval/eval_loss")}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # Every step's loss, the same numbers as the run folder's metrics.jsonl; evaluations at 0, 2, 4 and 5.
    want = [(h["step"], h["loss"]) for h in lines if "loss" in h]
    assert [s for s, _ in sorted(history["loss"])] == [s for s, _ in want] == [1, 2, 3, 4, 5]
    assert [v for _, v in sorted(history["loss"])] == pytest.approx([v for _, v in want])
    assert [s for s, _ in sorted(history["eval/eval_loss"])] == [0, 2, 4, 5]
    assert dict(history["eval/eval_loss"])[5] == pytest.approx(record["eval"]["after"]["eval_loss"])
    assert {"loss", "lr", "tokens", "step_time", "eval/eval_loss", "eval/perplexity"} <= set(run.data.metrics)
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"run.json", "metrics.jsonl", "adapter", "tokenizer"} <= arts and "checkpoints" not in arts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "adapter")} >= {"adapter/adapter_config.json",
                                                                                   "adapter/adapter_model.safetensors"}
