"""Every peft adapter kind (lora and its options, adalora, ia3, prefix, prompt, p_tuning, llama_adapter):
on one process, each trains only its own parameters, saves, and reloads in peft with the same outputs;
AdaLoRA's allocator really changes ranks; the refused adapter x method x ZeRO-stage cells fail at spec
validation with their reason; `export --merge` merges the LoRA family and refuses prompt-family adapters.
Then a few real Ray Train + DeepSpeed runs (2 workers). docs/compatibility.md is rendered from this file's
parametrizations and `ftray.config.adapter_refusal` (`scripts/compat_matrix.py`; a test fails when stale).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftray.config import SpecError, resolve_paths, spec_from_dict
from ftray.methods import get_method
from tests._specs import ROOT, job_dict

SFT = get_method("sft")
TARGETS = ["q_proj", "v_proj"]

# One process, no DeepSpeed: each adapter kind (name -> (adapter spec, data section)).
UNPACKED = {"packing": False}
KINDS: dict[str, tuple[dict, dict]] = {
    "lora": ({"kind": "lora", "r": 4, "alpha": 8, "target_modules": TARGETS}, {}),
    "lora_dora_rslora_gaussian": (
        {"kind": "lora", "r": 4, "alpha": 8, "target_modules": TARGETS, "use_dora": True, "use_rslora": True,
         "init_lora_weights": "gaussian"},
        {},
    ),
    "adalora": ({"kind": "adalora", "r": 2, "init_r": 4, "target_modules": TARGETS}, {}),
    "ia3": ({"kind": "ia3"}, {}),
    "prefix": ({"kind": "prefix", "num_virtual_tokens": 4}, UNPACKED),
    "prompt_random": ({"kind": "prompt", "num_virtual_tokens": 4}, UNPACKED),
    "prompt_text": ({"kind": "prompt", "num_virtual_tokens": 4, "prompt_init_text": "3+4=7"}, UNPACKED),
    "p_tuning": ({"kind": "p_tuning", "num_virtual_tokens": 4}, UNPACKED),
    "llama_adapter": ({"kind": "llama_adapter", "num_virtual_tokens": 4, "adapter_layers": 1}, {}),
}
# Names of the parameters each peft kind adds (anything else trainable would be a bug).
OWN = {"lora": ("lora_",), "adalora": ("lora_",), "ia3": ("ia3_",), "prefix": ("prompt_encoder",),
       "prompt": ("prompt_encoder",), "p_tuning": ("prompt_encoder",), "llama_adapter": ("adaption_",)}


def spec_of(name: str, tiny_model, arith, out: Path, **over):
    adapter, data = KINDS[name]
    d = job_dict(tiny_model, arith[0], arith[1], out, out / "cache", **over)
    d["adapter"] = dict(adapter)
    d["data"].update(data)
    return resolve_paths(spec_from_dict(d))


def batch_of(tok, arith, n: int = 8):
    rows = [json.loads(x) for x in Path(arith[0]).read_text().splitlines()[:n]]
    examples = [e for r in rows for e in SFT.examples(r, tok, None or _Spec())]
    return SFT.collate(examples, tok.pad_token_id)


class _Spec:  # what SFT.examples reads of a spec
    class data:  # noqa: N801
        max_length = 64


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return out[:, out.shape[1] - batch["input_ids"].shape[1] :]


def train_steps(model, batch, steps: int, lr: float = 1e-2) -> list[float]:
    """The loop's order at each optimizer step: backward, adapter hook, step, adapter hook."""
    from ftray.models.adapters import adapter_loss, after_optimizer_step, before_optimizer_step

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss, _ = SFT.loss(model, batch)
        reg = adapter_loss(model)
        (loss if reg is None else loss + reg).backward()
        before_optimizer_step(model, step)
        opt.step()
        after_optimizer_step(model, step)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", sorted(KINDS))
def test_adapter_trains_only_its_own_params_saves_and_reloads(name, tiny_model, arith, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftray.models.adapters import apply_adapter, trainable_summary
    from ftray.models.load import load_tokenizer

    spec = spec_of(name, tiny_model, arith, tmp_path / "run")
    tok = load_tokenizer(str(tiny_model))
    batch = batch_of(tok, arith)
    torch.manual_seed(0)
    model = apply_adapter(SFT.load_base(str(tiny_model), torch.float32, spec), spec.adapter, task_type="CAUSAL_LM",
                          total_steps=6, tokenizer_path=str(tiny_model))
    model.eval()  # no dropout: a frozen parameter must stay exactly equal
    summary = trainable_summary(model)
    assert 0 < summary["trainable_params"] < summary["total_params"] / 5, summary
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(model, batch, steps=6)
    assert losses[-1] < losses[0], losses
    own = OWN[spec.adapter.kind]
    for n, p in model.named_parameters():
        moved = not torch.equal(before[n], p.detach())
        pruned = "lora_E" in n and not p.any()  # AdaLoRA starts E at 0 and may prune all of a module's ranks
        assert moved == p.requires_grad or pruned, (n, p.requires_grad, moved)
        assert not p.requires_grad or any(o in n for o in own), n
    want = logits_of(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "adapter").eval()
    assert torch.allclose(logits_of(fresh, batch), want, atol=1e-5)
    assert not torch.allclose(logits_of(AutoModelForCausalLM.from_pretrained(tiny_model).eval(), batch), want, atol=1e-4)


# The same on a classification job (tiny BERT encoder + new head, peft SEQ_CLS): (method, kind) -> adapter.
ENCODER_KINDS: dict[str, dict] = {
    "adalora": {"kind": "adalora", "r": 2, "init_r": 4, "target_modules": ["query", "value"]},
    "ia3": {"kind": "ia3"},
}


@pytest.mark.parametrize("name", sorted(ENCODER_KINDS))
def test_classify_adapter_trains_saves_and_reloads(name, tiny_model, work, tmp_path):
    from peft import PeftModel

    from ftray.models.adapters import apply_adapter
    from ftray.models.load import load_tokenizer
    from tests._methods_tiny import build_tiny_bert, sign_task

    method = get_method("classify")
    bert = build_tiny_bert(tiny_model, work / "tiny-bert")
    train, _ = sign_task(tmp_path / "signs")
    d = {"model": {"path": str(bert)}, "data": {"train": str(train), "format": "labels", "max_length": 32},
         "method": {"kind": "classify"}, "adapter": ENCODER_KINDS[name],
         "train": {"max_steps": 6, "global_batch_size": 8, "micro_batch_size": 4}, "output": {"dir": str(tmp_path / "o")}}
    spec = spec_from_dict(d)
    tok = load_tokenizer(str(bert))
    rows = [json.loads(x) for x in train.read_text().splitlines()[:16]]
    batch = method.collate([e for r in rows for e in method.examples(r, tok, spec)], tok.pad_token_id)
    torch.manual_seed(0)
    model = apply_adapter(method.load_base(str(bert), torch.float32, spec), spec.adapter, task_type=method.task_type,
                          total_steps=6).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    from ftray.models.adapters import after_optimizer_step, before_optimizer_step

    for step in range(6):
        method.loss(model, batch)[0].backward()
        before_optimizer_step(model, step)
        opt.step()
        after_optimizer_step(model, step)
        opt.zero_grad()
    for n, p in model.named_parameters():
        moved = not torch.equal(before[n], p.detach())
        pruned = "lora_E" in n and not p.any()
        assert moved == p.requires_grad or pruned, (n, p.requires_grad, moved)
        # Only the adapter and the new head (peft keeps SEQ_CLS heads in modules_to_save) train.
        assert not p.requires_grad or any(o in n for o in ("lora_", "ia3_", "classifier")), n
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(1)  # a different random head: the saved one must replace it
    fresh = PeftModel.from_pretrained(method.load_base(str(bert), torch.float32, spec), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_prompt_init_from_text_copies_the_token_embeddings(tiny_model, arith, tmp_path):
    from ftray.models.adapters import apply_adapter
    from ftray.models.load import load_tokenizer

    spec = spec_of("prompt_text", tiny_model, arith, tmp_path / "run")
    tok = load_tokenizer(str(tiny_model))
    base = SFT.load_base(str(tiny_model), torch.float32, spec)
    emb = base.get_input_embeddings().weight.detach().clone()
    model = apply_adapter(base, spec.adapter, tokenizer_path=str(tiny_model))
    ids = tok("3+4=7", add_special_tokens=False)["input_ids"]
    ids = (ids * 4)[:4]  # peft repeats / cuts the text's tokens to num_virtual_tokens
    got = model.prompt_encoder["default"].embedding.weight.detach()
    assert torch.equal(got, emb[ids])


def test_adalora_allocator_changes_ranks_through_its_schedule(tiny_model, arith, tmp_path):
    from ftray.models.adapters import adalora_schedule, adapter_report, apply_adapter
    from ftray.models.load import load_tokenizer

    spec = spec_of("adalora", tiny_model, arith, tmp_path / "run")
    steps = 20
    sched = adalora_schedule(steps)
    assert sched == {"total_step": 20, "tinit": 2, "tfinal": 4, "deltaT": 1}
    tok = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    model = apply_adapter(SFT.load_base(str(tiny_model), torch.float32, spec), spec.adapter, total_steps=steps)
    cfg = model.peft_config["default"]
    assert (cfg.init_r, cfg.target_r, cfg.total_step) == (4, 2, 20)
    assert adapter_report(model)["final_ranks"] == {}  # nothing allocated yet
    train_steps(model.train(), batch_of(tok, arith), steps=steps)
    rep = adapter_report(model)
    # 2 layers x (q_proj, v_proj) start at rank 4 (budget 16) and end at the target budget 2 x 4 = 8,
    # spread unevenly: the allocator moved rank to where |weight x gradient| is large.
    assert len(rep["final_ranks"]) == 4 and rep["final_budget"] == 8, rep
    assert len(set(rep["final_ranks"].values())) > 1, rep
    # The pruned ranks are zero in the weights the model computes with.
    for n, p in model.named_parameters():
        if "lora_E" in n:
            key = n.removesuffix(".default")
            assert int((p != 0).sum()) <= rep["final_ranks"][key.removeprefix("base_model.model.").removesuffix(".lora_E")]


def test_adalora_orthogonal_regulariser_is_peft_s(tiny_model, arith, tmp_path):
    """ftray's methods compute their own losses, so peft never adds AdaLoRA's orthogonal regulariser (it does
    so only in its forward, from `labels`); the loop adds `adapter_loss`, which must equal peft's term."""
    import torch.nn.functional as F

    from ftray.models.adapters import adapter_loss, apply_adapter
    from ftray.models.load import load_tokenizer

    spec = spec_of("adalora", tiny_model, arith, tmp_path / "run")
    tok = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    model = apply_adapter(SFT.load_base(str(tiny_model), torch.float32, spec), spec.adapter, total_steps=20).train()
    with torch.no_grad():  # lora_A / lora_B start orthonormal-ish: move them so the term is not ~0
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.add_(0.3 * torch.randn_like(p))
    ids = batch_of(tok, arith)["input_ids"][:2]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)  # peft adds orth_reg_weight x regulariser to this loss
        plain = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
        reg = adapter_loss(model)
    assert reg is not None and float(reg) > 1e-3
    assert abs(float(out.loss - plain) - float(reg)) < 1e-5, (float(out.loss - plain), float(reg))
    assert adapter_loss(apply_adapter(SFT.load_base(str(tiny_model), torch.float32, spec_of("lora", tiny_model, arith, tmp_path / "l")),
                                      spec_of("lora", tiny_model, arith, tmp_path / "l").adapter)) is None


def test_adalora_resumes_exactly_from_its_allocator_state(tiny_model, arith, tmp_path):
    """10 steps straight = 5 steps, a checkpoint (weights, optimizer, allocator state through safetensors),
    a fresh model, 5 more steps. Without the allocator state the ranks it prunes differ."""
    from safetensors.torch import load_file, save_file

    from ftray.models.adapters import (
        adapter_report,
        adapter_state,
        after_optimizer_step,
        apply_adapter,
        before_optimizer_step,
        load_adapter_state,
    )
    from ftray.models.load import load_tokenizer

    spec = spec_of("adalora", tiny_model, arith, tmp_path / "run")
    batch = batch_of(load_tokenizer(str(tiny_model)), arith)

    def fresh():
        torch.manual_seed(0)
        m = apply_adapter(SFT.load_base(str(tiny_model), torch.float32, spec), spec.adapter, total_steps=10).eval()
        return m, torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)

    def run(model, opt, steps):
        for step in steps:
            SFT.loss(model, batch)[0].backward()
            before_optimizer_step(model, step)
            opt.step()
            after_optimizer_step(model, step)
            opt.zero_grad()

    straight, opt = fresh()
    run(straight, opt, range(10))
    first, opt = fresh()
    run(first, opt, range(5))
    weights = {n: p.detach().clone() for n, p in first.named_parameters() if p.requires_grad}
    save_file(adapter_state(first), str(tmp_path / "state.safetensors"))
    optim = opt.state_dict()
    for resume_state in (True, False):
        second, opt = fresh()
        with torch.no_grad():
            for n, p in second.named_parameters():
                if n in weights:
                    p.copy_(weights[n])
        opt.load_state_dict(optim)
        if resume_state:
            load_adapter_state(second, load_file(str(tmp_path / "state.safetensors")))
        run(second, opt, range(5, 10))
        same = all(torch.equal(p, dict(second.named_parameters())[n]) for n, p in straight.named_parameters())
        assert same == resume_state, resume_state
    assert adapter_report(second)["final_budget"] == 8


REFUSED = {
    "qlora_on_cpu": (dict(adapter={"kind": "qlora"}), r"`adapter.kind: qlora` loads the base in 4 bits .* needs a GPU"),
    "qlora_zero3": (dict(adapter={"kind": "qlora"}, scaling={"use_gpu": True}, deepspeed={"zero_stage": 3}),
                    r"qlora` with `deepspeed.zero_stage: 3`"),
    "adalora_zero3": (dict(adapter={"kind": "adalora"}, deepspeed={"zero_stage": 3}),
                      r"adalora` with `deepspeed.zero_stage: 3`: its rank allocator .* ZeRO-3"),
    "prefix_packing": (dict(adapter={"kind": "prefix"}), r"prefix` with `data.packing: true`: .*position_ids"),
    "prompt_dpo": (dict(adapter={"kind": "prompt"}, method={"kind": "dpo"}, data={"format": "preference", "packing": False}),
                   r"`adapter.kind: prompt` works with `method.kind` sft and causal_lm only: .*; got `dpo`"),
    "p_tuning_seq2seq": (dict(adapter={"kind": "p_tuning"}, method={"kind": "seq2seq"},
                              data={"format": "translation", "packing": False}), r"p_tuning` works with .*; got `seq2seq`"),
    "llama_adapter_classify": (dict(adapter={"kind": "llama_adapter"}, method={"kind": "classify"},
                                    data={"format": "labels"}), r"llama_adapter` works with .*; got `classify`"),
    "merge_prefix": (dict(adapter={"kind": "prefix"}, data={"packing": False}, output={"merge": True}),
                     r"`output.merge: true` with `adapter.kind: prefix`: .*nothing to merge"),
    "dora_on_adalora": (dict(adapter={"kind": "adalora", "use_dora": True}), r"`adapter.use_dora`.* only apply"),
    "init_r_below_r": (dict(adapter={"kind": "adalora", "r": 8, "init_r": 4}), r"`adapter.init_r` \(4\) must be >="),
    "pissa": (dict(adapter={"kind": "lora", "init_lora_weights": "pissa"}), r"adapter.init_lora_weights"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_at_spec_validation_with_the_reason(name, tiny_model, arith, tmp_path):
    over, pattern = REFUSED[name]
    d = job_dict(tiny_model, arith[0], arith[1], tmp_path / "run", tmp_path / "cache")
    for section, values in over.items():
        d[section] = {**d.get(section, {}), **values} if section != "adapter" else values
    with pytest.raises(SpecError, match=pattern) as e:
        spec_from_dict(d, "job.yaml")
    assert "\n" not in str(e.value) and str(e.value).startswith("job.yaml")


def test_llama_adapter_on_a_bert_is_refused_before_ray(tiny_model, work, ray_down):
    from ftray.config import AdapterSpec
    from ftray.models.adapters import AdapterError, check_targets
    from ftray.models.load import meta_model
    from tests._methods_tiny import build_tiny_bert

    bert = build_tiny_bert(tiny_model, work / "tiny-bert")
    with pytest.raises(AdapterError, match=r"adapter.kind: llama_adapter: peft's adaption prompt supports model types .*llama.* not `bert`"):
        check_targets(meta_model(str(bert)), AdapterSpec(kind="llama_adapter"))
    with pytest.raises(AdapterError, match=r"adapter.adapter_layers: 5 > the model's 2 blocks"):
        check_targets(meta_model(str(tiny_model)), AdapterSpec(kind="llama_adapter", adapter_layers=5))
    assert not ray_down.is_initialized()


def _run_folder(kind: str, tiny_model, arith, tmp_path) -> Path:
    """A run folder as `ftray train` leaves it (adapter/ + tokenizer/), trained on one process."""
    from ftray.models.adapters import apply_adapter
    from ftray.models.load import load_tokenizer

    spec = spec_of(kind, tiny_model, arith, tmp_path / kind)
    tok = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    model = apply_adapter(SFT.load_base(str(tiny_model), torch.float32, spec), spec.adapter, total_steps=4)
    train_steps(model.eval(), batch_of(tok, arith), steps=4)
    run = tmp_path / kind
    model.save_pretrained(run / "adapter")
    tok.save_pretrained(run / "tokenizer")
    return run


@pytest.mark.parametrize("kind", ["adalora", "ia3", "prefix"])
def test_export_merge(kind, tiny_model, arith, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftray.cli import main
    from ftray.models.load import load_tokenizer

    run = _run_folder(kind, tiny_model, arith, tmp_path)
    rc = main(["export", str(run), "--merge", "--out", str(tmp_path / "merged")])
    if kind == "prefix":
        assert rc == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "PREFIX_TUNING adapter (prompt family)" in err and "cannot be merged" in err and "\n" not in err
        assert not (tmp_path / "merged").exists()
        return
    assert rc == 0
    batch = batch_of(load_tokenizer(str(tiny_model)), arith)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run / "adapter").eval()
    assert torch.allclose(logits_of(merged, batch), logits_of(peft, batch), atol=1e-5)


def test_compatibility_doc_is_current():
    """docs/compatibility.md is `scripts/compat_matrix.py`'s output: regenerate it when this fails."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "compat_matrix.py"), "--print"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (ROOT / "docs" / "compatibility.md").read_text() == out.stdout, (
        "docs/compatibility.md is stale: run `python scripts/compat_matrix.py`")


# ------------------------------------------------------------------------------------------ Ray

# DeepSpeed runs through the training loop. On one process (world size 1: DeepSpeed's ZeRO code paths,
# checkpoints, saving; seconds each): every kind under ZeRO-2 (adalora: ZeRO-3 refused), each also resumed
# exactly from its step-5 checkpoint; under ZeRO-3 (parameters converted to ZeRO-3's, gathered to evaluate
# and save) one kind per way an adapter holds its weights: ia3 (vectors inside the layers), prefix (a prompt
# encoder giving past key/values), prompt_text (a prompt embedding, initialised from the text's token
# embeddings, which ZeRO-3 must gather), p_tuning (an MLP prompt encoder). Not repeated under ZeRO-3 in
# process: prompt_random (prompt_text's module, without the text init) and llama_adapter (its ZeRO-3 run is
# on 2 Ray Train workers below). On 2 Ray Train workers (parameters partitioned across ranks and gathered to
# save; ~40 s each): llama_adapter (adaption prompts and gates inside attention: the one kind whose
# weights live in attention modules it replaces); LoRA on 2 workers under ZeRO-2 and ZeRO-3 is
# tests/test_train.py's equivalence runs. id -> (KINDS entry, method, ZeRO stage).
DS_CASES: dict[str, tuple[str, str, int]] = {
    "adalora-zero2": ("adalora", "sft", 2),
    "ia3-zero2": ("ia3", "sft", 2),
    "ia3-zero3": ("ia3", "sft", 3),
    "prefix-zero2": ("prefix", "sft", 2),
    "prefix-zero3": ("prefix", "sft", 3),
    "prompt_random-zero2": ("prompt_random", "sft", 2),
    "prompt_text-zero3": ("prompt_text", "sft", 3),
    "p_tuning-zero2": ("p_tuning", "sft", 2),
    "p_tuning-zero3": ("p_tuning", "sft", 3),
    "llama_adapter-zero2": ("llama_adapter", "sft", 2),
}
RAY_CASES: dict[str, tuple[str, str, int]] = {
    "llama_adapter-zero3": ("llama_adapter", "sft", 3),
}


def _case_job(case: str, cases: dict, tiny_model, arith, cache_dir) -> dict:
    name, method, zero = cases[case]
    adapter, data = KINDS[name]
    d = job_dict(tiny_model, arith[0], arith[1], None, cache_dir, train__max_steps=10, train__lr=5e-3,
                 deepspeed__zero_stage=zero, data__eval_max_rows=32, train__checkpoint_every=5,
                 output__keep_checkpoints=3)
    d["adapter"], d["method"] = dict(adapter), {"kind": method}
    d["data"].update(data)
    return d


def _check_adapter_run(name: str, record: dict, run: Path) -> dict:
    from safetensors.torch import load_file

    assert record["status"] == "completed"
    assert record["eval"]["after"]["eval_loss"] < record["eval"]["before"]["eval_loss"], record["eval"]
    t = record["trainable"]
    assert 0 < t["trainable_params"] < t["total_params"] / 5 and abs(t["trainable_pct"] - 100 * t["trainable_params"] / t["total_params"]) < 1e-9
    w = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    if name != "adalora":  # the saved adapter is whole (ZeRO-3 gathered it) and nothing in it is empty
        assert w and all(v.numel() > 0 for v in w.values())
    else:
        ranks = record["adapter"]["final_ranks"]
        # 2 layers x (q_proj, v_proj) start at rank 4 and are cut to the target budget 2 x 4 = 8.
        assert len(ranks) == 4 and sum(ranks.values()) == 8, record["adapter"]
        # peft saves each module cut to its final rank (a module pruned to rank 0 saves empty matrices).
        for k, v in w.items():
            module, part = k.removeprefix("base_model.model.").rsplit(".", 1)
            assert v.shape[1 if part == "lora_B" else 0] == ranks[module], (k, v.shape, ranks)
        assert cfg["peft_type"] == "ADALORA" and cfg["rank_pattern"], cfg
        saved = {k.removesuffix(".lora_E").removesuffix(".default"): sum(map(bool, v)) for k, v in cfg["rank_pattern"].items()}
        assert sorted(saved.values()) == sorted(ranks.values())
    return w


def _max_diff(a: dict, b: dict) -> float:
    """Largest difference between two saved adapters (inf where a shape differs: AdaLoRA's final ranks)."""
    assert a.keys() == b.keys()
    return max(float("inf") if a[k].shape != b[k].shape else float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0
               for k in a)


@pytest.mark.parametrize("case", sorted(DS_CASES))
def test_deepspeed_one_process_and_exact_resume(case, tiny_model, arith, cache_dir, runs, tmp_path):
    """Trains, saves a whole adapter; a second run continuing the step-5 checkpoint (DeepSpeed state of the
    trainable parameters, optimizer, RNG, adapter state) starts at step 6 with the optimizer state of 5
    steps and ends with the same adapter; one continuing a perturbed copy of that checkpoint does not
    (so the check fails when the checkpoint is ignored: a fresh run with the same seed ends the same)."""
    from safetensors.torch import load_file

    from tests._specs import perturb_checkpoint, run_here

    d = _case_job(case, DS_CASES, tiny_model, arith, cache_dir)
    record, run = runs.get(d)
    w = _check_adapter_run(DS_CASES[case][0], record, run)
    ckpt = next(p.parent for p in (run / "checkpoints").glob("checkpoint_*/state.json")
                if json.loads(p.read_text())["step"] == 5)
    resumed = run_here({**d, "output": {**d["output"], "dir": str(tmp_path / "resumed")}}, resume_from=str(ckpt))
    assert resumed["train"]["resumed_from_step"] == 5 and resumed["train"]["resumed_optimizer_steps"] == 5, resumed["train"]
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 11)), steps  # 1-5 from the checkpoint's history, 6-10 run here
    w2 = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert _max_diff(w, w2) <= 1e-6
    perturb_checkpoint(ckpt, tmp_path / "perturbed")
    run_here({**d, "output": {**d["output"], "dir": str(tmp_path / "off")}}, resume_from=str(tmp_path / "perturbed"))
    w3 = load_file(str(tmp_path / "off" / "adapter" / "adapter_model.safetensors"))
    assert _max_diff(w, w3) > 1e-4


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(RAY_CASES))
def test_two_workers(case, tiny_model, arith, cache_dir, runs, ray_local):
    d = _case_job(case, RAY_CASES, tiny_model, arith, cache_dir)
    record, run = runs.get(d, on_ray=True)
    assert record["placement"]["ranks"] and len(record["placement"]["ranks"]) == 2
    _check_adapter_run(RAY_CASES[case][0], record, run)


def _reload_in_fresh_process(tiny_model, got: list) -> None:
    """A fresh process (one for all `got` runs): PeftModel.from_pretrained + the held-out data -> the eval loss
    each run measured at its end."""
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "_reload_eval.py"), str(tiny_model), *(str(r) for _, r in got)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    fresh = [json.loads(x)["eval_loss"] for x in out.stdout.strip().splitlines()[-len(got):]]
    for (record, run), loss in zip(got, fresh, strict=True):
        assert abs(loss - record["eval"]["after"]["eval_loss"]) < 1e-5, (run, loss, record["eval"]["after"])


def test_every_in_process_adapter_run_reloads_in_one_fresh_process(tiny_model, arith, cache_dir, runs):
    """The farm's one-process DeepSpeed runs (fitted by the tests above), reloaded with no Ray: a test of its own
    so it runs beside the in-process runs, not in the Ray stream (which would fit them again)."""
    _reload_in_fresh_process(tiny_model, [runs.get(_case_job(c, DS_CASES, tiny_model, arith, cache_dir)) for c in sorted(DS_CASES)])


@pytest.mark.integration
def test_every_ray_adapter_run_reloads_in_one_fresh_process(tiny_model, arith, cache_dir, runs, ray_local):
    """The farm's two-worker Ray runs (fitted by `test_two_workers`), reloaded in one fresh process."""
    _reload_in_fresh_process(tiny_model, [runs.get(_case_job(c, RAY_CASES, tiny_model, arith, cache_dir), on_ray=True)
                                          for c in sorted(RAY_CASES)])
