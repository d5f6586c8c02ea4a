"""The LM head runs only where a labelled token is predicted (`_lm.labelled_logps`): the loss, its gradients and the
preference log-probs equal those from every position's logits, and the head sees one row per labelled token."""

from __future__ import annotations

import pytest
import torch

from ftray.config import AdapterSpec
from ftray.data.encode import encode_row, ensure_chat_template, pack_examples
from ftray.methods._lm import collate_tokens, keeps_head_positions, labelled_logps, lm_loss
from ftray.methods.losses import sequence_logps, token_cross_entropy

ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(1, 2), (13, 9), (7, 7), (19, 0), (3, 11), (5, 5)]]


def _model(tiny_model, adapter: dict | None = None):
    from ftray.models.adapters import apply_adapter
    from ftray.models.load import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    ensure_chat_template(tok)
    torch.manual_seed(0)
    model = load_model(str(tiny_model))
    if adapter:
        model = apply_adapter(model, AdapterSpec.model_validate(adapter))
    return model, tok


def _head_rows(model):
    """How many positions each forward's LM head was given (a hook on the output embeddings)."""
    seen: list[int] = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1]).shape[0]))
    return seen, hook


def _full_logits_loss(model, batch):
    """The loss from every position's logits: what `lm_loss` computed before the head was given a mask."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    return token_cross_entropy(logits[:, logits.shape[1] - batch["labels"].shape[1]:], batch["labels"])


def _batches(tok):
    exs = [encode_row(tok, r, 64)[0] for r in ROWS]
    return {"packed": collate_tokens(pack_examples(exs, 40, tok.pad_token_id), tok.pad_token_id),
            "unpacked": collate_tokens(exs, tok.pad_token_id)}


@pytest.mark.parametrize("adapter", [None, {"kind": "lora", "r": 4, "target_modules": "all-linear"}])
@pytest.mark.parametrize("shape", ["packed", "unpacked"])
def test_loss_and_gradients_equal_every_position_s_logits(tiny_model, adapter, shape):
    model, tok = _model(tiny_model, adapter)
    batch = _batches(tok)[shape]
    assert keeps_head_positions(model)
    seen, hook = _head_rows(model)
    loss, info = lm_loss(model, batch)
    hook.remove()
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert seen == [n] and info["target_tokens"] == n and n < batch["labels"].numel()  # labelled positions only
    loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    want, n_want = _full_logits_loss(model, batch)
    want.backward()
    assert n_want == n and torch.allclose(loss, want, atol=1e-6), (loss, want)
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(got[k], p.grad, atol=1e-6, rtol=1e-4), k


def test_prompt_tuning_takes_every_position_s_logits(tiny_model):
    """Virtual tokens sit before the input, so a mask of its positions would not line up: the full logits."""
    model, tok = _model(tiny_model, {"kind": "prompt", "num_virtual_tokens": 4})
    batch = _batches(tok)["unpacked"]
    assert not keeps_head_positions(model)
    seen, hook = _head_rows(model)
    loss, _ = lm_loss(model, batch)
    hook.remove()
    b, t = batch["input_ids"].shape
    assert seen == [b * (t + 4)]
    want, _ = _full_logits_loss(model, batch)
    assert torch.allclose(loss, want, atol=1e-6)


def test_per_sequence_logps_and_a_batch_without_labels(tiny_model):
    model, tok = _model(tiny_model)
    batch = _batches(tok)["unpacked"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        got, n = labelled_logps(model, batch["labels"], **inputs)
        want, n_want = sequence_logps(model(**inputs).logits, batch["labels"])
    assert torch.equal(n, n_want) and torch.allclose(got, want, atol=1e-5), (got, want)
    # No labelled token: a zero loss whose backward still reaches every weight (DeepSpeed's hooks on every rank).
    loss, info = lm_loss(model, {**batch, "labels": torch.full_like(batch["labels"], -100)})
    loss.backward()
    assert info["target_tokens"] == 0 and loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_the_reference_s_logps_come_from_the_labelled_positions_too(tiny_model):
    """dpo's reference under a peft adapter (the base with the adapter off) goes through the same masked head."""
    from ftray.methods._lm import Reference

    model, tok = _model(tiny_model, {"kind": "lora", "r": 4, "target_modules": "all-linear"})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)  # the adapter changes the outputs, so "adapter off" is visible
    batch = _batches(tok)["unpacked"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    seen, hook = _head_rows(model)
    got, n = Reference().logps(model, batch["labels"], **inputs)
    hook.remove()
    assert seen == [int(n.sum())]
    with torch.no_grad(), model.disable_adapter():
        want, _ = sequence_logps(model(**inputs).logits, batch["labels"])
    with torch.no_grad():
        policy, _ = labelled_logps(model, batch["labels"], **inputs)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(policy, want, atol=1e-3)
