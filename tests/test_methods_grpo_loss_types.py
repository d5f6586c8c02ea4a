"""grpo's `method.loss_type` reaches the loss: the same rollout (same seed) aggregated three ways, on one
process. Hand-computed values of each aggregation: tests/test_losses_grpo.py."""

from __future__ import annotations

import json

import pytest
import torch

from ftray.config import spec_from_dict
from ftray.data.encode import ensure_chat_template
from ftray.methods import EvalContext, get_method
from tests._specs import method_spec

M = get_method("grpo")


def test_loss_type_aggregates_the_same_rollout(tiny_model, arith, tmp_path):
    from ftray.models.adapters import apply_adapter
    from ftray.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    ensure_chat_template(tok)
    rows = [json.loads(x) for x in arith[0].read_text().splitlines()[:4]]
    # beta 0 and one update per rollout (ratio 1): each token's loss is -A of its completion
    method = {"group_size": 3, "temperature": 1.5, "beta": 0.0,
              "rewards": {"format": 1.0}, "format_regex": r"(?s).+"}  # reward 0 for an empty completion
    spec = spec_from_dict(method_spec("grpo", tiny_model, arith[0], None, tmp_path, method=method))
    batch = M.collate([e for r in rows for e in M.examples(r, tok, spec)], tok.pad_token_id)
    torch.manual_seed(0)
    base = M.load_base(str(tiny_model), torch.float32, spec)
    # A bias towards EOS, so that completions end at different lengths (the random model rarely stops)
    head = base.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[tok.eos_token_id] = 6.0
    base.set_output_embeddings(biased)
    model = apply_adapter(base, spec.adapter, task_type=M.task_type).train()
    losses, infos = {}, {}
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        spec = spec_from_dict(method_spec("grpo", tiny_model, arith[0], None, tmp_path, method={**method, "loss_type": loss_type}))
        M.setup(spec, tok, EvalContext())
        torch.manual_seed(1)
        loss, infos[loss_type] = M.loss(model, M.prepare(model, batch))
        losses[loss_type] = loss.item()
    assert len({i["completion_len"] for i in infos.values()}) == 1, infos  # the same rollout each time
    info, n = infos["dapo"], spec.method.max_new_tokens
    assert info["reward_max"] > info["reward_min"] and info["completion_len"] < n, info  # a signal, unequal lengths
    # grpo: the mean of -A over completions, 0 (advantages are centred in each group)
    assert losses["grpo"] == pytest.approx(0.0, abs=1e-6)
    # dapo: -sum_i A_i L_i / sum_i L_i; dr_grpo: -sum_i A_i L_i / (B x max_new_tokens)
    assert abs(losses["dapo"]) > 1e-3, losses  # completions of unequal length: not the grpo value
    assert losses["dr_grpo"] == pytest.approx(losses["dapo"] * info["completion_len"] / n, rel=1e-5, abs=1e-7)
