"""Many LoRA adapters in one pass (ftray/serve/multilora.py) through LoraEngine, without Ray: a batch mixing
adapters of different ranks, targets and alphas (and the bare base) answers as each request alone, with peft's
own mixed-batch logits, restacks when adapters load and are evicted, and runs what it cannot stack on peft's path."""

from __future__ import annotations

import pytest
import torch

from ftray.serve.multilora import BASE
from tests._serve_models import make_adapter_run

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {  # name: seed, r, targets, alpha, more LoraConfig fields
    "qv2": (31, 2, ("q_proj", "v_proj"), 8, {}),
    "all8": (32, 8, ALL, 4, {}),
    "od4rs": (33, 4, ("o_proj", "down_proj"), 16, {"use_rslora": True}),
    "emb": (34, 4, ("embed_tokens", "q_proj"), 8, {}),  # LoRA on the embeddings: not stacked, peft's path
}
PROMPTS = ["12+7=", "3+4=", "19+19=", "1+1=", "7+8=", "99+1=", "5+5=", "10+2="]


@pytest.fixture(scope="module")
def runs(tiny_model, work) -> dict[str, str]:
    out = {}
    for name, (seed, r, targets, alpha, more) in ADAPTERS.items():
        out[name] = str(make_adapter_run(tiny_model, work / "multilora" / name, seed=seed, r=r, targets=targets,
                                         alpha=alpha, **more))
    return out


def _engine(tiny_model, runs, **kw):
    from ftray.serve.config import GenerationModel
    from ftray.serve.engine import LoraEngine

    return LoraEngine(GenerationModel(name="tiny", base=str(tiny_model), adapters=runs, **kw), device="cpu")


@pytest.fixture(scope="module")
def engine(tiny_model, runs):
    return _engine(tiny_model, runs)


def _req(engine, prompt: str, adapter: str | None, max_tokens: int = 10) -> dict:
    tok = engine.tokenizer
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    return {"adapter": adapter, "input_ids": ids, "max_tokens": max_tokens, "temperature": 0.0}


def _batch(engine, names: list[str]) -> dict:
    """Left-padded input ids and mask, one prompt per row."""
    rows = [_req(engine, p, None)["input_ids"] for p in PROMPTS[: len(names)]]
    width = max(map(len, rows))
    ids = torch.tensor([[engine.pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def _logits(engine, names: list[str], stacked: bool) -> torch.Tensor:
    """Greedy generate's logits for every step (prefill, then the KV-cached steps): [steps, rows, vocab]."""
    kw = {**_batch(engine, names), "max_new_tokens": 6, "do_sample": False, "output_logits": True,
          "return_dict_in_generate": True, "pad_token_id": engine.pad}
    with torch.inference_mode():
        if stacked:
            with engine.stacked.rows(names):
                out = engine.peft.generate(**kw)
        else:
            out = engine.peft.generate(adapter_names=names, **kw)
    return torch.stack(out.logits)


def test_mixed_batch_equals_each_request_alone(engine):
    names = ["qv2", "all8", None, "od4rs", "all8", "qv2", None, "od4rs"]
    reqs = [_req(engine, p, n) for p, n in zip(PROMPTS, names, strict=False)]
    together = engine.generate(reqs)
    assert engine.stacked.unsupported([n or BASE for n in names]) is None  # this batch ran stacked
    for r, t in zip(reqs, together, strict=True):
        assert t["token_ids"] == engine.generate([r])[0]["token_ids"], r["adapter"]
    same_prompt = engine.generate([_req(engine, "12+7=", n) for n in (None, "qv2", "all8", "od4rs")])
    assert len({tuple(o["token_ids"]) for o in same_prompt}) > 1  # the adapters change the answer


def test_stacked_logits_equal_peft_mixed_batch_and_a_wrong_gather_fails(engine):
    engine.ensure_loaded({"qv2", "all8", "od4rs"})
    names = ["all8", BASE, "qv2", "od4rs", "all8", "all8", BASE, "od4rs"]  # groups of 3, 1 and 2 rows
    ref = _logits(engine, names, stacked=False)
    ours = _logits(engine, names, stacked=True)
    assert ref.shape == ours.shape and (ours - ref).abs().max().item() < 1e-5
    one = ["all8"] * len(names)  # every row on one adapter: the no-gather branch
    assert (_logits(engine, one, stacked=True) - _logits(engine, one, stacked=False)).abs().max().item() < 1e-5

    # Rows' adapters rotated by one: each row whose adapter changed moves far beyond the tolerance, so a gather
    # that mixed up rows could not pass the check above.
    rotated = names[1:] + names[:1]
    wrong = _logits(engine, rotated, stacked=True)
    for j, (n, m) in enumerate(zip(names, rotated, strict=True)):
        if n != m:
            assert (wrong[:, j] - ref[:, j]).abs().max().item() > 1e-2, (j, n, m)


def test_restacks_when_adapters_load_and_are_evicted(tiny_model, runs):
    engine = _engine(tiny_model, runs, max_loaded_adapters=2)
    peft_path = _engine(tiny_model, runs, max_loaded_adapters=2, mixed_adapters="peft")
    for names in (["qv2", "all8", None], ["all8", "od4rs", "all8"], ["qv2", None, "qv2"]):
        reqs = [_req(engine, p, n) for p, n in zip(PROMPTS, names, strict=False)]
        got = engine.generate(reqs)
        assert engine.stacked.names == sorted(engine.loaded)  # qv2 evicted, od4rs loaded, then the reverse
        assert [o["token_ids"] for o in got] == [o["token_ids"] for o in peft_path.generate(reqs)], names


def test_what_is_not_stacked_runs_on_peft_path(engine):
    names = ["emb", "qv2", None, "all8"]
    reqs = [_req(engine, p, n) for p, n in zip(PROMPTS, names, strict=False)]
    together = engine.generate(reqs)
    assert "emb" in engine.stacked.unsupported([n or BASE for n in names])
    with pytest.raises(ValueError, match="stacked LoRA: adapter.s. emb are not plain LoRA"):
        with engine.stacked.rows(["emb", "qv2"]):
            pass
    for r, t in zip(reqs, together, strict=True):
        assert t["token_ids"] == engine.generate([r])[0]["token_ids"], r["adapter"]
