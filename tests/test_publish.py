"""From training to serving without a restart (`output.publish_to`): a job on Ray Train publishes its adapter
after each checkpoint into a registry folder that a running Serve endpoint serves; the endpoint's greedy answer
follows the job's newest published version, over HTTP, while the job trains."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests._serve_models import peft_greedy
from tests._specs import free_port, job_dict, run_ray

KEY = "sk-publish"
PROMPT = "12+7="
NEW_TOKENS = 8


def _ids(base: Path, prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    return [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]


def _record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "ftray_publish.json").read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


def _snapshot(live: Path, dst: Path, step: int) -> bool:
    """A copy of the published version of `step`: its weights are the ones its record names (sha256)."""
    shutil.rmtree(dst, ignore_errors=True)
    try:
        shutil.copytree(live, dst)
    except (FileNotFoundError, shutil.Error):
        return False
    rec = _record(dst)
    weights = dst / "adapter_model.safetensors"
    return (rec is not None and rec["step"] == step and weights.exists()
            and hashlib.sha256(weights.read_bytes()).hexdigest() == rec["sha256"])


@pytest.mark.integration
def test_endpoint_answers_follow_the_adapter_a_running_job_publishes(ray_local, tiny_model, arith, cache_dir, work):
    import httpx
    from ray import serve
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from ftray.serve import build_app

    pub, snaps, out = work / "publish-registry", work / "publish-snaps", work / "publish-run"
    pub.mkdir()
    keys = work / "publish-keys.txt"
    keys.write_text(KEY + "\n")
    port = free_port()
    cfg = {
        "generation": [{"name": "tiny", "base": str(tiny_model), "registry": [str(pub)], "reload_check_s": 0,
                        "deployment": {"num_cpus": 1, "max_batch_size": 1, "max_ongoing_requests": 4}}],
        "auth": {"api_keys_env": None, "api_keys_file": str(keys)},
        "ingress": {"num_cpus": 0.25, "max_batch_size": 1},
    }
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="publish", route_prefix="/")
    # Six versions, each up for the time of 16 steps of 32 rows: an answer read between two publishes (the check
    # below) needs a version to stay up longer than one request. At 8 rows a step the tiny model trained 24 steps
    # a second, and in a full suite (the other pytest worker busy beside it) the client first saw step 64 of 96.
    steps, every = 96, 16
    job = job_dict(tiny_model, arith[0], None, out, cache_dir, train__max_steps=steps, train__checkpoint_every=every,
                   train__lr=1e-2, train__log_every=every, train__global_batch_size=32, train__micro_batch_size=32,
                   output__publish_to=str(pub), output__publish_name="live",
                   scaling__num_workers=1)  # rank 0 publishes: one Ray Train worker shows it

    live = pub / "live"
    answers: list[tuple[int, str]] = []  # (published step before and after the request, the endpoint's answer)
    errors: list[BaseException] = []
    stop = threading.Event()

    tok = AutoTokenizer.from_pretrained(tiny_model)

    def ask(http, model: str = "tiny:live") -> str:
        # EOS barred: the tiny model soon learns to answer little, and a long answer shows each version apart.
        r = http.post(f"http://127.0.0.1:{port}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": model, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0,
                            "logit_bias": {str(tok.eos_token_id): -100}})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with httpx.Client(timeout=60) as http:
        ask(http, "tiny")  # the base once, so the first version is answered while it is the newest

    def watch() -> None:  # the client side, while the job trains in the main thread
        try:
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    before = _record(live)
                    if before is None:
                        time.sleep(0.05)
                        continue
                    if not (snaps / str(before["step"])).exists():
                        _snapshot(live, snaps / f"{before['step']}.tmp", before["step"]) and \
                            (snaps / f"{before['step']}.tmp").rename(snaps / str(before["step"]))
                    text = ask(http)
                    after = _record(live)
                    if after is not None and after["step"] == before["step"]:
                        answers.append((before["step"], text))
                    time.sleep(0.05)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    snaps.mkdir()
    watcher = threading.Thread(target=watch, daemon=True)
    t0 = time.time()
    watcher.start()
    try:
        record = run_ray(job)
    finally:
        stop.set()
        watcher.join(timeout=60)
    job_s = time.time() - t0
    assert not errors, errors

    # The job published every checkpoint's adapter and the final one, and says what it cost.
    pubrec = record["train"]["publish"]
    assert pubrec["steps"] == list(range(every, steps + 1, every)) and not pubrec["failed_steps"], pubrec
    final = _record(live)
    assert final["step"] == steps and final["final"] and final["run"] == "publish-run", final
    published, trained = load_file(str(live / "adapter_model.safetensors")), load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert published.keys() == trained.keys() and all((published[k] == trained[k]).all() for k in trained)

    # After the job: the endpoint, never restarted, answers with the last version.
    with httpx.Client(timeout=60) as http:
        answers.append((steps, ask(http)))
    assert _snapshot(live, snaps / str(steps), steps)
    serve.delete("publish")

    ids = _ids(tiny_model, PROMPT)
    refs = {s: tok.decode(peft_greedy(tiny_model, snaps / str(s), ids, NEW_TOKENS, (tok.eos_token_id,)),
                          skip_special_tokens=True)
            for s in sorted({s for s, _ in answers})}
    seen = sorted({s for s, _ in answers})
    print(f"\n[publish] job {job_s:.1f} s; endpoint answered {len(answers)} times, versions seen {seen}; "
          f"publish per checkpoint: {pubrec['step_path_seconds']['mean'] * 1e3:.1f} ms on the step path (max "
          f"{pubrec['step_path_seconds']['max'] * 1e3:.1f}), {pubrec['background_seconds']['mean'] * 1e3:.1f} ms in "
          f"the background; checkpoints {record['train']['checkpoint_seconds']:.2f} s in all")
    # The endpoint answered an early version while the job was still training, then the newer ones: each answer
    # is what peft gives with the version published at the time of the request.
    assert len(seen) >= 2 and seen[0] < steps, seen
    for s, text in answers:
        assert text == refs[s], (s, text, refs[s])
    assert refs[seen[0]] != refs[steps], refs  # the versions answer differently: a stale endpoint would fail above


@pytest.mark.parametrize("where", ["local", "s3"])
def test_each_version_is_replaced_whole_under_a_reading_registry(where, tiny_model, arith, work, request, monkeypatch):
    """The publisher (no Ray: the adapter of a PeftModel, as the loop hands it its engine) against a reader that
    does what a serving replica does on every request (`reload_check_s: 0`): it never finds a half-written
    version (weights that are not the ones its `ftray_publish.json` names), never loses the adapter once it
    was there, and sees the steps in order, up to the last."""
    import uuid
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftray import storage
    from ftray.config import resolve_paths, spec_from_dict
    from ftray.serve.config import GenerationModel
    from ftray.serve.registry import AdapterError, AdapterRegistry
    from ftray.train.publish import Publisher

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # as the loop on a CPU job
    reg = f"s3://bucket/publish-{uuid.uuid4().hex[:8]}" if where == "s3" else str(work / f"publish-{uuid.uuid4().hex[:8]}")
    if where == "s3":
        request.getfixturevalue("s3")
    spec = resolve_paths(spec_from_dict(job_dict(tiny_model, arith[0], None, work / "unused-run", work / "cache",
                                                 output__publish_to=reg, output__publish_name="live")))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    steps = 3 if where == "s3" else 12
    lines: list[str] = []
    publisher = Publisher(spec, str(tiny_model), steps, rank=0, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    registry = AdapterRegistry(GenerationModel(name="tiny", base=str(tiny_model), registry=[reg], reload_check_s=0),
                               str(tiny_model), miss_ttl_s=0)
    seen: list[int] = []
    problems: list[str] = []
    done = threading.Event()

    def read() -> None:
        deadline = time.time() + 120
        while (not done.is_set() or not seen or seen[-1] < steps) and time.time() < deadline:
            time.sleep(0.01 if where == "s3" else 0.002)  # moto is one Python process
            try:
                registry.changed("live")
                folder = registry.lookup("live")
            except AdapterError as e:
                if seen or e.status != 404:
                    problems.append(f"after step {seen[-1] if seen else None}: {e.status} {e}")
                    return
                continue
            d = storage.cached_copy(folder)
            try:
                first = json.loads((d / "ftray_publish.json").read_text())
                weights = (d / "adapter_model.safetensors").read_bytes()
                json.loads((d / "adapter_config.json").read_text())
                again = json.loads((d / "ftray_publish.json").read_text())
            except (OSError, ValueError) as e:
                problems.append(f"after step {seen[-1] if seen else None}: {type(e).__name__}: {e}")
                return
            if first["step"] != again["step"]:
                continue  # replaced while read (path by path): the next read sees the new one whole
            if hashlib.sha256(weights).hexdigest() != first["sha256"] or (seen and first["step"] < seen[-1]):
                problems.append(f"step {first['step']}: weights not its own, or after step {seen[-1:]}")
                return
            if not seen or seen[-1] != first["step"]:
                seen.append(first["step"])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    engine = SimpleNamespace(module=model)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.add_(0.01)
        publisher.publish(engine, step, final=step == steps)
    summary = publisher.close()
    done.set()
    reader.join(timeout=120)
    assert not problems, problems
    assert seen and seen[-1] == steps and seen == sorted(seen), seen
    assert summary["steps"] == list(range(1, steps + 1)) and not summary["failed_steps"], summary
    rec = json.loads(storage.read_text(storage.file_in(storage.join(reg, "live"), "ftray_publish.json")))
    assert rec["final"] and rec["step"] == steps and rec["base"] == str(tiny_model), rec
    print(f"\n[publish {where}] {steps} versions, the reader saw {len(seen)} of them ({seen}); per publish "
          f"{summary['step_path_seconds']['mean'] * 1e3:.1f} ms on the step path, "
          f"{summary['background_seconds']['mean'] * 1e3:.1f} ms in the background")


def test_in_process_zero3_job_publishes_each_checkpoint_and_the_last(tiny_model, arith, cache_dir, work):
    """The loop's wiring without Ray (one rank, ZeRO-3: the adapter gathered to be written): a version after each
    checkpoint and the final one, equal to the run's own adapter, and what each cost in run.json."""
    from safetensors.torch import load_file

    from tests._specs import run_here

    pub, out = work / "publish-z3-registry", work / "publish-z3-run"
    record = run_here(job_dict(tiny_model, arith[0], None, out, cache_dir, train__max_steps=4, train__checkpoint_every=2,
                               deepspeed__zero_stage=3, scaling__num_workers=1, output__publish_to=str(pub)))
    pubrec = record["train"]["publish"]
    assert pubrec["steps"] == [2, 4] and not pubrec["failed_steps"] and pubrec["to"] == str(pub / out.name), pubrec
    rec = _record(pub / out.name)
    assert rec["step"] == 4 and rec["final"] and rec["name"] == out.name, rec
    published = load_file(str(pub / out.name / "adapter_model.safetensors"))
    trained = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert published.keys() == trained.keys() and all((published[k] == trained[k]).all() for k in trained)
    assert all(v.numel() for v in published.values())  # gathered, not ZeRO-3's empty partitions
    assert sorted(p.name for p in pub.iterdir()) == [out.name]  # nothing left aside
