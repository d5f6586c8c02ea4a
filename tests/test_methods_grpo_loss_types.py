"""grpo's `method.loss_type` reaches the loss: the same rollout (same seed) aggregated three ways, on one
process; and `method.mask_truncated_completions` leaves the completions the budget cut out of it. Hand-computed values
of each aggregation: tests/test_losses_grpo.py."""

from __future__ import annotations

import json

import pytest
import torch

from ftray.config import SpecError, spec_from_dict
from ftray.data.encode import ensure_chat_template
from ftray.methods import EvalContext, get_method
from tests._specs import method_spec

M = get_method("grpo")


# beta 0 and one update per rollout (ratio 1): each token's loss is -A of its completion
METHOD = {"group_size": 3, "temperature": 1.5, "beta": 0.0,
          "rewards": {"format": 1.0}, "format_regex": r"(?s).+"}  # reward 0 for an empty completion


def biased_model(tiny_model, arith, tmp_path, eos_bias: float):
    """(tokenizer, batch of 4 prompts, LoRA model) with a bias of `eos_bias` towards EOS in the LM head, so that
    completions end at different lengths (the random model rarely stops)."""
    from ftray.models.adapters import apply_adapter
    from ftray.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    ensure_chat_template(tok)
    rows = [json.loads(x) for x in arith[0].read_text().splitlines()[:4]]
    spec = spec_from_dict(method_spec("grpo", tiny_model, arith[0], None, tmp_path, method=METHOD))
    batch = M.collate([e for r in rows for e in M.examples(r, tok, spec)], tok.pad_token_id)
    torch.manual_seed(0)
    base = M.load_base(str(tiny_model), torch.float32, spec)
    head = base.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[tok.eos_token_id] = eos_bias
    base.set_output_embeddings(biased)
    return tok, batch, apply_adapter(base, spec.adapter, task_type=M.task_type).train()


def test_loss_type_aggregates_the_same_rollout(tiny_model, arith, tmp_path):
    tok, batch, model = biased_model(tiny_model, arith, tmp_path, 6.0)
    losses, infos = {}, {}
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        spec = spec_from_dict(method_spec("grpo", tiny_model, arith[0], None, tmp_path, method={**METHOD, "loss_type": loss_type}))
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


def test_mask_truncated_completions_leaves_the_cut_ones_out(tiny_model, arith, tmp_path):
    """The same rollout with and without `method.mask_truncated_completions`, against -A summed by hand over the
    completions that ended (their EOS sampled within `max_new_tokens`): a cut completion adds nothing to the loss,
    though its reward still counts in its group's advantages (as TRL)."""
    from ftray.methods.losses import group_advantages

    tok, batch, model = biased_model(tiny_model, arith, tmp_path, 5.0)
    method = {**METHOD, "max_new_tokens": 4, "loss_type": "dapo"}
    M.setup(spec_from_dict(method_spec("grpo", tiny_model, arith[0], None, tmp_path, method=method)), tok, EvalContext())
    torch.manual_seed(1)
    prepared = M.prepare(model, batch)
    r = prepared["rollout"]
    ended = (r.comp == tok.eos_token_id).any(-1)
    assert r.ended.tolist() == ended.tolist() and 0 < int(ended.sum()) < len(ended), ended  # a mix of both
    lengths = r.c_mask.sum(-1).float()
    assert (lengths[~ended] == 4).all() and (lengths[ended] <= 4).all()
    adv = group_advantages(r.rewards, 3)  # over all 12 completions, the cut ones included
    assert adv[ended].abs().sum() > 0, adv
    got = {}
    for masked in (False, True):
        spec = spec_from_dict(method_spec("grpo", tiny_model, arith[0], None, tmp_path,
                                          method={**method, "mask_truncated_completions": masked}))
        M.setup(spec, tok, EvalContext())
        loss, info = M.loss(model, prepared)
        assert info["truncated"] == pytest.approx(1 - float(ended.float().mean()))
        got[masked] = loss.item()
    keep = ended.float()
    assert got[False] == pytest.approx(float(-(adv * lengths).sum() / lengths.sum()), rel=1e-5, abs=1e-7)
    assert got[True] == pytest.approx(float(-(adv * lengths * keep).sum() / (lengths * keep).sum()), rel=1e-5, abs=1e-7)
    assert got[True] != pytest.approx(got[False], abs=1e-4), got
    # default off, as TRL's GRPOConfig; a field of grpo only
    assert not spec_from_dict(method_spec("grpo", tiny_model, arith[0], None, tmp_path)).method.mask_truncated_completions
    with pytest.raises(SpecError, match=r"job.yaml: .*`method.mask_truncated_completions`"):
        d = method_spec("grpo", tiny_model, arith[0], None, tmp_path)
        spec_from_dict({**d, "method": {"kind": "ppo", "mask_truncated_completions": True}}, "job.yaml")
