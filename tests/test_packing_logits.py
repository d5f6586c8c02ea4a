"""Packed examples attend only within themselves: per-token logits equal those of each example alone."""

from __future__ import annotations

import pytest
import torch

from ftray.data.encode import encode_row, ensure_chat_template, pack_examples
from ftray.methods._lm import collate_tokens


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked(tiny_model, attn):
    from ftray.models.load import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    ensure_chat_template(tok)
    model = load_model(str(tiny_model), attn_implementation=attn).eval()
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(1, 2), (13, 9), (7, 7), (19, 0), (3, 11)]]
    exs = [encode_row(tok, r, 64)[0] for r in rows]
    packed = pack_examples(exs, 40, tok.pad_token_id)
    assert len(packed) < len(exs)  # several examples share a row
    with torch.no_grad():
        for p in packed:
            batch = collate_tokens([p], tok.pad_token_id)
            # As in training (ftray.methods._lm.lm_loss): no KV cache. transformers derives the
            # block-diagonal mask from position_ids only when no cache object exists.
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
            pos = p["position_ids"]
            starts = [i for i, x in enumerate(pos) if x == 0] + [len(pos)]
            for s, e in zip(starts[:-1], starts[1:], strict=True):
                seg = p["input_ids"][s:e]
                match = [x for x in exs if x["input_ids"] == seg]
                if not match:  # the padding segment
                    continue
                alone = model(input_ids=torch.tensor([seg])).logits[0]
                assert torch.allclose(logits[s:e], alone, atol=1e-5), (attn, (logits[s:e] - alone).abs().max())


def test_packed_rows_are_cut_to_the_micro_batch_s_longest_with_the_same_loss(tiny_model):
    """Packed rows are stored padded to `data.max_length`; a micro-batch is cut to its longest row's tokens
    (the rest is padding in every row), and its loss equals the uncut batch's."""
    from ftray.methods._lm import lm_loss
    from ftray.models.load import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    ensure_chat_template(tok)
    model = load_model(str(tiny_model)).eval()
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(1, 2), (13, 9), (7, 7), (19, 0), (3, 11), (5, 5)]]
    packed = pack_examples([encode_row(tok, r, 64)[0] for r in rows], 64, tok.pad_token_id)
    longest = max(p["tokens"] for p in packed)
    cut = collate_tokens(packed, tok.pad_token_id)
    assert cut["input_ids"].shape == (len(packed), longest) and longest < 64
    whole = {k: torch.tensor([p[k] for p in packed]) for k in ("input_ids", "labels", "position_ids")}
    with torch.no_grad():
        (a, ia), (b, ib) = lm_loss(model, cut), lm_loss(model, whole)
    assert ia == ib and torch.allclose(a, b, atol=1e-6), (a, b)
