"""seq2seq: examples and the loss, trainable parameters move and frozen ones do not, a decoder-only model
refused before training, BLEU/chrF, 2 Ray workers under ZeRO-2 and ZeRO-3 on a tiny T5."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ftray.config import resolve_paths, spec_from_dict
from ftray.methods import EvalContext, check_method, get_method
from tests._methods_tiny import build_tiny_t5, copy_task
from tests._specs import ONE_RANK, ROOT, fit, method_spec, needs_shared, step_and_compare

M = get_method("seq2seq")


@pytest.fixture(scope="session")
def copies(work) -> tuple[Path, Path]:
    return copy_task(work / "copy")


@pytest.fixture(scope="session")
def tiny_t5(work, copies) -> Path:
    texts = [line for p in copies for line in p.read_text().splitlines()]
    return build_tiny_t5(work / "tiny-t5", texts, vocab_size=400)


def spec_for(model, train, test, out, adapter, **over) -> dict:
    return method_spec("seq2seq", model, train, test, out, adapter, **over)


def test_examples_and_loss(tiny_t5, copies, tmp_path):
    from ftray.methods.losses import masked_token_cross_entropy
    from ftray.models.load import load_tokenizer

    spec = spec_from_dict(spec_for(tiny_t5, copies[0], None, tmp_path, {"kind": "full"}))
    tok = load_tokenizer(str(tiny_t5))
    ex = [e for r in ({"source": "1 2", "target": "one two"}, {"source": "3", "target": "three"}) for e in M.examples(r, tok, spec)]
    assert all(e["labels"][-1] == tok.eos_token_id for e in ex)  # the model learns to stop
    batch = M.collate(ex, tok.pad_token_id)
    assert (batch["labels"] == -100).sum() == len(ex[0]["labels"]) - len(ex[1]["labels"])
    model = M.load_base(str(tiny_t5), torch.float32, spec).eval()
    loss, info = M.loss(model, batch)
    assert info["target_tokens"] == sum(len(e["labels"]) for e in ex)
    # The same as the model's own loss (labels shifted right into the decoder).
    ref = model(**batch).loss
    assert torch.allclose(loss, ref, atol=1e-5)
    assert torch.allclose(loss, masked_token_cross_entropy(model(**batch).logits, batch["labels"])[0])


@pytest.mark.parametrize("adapter", ["full", "freeze", "lora"])
def test_trainable_params_move_frozen_do_not(adapter, tiny_t5, copies, tmp_path):
    from ftray.models.load import load_tokenizer

    adapters = {
        "full": {"kind": "full"},
        "freeze": {"kind": "freeze", "train_last_layers": 1},
        "lora": {"kind": "lora", "r": 4, "target_modules": ["q", "v"]},
    }
    spec = spec_from_dict(spec_for(tiny_t5, copies[0], None, tmp_path, adapters[adapter]))
    tok = load_tokenizer(str(tiny_t5))
    ex = M.examples({"source": "1 2 3", "target": "one two three"}, tok, spec)
    model = step_and_compare(M, spec, ex + ex, tok.pad_token_id)
    if adapter == "freeze":  # the last block of the encoder and of the decoder, and the lm_head (tied to `shared`)
        trainable = {n.split(".")[0] + "." + n.split(".")[2] if ".block." in n else n.split(".")[0]
                     for n, p in model.named_parameters() if p.requires_grad}
        assert trainable in ({"encoder.1", "decoder.1", "lm_head"}, {"encoder.1", "decoder.1", "shared"}), trainable


def test_decoder_only_model_refused_before_training(tiny_model, copies, tmp_path):
    from ftray.models.load import ModelError
    from ftray.train.launch import check_job

    spec = resolve_paths(spec_from_dict(spec_for(tiny_model, copies[0], None, tmp_path / "run", {"kind": "full"})))
    with pytest.raises(ModelError, match=r"a decoder-only `llama` model; seq2seq needs an encoder-decoder"):
        check_job(spec)  # refused while checking the job, before any Ray resource


def test_bleu_and_chrf_scores(tiny_t5, copies, tmp_path):
    from ftray.data.rows import read_checked
    from ftray.models.load import load_tokenizer

    spec = spec_from_dict(spec_for(tiny_t5, copies[0], copies[1], tmp_path, {"kind": "full"}))
    rows = read_checked(str(copies[1]), "translation").rows
    model = M.load_base(str(tiny_t5), torch.float32, spec).eval()
    scores = M.score_rows(model, load_tokenizer(str(tiny_t5)), rows, spec, EvalContext())
    assert len(scores) == len(rows) and 0 <= scores[0]["bleu"] <= 100 and 0 <= scores[0]["chrf"] <= 100


# One rank at both stages: its cross-rank helper (gather_objects, for BLEU) runs on 2 Ray workers in cluster's test.
@pytest.mark.parametrize("place", ONE_RANK)
def test_runs(place, tiny_t5, copies, cache_dir, tmp_path, request):
    from transformers import AutoModelForSeq2SeqLM

    out = tmp_path / "run"
    d = spec_for(tiny_t5, copies[0], copies[1], out, {"kind": "full"}, train__max_steps=6, data__cache_dir=str(cache_dir))
    record = fit(d, place, request)
    b, a = record["eval"]["before"], record["eval"]["after"]
    assert set(a) == {"eval_loss", "perplexity", "bleu", "chrf"}
    assert a["eval_loss"] < b["eval_loss"], (b, a)
    assert AutoModelForSeq2SeqLM.from_pretrained(str(out / "model")).config.is_encoder_decoder


def test_shipped_job_validates(tiny_t5):
    from ftray.config import load_spec
    from ftray.train.launch import check_job

    needs_shared("translation", "en_fr_train.jsonl")
    spec = load_spec(ROOT / "jobs" / "seq2seq_en_fr.yaml", [f"model.path={tiny_t5}"])
    plan = check_job(spec)
    check_method(spec, plan.resolved, plan.train_rows, plan.eval_rows)
