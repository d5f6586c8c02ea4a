"""ppo: spec refusals, and one rollout + update on one process: the value head trains beside the adapter
(and nothing else does), the KL starts at 0, adaptive KL control moves the coefficient."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from ftray.config import SpecError, spec_from_dict
from ftray.data.encode import ensure_chat_template
from ftray.methods import EvalContext, get_method
from tests._specs import method_spec, run_here

M = get_method("ppo")


def ppo_spec(model, train, test, out, method=None, **over) -> dict:
    d = method_spec("grpo", model, train, test, out, **over)
    d["method"] = {"kind": "ppo", "max_new_tokens": 4, "rewards": {"exact_match": 1.0}, **(method or {})}
    return d


def rollout_setup(method, spec, tiny_model, arith, n_rows: int):
    """The tiny model's tokenizer, a collated batch of the first `n_rows` arithmetic prompts and the method's
    base with its adapter (and heads), seeded."""
    from ftray.models.adapters import apply_adapter
    from ftray.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    ensure_chat_template(tok)
    rows = [json.loads(x) for x in arith[0].read_text().splitlines()[:n_rows]]
    batch = method.collate([e for r in rows for e in method.examples(r, tok, spec)], tok.pad_token_id)
    torch.manual_seed(0)
    model = apply_adapter(method.load_base(str(tiny_model), torch.float32, spec), spec.adapter,
                          task_type=method.task_type, heads=method.trainable_heads(spec))
    return tok, batch, model


def test_spec_refusals(tiny_model, arith, tmp_path):
    with pytest.raises(SpecError, match=r"nothing to learn from"):
        spec_from_dict(ppo_spec(tiny_model, arith[0], None, tmp_path, method={"rewards": {}}))
    with pytest.raises(SpecError, match=r"method.kl_target"):
        spec_from_dict(ppo_spec(tiny_model, arith[0], None, tmp_path, method={"kl_target": 0}))
    with pytest.raises(SpecError, match=r"method.lam"):
        spec_from_dict(ppo_spec(tiny_model, arith[0], None, tmp_path, method={"lam": 1.5}))


def test_rollout_update_on_one_process(tiny_model, arith, tmp_path):

    spec = spec_from_dict(ppo_spec(tiny_model, arith[0], None, tmp_path,
                                   method={"samples_per_prompt": 2, "kl_target": 0.01, "kl_horizon": 10}))
    tok, batch, model = rollout_setup(M, spec, tiny_model, arith, 4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("ftray_value_head" in n for n in trainable) and all("lora_" in n or "ftray_value_head" in n for n in trainable)
    M.setup(spec, tok, EvalContext())
    model.train()
    loss, info = M.loss(model, M.prepare(model, batch))
    assert info["target_tokens"] == 8 and info["kl"] == pytest.approx(0.0, abs=1e-5) and info["kl_coef"] == 0.05
    assert info["value_loss"] > 0 and torch.isfinite(loss)
    # KL 0 is below the target: the coefficient shrinks by the clipped error x batch / horizon = 0.2 x 8 / 10
    assert M.kl_coef == pytest.approx(0.05 * (1 - 0.2 * 8 / 10))
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("ftray_value_head" in n for n in grads) and grads <= trainable


def _two_rank_update(rank: int, model_dir: str, train: str, out: str, port: int) -> None:
    """One rollout + update per rank under torch.distributed (gloo), like two Ray Train workers."""
    import os

    import torch.distributed as dist

    from ftray.models.adapters import apply_adapter
    from ftray.models.load import load_tokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    spec = spec_from_dict(ppo_spec(model_dir, train, None, out,
                                   method={"samples_per_prompt": 2, "kl_target": 0.01, "kl_horizon": 10}))
    tok = load_tokenizer(model_dir)
    ensure_chat_template(tok)
    rows = [json.loads(x) for x in open(train).read().splitlines()[4 * rank : 4 * rank + 4]]
    batch = M.collate([e for r in rows for e in M.examples(r, tok, spec)], tok.pad_token_id)
    torch.manual_seed(rank)
    model = apply_adapter(M.load_base(model_dir, torch.float32, spec), spec.adapter, task_type=M.task_type,
                          heads=M.trainable_heads(spec))
    if rank == 1:  # only rank 1's policy moves away from the reference: its sequences carry all the KL
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    M.setup(spec, tok, EvalContext())
    model.train()
    _, info = M.loss(model, M.prepare(model, batch))
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"kl": info["kl"], "coef_used": info["kl_coef"], "coef_after": M.kl_coef, "n": info["target_tokens"],
                   "state": M.state_dict()}, f)
    dist.destroy_process_group()


def test_adaptive_kl_is_one_coefficient_for_all_ranks(tiny_model, arith, tmp_path):
    """Rank 0's policy is the reference (its KL is 0), rank 1's is not: both ranks see the KL of all
    sequences and take the same controller step, so the coefficient stays one number for the job."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_two_rank_update, args=(str(tiny_model), str(arith[0]), str(tmp_path), port), nprocs=2,
                       start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["kl"] == r1["kl"] > 0.0 and r0["coef_after"] == r1["coef_after"], (r0, r1)
    n_all = r0["n"] + r1["n"]
    err = max(-0.2, min(0.2, r0["kl"] / 0.01 - 1.0))
    assert r0["coef_after"] == pytest.approx(0.05 * (1 + err * n_all / 10))
    # What the loop writes into a checkpoint, and reads back into the method on resume.
    assert r0["state"] == {"kl_coef": r0["coef_after"]}
    M.load_state_dict({"kl_coef": 0.123})
    assert M.state_dict() == {"kl_coef": 0.123}


def test_resume_restores_the_adaptive_kl_coefficient(tiny_model, arith, cache_dir, tmp_path):
    """In process: the same job with 2 more steps resumes from its final checkpoint (step 3 is the first it
    runs, with the optimizer state of 2 steps) and takes the adaptive KL coefficient from it; a copy of the
    checkpoint with another coefficient gives another step 3, so the check fails if the state is ignored."""
    import shutil

    out = tmp_path / "ppo"
    d = ppo_spec(tiny_model, arith[0], None, out, method={"kl_target": 0.1}, train__max_steps=2,
                 data__cache_dir=str(cache_dir))
    run_here(d)
    ckpt = next((out / "checkpoints").glob("checkpoint_*"))
    d["train"]["max_steps"] = 4
    record = run_here(d)
    assert record["train"]["resumed_from_step"] == 2 and record["train"]["resumed_optimizer_steps"] == 2, record["train"]
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    coef = [s["train/kl_coef"] for s in steps]
    # Logged per step as the mean over its 2 micro-batches: the second already sees the first's update.
    assert abs(coef[0] - 0.05) < 1e-3 and coef[2] != coef[0], coef

    other = tmp_path / "perturbed"
    shutil.copytree(ckpt, other)
    state = json.loads((other / "method_state.json").read_text())
    (other / "method_state.json").write_text(json.dumps({"kl_coef": 10 * state["kl_coef"]}))
    run_here({**d, "output": {**d["output"], "dir": str(tmp_path / "off")}}, resume_from=str(other))
    off = [json.loads(x) for x in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert off[2]["train/kl_coef"] != coef[2] and abs(off[2]["train/kl_coef"] / coef[2] - 10) < 2, (off[2], coef[2])


def test_value_head_is_saved_beside_the_lora_adapter_and_reloads(tiny_model, arith, cache_dir, tmp_path):
    """Issue 15 item 6: a LoRA ppo run writes its value head beside the adapter (peft saves only the adapter's
    weights). Reloading the run's adapter (`load_run_model`: `ftray eval`; `apply_adapter(resume_from=...)`, which a
    run continued from this one also goes through) and its merged model give the head the run trained, as its
    final checkpoint holds it, not a fresh one (the bias starts at 0)."""
    from ftray.methods import load_run_model
    from ftray.methods.ppo import HEAD, value_head
    from ftray.models.load import Resolved, resolve
    from ftray.runs import RunFolder

    out = tmp_path / "ppo"
    run_here(ppo_spec(tiny_model, arith[0], None, out, train__max_steps=1, data__cache_dir=str(cache_dir),
                      output__merge=True))
    ckpt = next((out / "checkpoints").glob("checkpoint_*")) / "ds" / "mp_rank_00_model_states.pt"
    module = torch.load(ckpt, weights_only=True)["module"]
    trained = {k.split(f"{HEAD}.", 1)[1]: v for k, v in module.items() if f".{HEAD}." in k}
    # all-linear LoRA wraps the head too: its base layer trains whole, with a LoRA pair on top
    assert set(trained) == {"base_layer.weight", "base_layer.bias", "lora_A.default.weight", "lora_B.default.weight"}
    assert float(trained["base_layer.bias"].abs()) > 0

    spec = RunFolder(str(out)).spec()
    adapted = load_run_model(spec, Resolved(str(tiny_model), str(tiny_model), str(out / "adapter"), str(out)))
    reloaded = value_head(adapted).state_dict()
    assert set(reloaded) == set(trained) and all(torch.equal(reloaded[k], v) for k, v in trained.items())

    assert resolve(str(out)).base == str(out / "merged")  # what `ftray eval` of this run loads
    merged = value_head(load_run_model(spec, resolve(str(out))))
    x = torch.randn(3, merged.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(x), value_head(adapted)(x), atol=1e-6)
        assert torch.equal(merged.bias, trained["base_layer.bias"])
    # `ftray export --merge` merges as the run did: the same head beside the exported model.
    from safetensors.torch import load_file

    from ftray.cli import main
    from ftray.models.adapters import HEADS_FILE

    assert main(["export", str(out), "--merge", "--out", str(tmp_path / "exported")]) == 0
    exported, merged_file = (load_file(str(p / HEADS_FILE)) for p in (tmp_path / "exported", out / "merged"))
    assert exported.keys() == merged_file.keys() and all(torch.equal(exported[k], merged_file[k]) for k in exported)


def test_a_chat_rollout_is_scored_as_the_reward_model_was_trained(tiny_model, arith, tmp_path):
    """What a served reward model scores for a `chat` row is what a `reward` run trained on (`reward.render`:
    the chat template over the history, the prompt and the reply, end of turn included), not the rendered
    prompt wrapped as one more user turn; other formats send {"prompt", "response"}, which the scorer renders
    as a user turn and an assistant turn. Through one rollout: one input per sampled reply, in order."""
    from ftray.methods._rollout import Sampler
    from ftray.methods.reward import render
    from ftray.models.load import load_tokenizer
    from ftray.rlhf import build_reward

    tok = load_tokenizer(str(tiny_model))
    ensure_chat_template(tok)
    convs = [
        [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "Add 4 and 4."}, {"role": "assistant", "content": "8"}],
    ]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
    rm = {"app": "rm", "scorer": "rm"}
    spec = spec_from_dict(ppo_spec(tiny_model, chat, None, tmp_path, data__format="chat", data__max_length=96,
                                   method={"rewards": {}, "reward_model": rm, "samples_per_prompt": 2}))
    batch = M.collate([e for m in convs for e in M.examples({"messages": m}, tok, spec)], tok.pad_token_id)
    prompts = [ids[:n].tolist() for ids, n in zip(batch["input_ids"], batch["prompt_len"].tolist(), strict=True)]
    seen: list = []

    def scorer(items):
        seen.extend(items)
        return [float(len(x)) for x in items]

    sampler = Sampler(spec, tok, reward=build_reward(spec.method, scorer))
    replies = ["Five.", "It is 8, since 4 + 4 = 8."]
    want = [render(tok, {"history": m[:-2], "prompt": m[-2]["content"]}, r) for m, r in zip(convs, replies, strict=True)]
    assert sampler.served_items(prompts, replies) == want
    assert want[1].endswith(f"It is 8, since 4 + 4 = 8.{tok.eos_token}\n") and "<|user|>\nHi" in want[1]

    torch.manual_seed(0)
    model = M.load_base(str(tiny_model), torch.float32, spec)
    r = sampler.rollout(model, batch, n=2)
    texts = tok.batch_decode(r.comp.masked_fill(r.c_mask == 0, tok.pad_token_id), skip_special_tokens=True)
    assert seen == sampler.served_items(prompts, texts, n=2) and len(seen) == 4
    assert r.rewards.tolist() == [float(len(x)) for x in seen]  # `rewards: {}`: the served score alone

    plain = spec_from_dict(ppo_spec(tiny_model, arith[0], None, tmp_path, method={"rewards": {}, "reward_model": rm}))
    row = json.loads(arith[0].read_text().splitlines()[0])
    (ex,) = M.examples(row, tok, plain)
    prompt = [ex["input_ids"][: ex["prompt_len"]]]
    items = Sampler(plain, tok, reward=build_reward(plain.method, scorer)).served_items(prompt, ["7"])
    assert items == [{"prompt": row["prompt"], "response": "7"}]
    assert Sampler(plain, tok).served_items(prompt, ["7"]) is None  # no served reward model: nothing to send


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_log_probs_are_those_of_the_sampling_temperature(kind, tiny_model, arith, tmp_path):
    """Completions are sampled at `method.temperature`; the policy's and the reference's log-probs (the
    ratio, the KL) are of that distribution, logits / temperature (TRL does the same), not of temperature 1.
    The adapter is moved off zero so that the policy and the reference (the adapter disabled) differ; the
    KL the loss reports is recomputed here from the rollout at the sampling temperature."""
    from ftray.methods.losses import k3_kl, masked_mean

    T = 0.5
    method = {"temperature": T, "beta": 0.1} if kind == "grpo" else {"samples_per_prompt": 2, "temperature": T}
    d = ppo_spec(tiny_model, arith[0], None, tmp_path, method=method) if kind == "ppo" else \
        method_spec("grpo", tiny_model, arith[0], None, tmp_path, method={"group_size": 2, **method})
    spec = spec_from_dict(d)
    meth = get_method(kind)
    tok, batch, model = rollout_setup(meth, spec, tiny_model, arith, 2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    meth.setup(spec, tok, EvalContext())
    model.eval()  # no dropout: the recomputation below sees the same function
    prepared = meth.prepare(model, batch)
    widths: list[int] = []  # the LM head runs at the positions that predict the completion only (`Rollout.keep`)
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: widths.append(i[0].shape[1]))
    _, info = meth.loss(model, prepared)
    hook.remove()
    r = prepared["rollout"]
    assert widths == [r.keep, r.keep] and r.keep < r.full.shape[1]  # the policy's forward and the reference's
    P = r.prompt_len

    def logps(temperature, ref=False):
        with torch.no_grad(), (model.disable_adapter() if ref else contextlib.nullcontext()):
            logits = model(input_ids=r.full, attention_mask=r.attn, position_ids=r.pos, use_cache=False).logits
        lp = torch.log_softmax(logits[:, P - 1 : -1].float() / temperature, -1)
        return lp.gather(-1, r.comp.unsqueeze(-1)).squeeze(-1)

    def kl(temperature):
        pol, ref = logps(temperature), logps(temperature, ref=True)
        if kind == "ppo":  # the summed per-token log-ratio, per sequence
            return float(((pol - ref) * r.c_mask).sum() / len(r.comp))
        return float(masked_mean(k3_kl(pol, ref), r.c_mask))

    want, untempered = kl(T), kl(1.0)
    assert abs(want - untempered) > 1e-3, (want, untempered)  # the test can tell them apart
    assert info["kl"] == pytest.approx(want, rel=1e-4, abs=1e-6), (info["kl"], want, untempered)
