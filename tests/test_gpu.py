"""On an NVIDIA GPU, in process (no Ray needed on the GPU machine: `pytest -m gpu`): the packed attention on
CUDA, a packed SFT job in bf16 through DeepSpeed, and qlora (bitsandbytes 4-bit base) at ZeRO 0 and 2.
Every test skips without CUDA; the Ray Train path on GPU workers (`scaling.use_gpu`) is the same loop."""

from __future__ import annotations

import pytest
import torch

from ftray.config import resolve_paths, spec_from_dict
from tests._specs import job_dict

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)"),
]

TARGETS = ["q_proj", "v_proj"]


def test_packed_logits_equal_unpacked_on_cuda(tiny_model):
    """The block-diagonal mask transformers derives from position ids holds on CUDA's sdpa kernels too."""
    from ftray.data.encode import encode_row, ensure_chat_template, pack_examples
    from ftray.methods._lm import collate_tokens
    from ftray.models.load import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    ensure_chat_template(tok)
    model = load_model(str(tiny_model), attn_implementation="sdpa").cuda().eval()
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(1, 2), (13, 9), (7, 7), (19, 0), (3, 11)]]
    exs = [encode_row(tok, r, 64)[0] for r in rows]
    packed = pack_examples(exs, 40, tok.pad_token_id)
    assert len(packed) < len(exs)
    checked = 0
    with torch.no_grad():
        for p in packed:
            batch = {k: v.cuda() for k, v in collate_tokens([p], tok.pad_token_id).items() if k != "labels"}
            logits = model(**batch, use_cache=False).logits[0]
            pos = p["position_ids"]
            starts = [i for i, x in enumerate(pos) if x == 0] + [len(pos)]
            for s, e in zip(starts[:-1], starts[1:], strict=True):
                seg = p["input_ids"][s:e]
                if not any(x["input_ids"] == seg for x in exs):
                    continue
                alone = model(input_ids=torch.tensor([seg], device="cuda")).logits[0]
                assert torch.allclose(logits[s:e], alone, atol=1e-4), (logits[s:e] - alone).abs().max()
                checked += 1
    assert checked == len(exs)


def test_packed_sft_in_bf16_on_a_gpu(tiny_model, arith, cache_dir, tmp_path):
    """A packed full-fine-tuning SFT job on one GPU: precision `auto` resolves to bf16, DeepSpeed's engine
    trains (held-out loss falls by more than 0.5 nats)."""
    from ftray.train.local import run_local

    d = job_dict(tiny_model, arith[0], arith[1], tmp_path / "run", cache_dir, train__max_steps=20, train__lr=3e-3,
                 data__packing=True, data__eval_max_rows=32, deepspeed__zero_stage=0, scaling__use_gpu=True,
                 scaling__num_workers=1)
    d["adapter"] = {"kind": "full"}
    record = run_local(resolve_paths(spec_from_dict(d)))
    assert record["train"]["precision"] == "bf16", record["train"]
    before, after = record["eval"]["before"]["eval_loss"], record["eval"]["after"]["eval_loss"]
    assert after < before - 0.5, record["eval"]


@pytest.mark.parametrize("zero", [0, 2])
def test_qlora_on_a_gpu(zero, tiny_model, arith, cache_dir, tmp_path):
    """qlora: the base loaded in 4 bits (bitsandbytes), LoRA on top, one GPU, ZeRO 0 and 2 (ZeRO-3 is refused
    at validation); the adapter file holds LoRA weights only."""
    pytest.importorskip("bitsandbytes", reason="qlora needs the bitsandbytes package")
    from safetensors.torch import load_file

    from ftray.train.local import run_local

    run = tmp_path / "run"
    d = job_dict(tiny_model, arith[0], arith[1], run, cache_dir, train__max_steps=10, train__lr=5e-3,
                 deepspeed__zero_stage=zero, data__eval_max_rows=32, scaling__use_gpu=True, scaling__num_workers=1)
    d["adapter"] = {"kind": "qlora", "r": 4, "alpha": 8, "target_modules": TARGETS}
    record = run_local(resolve_paths(spec_from_dict(d)))
    assert record["eval"]["after"]["eval_loss"] < record["eval"]["before"]["eval_loss"], record["eval"]
    w = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert w and all(k.endswith(("lora_A.weight", "lora_B.weight")) and v.numel() > 0 for k, v in w.items())
