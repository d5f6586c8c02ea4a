"""The DPO loss of `ftray/methods/losses.py` against TRL 1.16's own code path (issue 15 item 7): a real
`DPOTrainer` on the tiny model computes its loss (`compute_loss`: its fused LM head's log-probs, its loss
formulas) on ftray's batch, with the same reference log-probs handed to both (`precompute_ref_log_probs`).

TRL 1.16 has no standalone DPO loss function (`dpo_loss` went into `_compute_loss`), so the trainer is the one code
path. Measured on this batch: ftray's loss minus TRL's is 0.0 exactly for sigmoid, hinge and ipo at beta 0.1 and 0.5.

Label smoothing: TRL 1.16's `sigmoid` and `hinge` ignore it (it feeds only `robust`, `exo_pair` and `aot*`).
ftray's smoothed sigmoid is cDPO, -(1 - e) log s(beta d) - e log s(-beta d), the formula TRL's `aot_unpaired`
applies after sorting the batch's log-ratios, so the two agree pair by pair. ftray keeps cDPO (a deliberate
difference): with beta 0.5 and e 0.1, ftray's sigmoid is 1.1461 where TRL's is its unsmoothed 1.2303. ftray's
smoothed hinge has no TRL 1.16 counterpart (only the hand-computed test in test_losses_rlhf.py)."""

from __future__ import annotations

import pytest
import torch

from ftray.config import spec_from_dict
from ftray.data.encode import IGNORE, ensure_chat_template
from ftray.methods import get_method
from ftray.methods.losses import dpo_loss, sequence_logps
from tests._preference import preference_rows
from tests._specs import method_spec

M = get_method("dpo")
N = 4  # pairs


@pytest.fixture(scope="module")
def case(tiny_model, tmp_path_factory):
    """ftray's batch of N pairs (chosen rows, then rejected), the policy's log-probs, and reference log-probs
    near them (so that the losses are not saturated)."""
    from ftray.models.load import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    ensure_chat_template(tok)
    out = tmp_path_factory.mktemp("dpo-trl")
    spec = spec_from_dict(method_spec("dpo", tiny_model, out / "unused.jsonl", None, out, {"kind": "full"}))
    rows = preference_rows(N, 0)
    batch = M.collate([e for r in rows for e in M.examples(r, tok, spec)], tok.pad_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        logits = load_model(str(tiny_model)).eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    policy, n = sequence_logps(logits, batch["labels"])
    ref = policy + 2 * torch.randn(2 * N, generator=torch.Generator().manual_seed(1))
    return {"model": str(tiny_model), "tok": tok, "rows": rows, "batch": batch, "policy": policy, "n": n, "ref": ref,
            "out": out}


def trl_loss(case, loss_type: str, beta: float, label_smoothing: float, pairs: list[int]) -> tuple[float, dict]:
    """TRL 1.16's DPO loss on the pairs `pairs` of ftray's batch, through `DPOTrainer.compute_loss`."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from ftray.models.load import load_model

    tok, batch, ref = case["tok"], case["batch"], case["ref"]
    args = DPOConfig(
        output_dir=str(case["out"] / "trl"), loss_type=[loss_type], beta=beta, label_smoothing=label_smoothing,
        precompute_ref_log_probs=True,  # the reference log-probs come with the batch: the ones ftray is given
        use_cpu=True, bf16=False, report_to=[], per_device_train_batch_size=2, max_length=None, disable_tqdm=True,
    )
    # Its training set is only needed to construct the trainer (it precomputes its reference log-probs).
    train = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in case["rows"][:2]])
    model = load_model(case["model"]).eval()
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    seqs = pairs + [N + i for i in pairs]  # TRL's layout too: chosen rows, then rejected
    inputs = {
        "input_ids": batch["input_ids"][seqs],
        "attention_mask": batch["attention_mask"][seqs],
        "completion_mask": (batch["labels"][seqs] != IGNORE).long(),
        "ref_chosen_logps": ref[pairs],
        "ref_rejected_logps": ref[[N + i for i in pairs]],
    }
    with torch.no_grad():
        loss = trainer.compute_loss(model, inputs)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def ftray_loss(case, loss_type: str, beta: float, label_smoothing: float) -> tuple[float, torch.Tensor]:
    policy, n, ref = case["policy"], case["n"], case["ref"]
    loss, chosen_rewards, _ = dpo_loss(
        policy[:N], policy[N:], ref[:N], ref[N:], beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
        chosen_tokens=n[:N], rejected_tokens=n[N:],
    )
    return float(loss), chosen_rewards


@pytest.mark.parametrize(
    ("loss_type", "beta"),
    [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("ipo", 0.5), ("hinge", 0.1), ("hinge", 0.5)],
)
def test_dpo_loss_equals_trl(case, loss_type, beta):
    want, metrics = trl_loss(case, loss_type, beta, 0.0, list(range(N)))
    got, chosen_rewards = ftray_loss(case, loss_type, beta, 0.0)
    assert abs(got - want) <= 1e-6, (loss_type, beta, got, want)  # ipo's loss is ~29 at beta 0.1: absolute, not relative
    # TRL's fused LM head and ftray's selective log-softmax read the same response log-probs (sums of ~-25)
    assert metrics["logps/chosen"] == pytest.approx(float(case["policy"][:N].mean()), rel=0, abs=1e-5)
    assert metrics["logps/rejected"] == pytest.approx(float(case["policy"][N:].mean()), rel=0, abs=1e-5)
    assert metrics["rewards/chosen"] == pytest.approx(float(chosen_rewards.mean()), rel=0, abs=1e-6)


def test_label_smoothed_sigmoid_is_cdpo_as_trl_computes_it(case):
    beta, e = 0.5, 0.1
    want = sum(trl_loss(case, "aot_unpaired", beta, e, [i])[0] for i in range(N)) / N
    got, _ = ftray_loss(case, "sigmoid", beta, e)
    assert abs(got - want) <= 1e-6, (got, want)
    # The deliberate difference: TRL's own sigmoid ignores the smoothing (it gives the unsmoothed loss).
    trl_sigmoid = trl_loss(case, "sigmoid", beta, e, list(range(N)))[0]
    assert abs(trl_sigmoid - ftray_loss(case, "sigmoid", beta, 0.0)[0]) <= 1e-6 and abs(got - trl_sigmoid) > 1e-3
