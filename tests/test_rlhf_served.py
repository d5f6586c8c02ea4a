"""The served reward model that grpo's rollouts are scored by: reached through its Serve deployment handle,
a killed replica is survived (the call retries), a reward service that stays down fails with one clear
line within its timeout, and a grpo job deploys it from a `reward` run folder and logs its scores."""

from __future__ import annotations

import json
import threading
import time

import pytest

from ftray.config import RewardModelRef, resolve_paths, spec_from_dict
from ftray.rlhf.served import RewardServiceError, ServedReward, check_reward_app, deploy_reward_app
from tests._serve_models import make_scorer_run
from tests._specs import method_spec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rm_run(work, tiny_model):
    return make_scorer_run(tiny_model, work / "rm-served", ["score"], seed=3)


@pytest.fixture(scope="module")
def serve_up(ray_local):
    from ray import serve

    yield serve
    serve.shutdown()


def _replicas(app: str, deployment: str):
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA") and f"{app}#{deployment}#" in a["name"]]


def test_scores_survive_a_killed_replica_and_a_dead_service_fails_clearly(rm_run, serve_up):
    import ray

    ref = RewardModelRef(app="rm-kill", scorer="rm", path=str(rm_run), timeout_s=60)
    deploy_reward_app(ref, str(rm_run / "model"))
    check_reward_app(ref)
    scorer = ServedReward(ref.app, ref.scorer, timeout_s=60)
    items = [{"prompt": p, "response": a} for p, a in (("1+1=", "2"), ("2+2=", "5"), ("3+3=", "6"))]
    want = scorer(items)
    assert len(want) == 3 and len(set(want)) > 1

    results, errors = [], []

    def hammer():
        t_end = time.time() + 8  # a call in flight at the end waits for the new replica (timeout_s 60)
        while time.time() < t_end:
            try:
                results.append(scorer(items))
            except Exception as e:  # noqa: BLE001 - the test reports it
                errors.append(e)
                return

    t = threading.Thread(target=hammer)
    t.start()
    time.sleep(1.0)
    (replica,) = _replicas(ref.app, "score-rm")
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    t.join()
    assert not errors, errors
    assert len(results) > 3 and all(r == pytest.approx(want, abs=1e-4) for r in results)
    print(f"\n[served reward] {len(results)} calls while a replica was killed, {scorer.retries} retried")

    serve_up.delete(ref.app)
    t0 = time.time()
    with pytest.raises(RewardServiceError, match=r"method.reward_model: Serve app 'rm-kill' deployment 'score-rm' did not answer"):
        ServedReward(ref.app, ref.scorer, timeout_s=3, call_timeout_s=1)(items)
    assert time.time() - t0 < 30
    with pytest.raises(RewardServiceError, match=r"no Serve application 'rm-kill' is running"):
        check_reward_app(ref)


def test_grpo_deploys_its_reward_model_and_logs_its_scores(rm_run, tiny_model, arith, cache_dir, tmp_path, serve_up):
    from ftray.train.launch import train

    out = tmp_path / "grpo-rm"
    d = method_spec(
        "grpo",
        tiny_model, arith[0], arith[1], out,
        method={"group_size": 2, "rewards": {}, "reward_model": {"path": str(rm_run), "app": "rm-job", "scorer": "rm"}},
        train__max_steps=2, data__cache_dir=str(cache_dir), data__eval_max_rows=8,
    )
    record = train(resolve_paths(spec_from_dict(d)))
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(steps) == 2 and all("train/reward_model" in s and s["train/score_s"] > 0 for s in steps), steps
    assert "reward_model_score" in record["eval"]["after"] and "reward_model_score" in record["eval"]["before"]
    assert "rm-job" in serve_up.status().applications


def test_ppo_scores_rollouts_with_the_running_reward_app(tiny_model, arith, cache_dir, tmp_path, serve_up):
    """The app the grpo job deployed is used by name (no path): the job only checks it is running."""
    from ftray.train.launch import train

    assert "rm-job" in serve_up.status().applications  # left by the test above
    out = tmp_path / "ppo-rm"
    d = method_spec("grpo", tiny_model, arith[0], arith[1], out, train__max_steps=2, data__cache_dir=str(cache_dir),
                 data__eval_max_rows=8)
    d["method"] = {"kind": "ppo", "max_new_tokens": 4, "kl_target": 0.1,
                   "reward_model": {"app": "rm-job", "scorer": "rm"}}
    record = train(resolve_paths(spec_from_dict(d)))
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(steps) == 2
    for s in steps:
        assert {"train/reward_model", "train/value_loss", "train/kl_coef", "train/policy_loss"} <= set(s), s
    assert "reward_model_score" in record["eval"]["after"]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    # Resuming with the adaptive KL coefficient: tests/test_methods_ppo.py (in process, no reward service).


def test_a_job_naming_a_reward_app_that_is_not_running_fails_before_training(tiny_model, arith, tmp_path, serve_up):
    from ftray.train.launch import train

    d = method_spec("grpo", tiny_model, arith[0], None, tmp_path / "x", method={"rewards": {}, "reward_model": {"app": "nope"}})
    with pytest.raises(RewardServiceError, match=r"no Serve application 'nope' is running"):
        train(resolve_paths(spec_from_dict(d)))
    assert not (tmp_path / "x" / "run.json").exists() or json.loads((tmp_path / "x" / "run.json").read_text())["status"] != "completed"
