"""The method registry matches the files on disk; every method honours the protocol; trainable
parameters change and frozen ones do not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ftray.methods import REGISTRY, get_method

METHODS_DIR = Path(__file__).resolve().parents[1] / "ftray" / "methods"
NOT_METHODS = {"__init__", "losses"}


def test_registry_matches_files():
    files = {p.stem for p in METHODS_DIR.glob("*.py") if not p.stem.startswith("_") and p.stem not in NOT_METHODS}
    assert files == set(REGISTRY), f"registered {sorted(REGISTRY)} but files {sorted(files)}"
    for name, m in REGISTRY.items():
        assert m.name == name
        for attr in ("formats", "task_type", "packable", "load_base", "examples", "collate", "loss", "score_rows", "summarize", "save_extra"):
            assert hasattr(m, attr), (name, attr)


# The language-modelling methods on plain rows; every other method's test file checks its own
# trainable parameters (tests/test_methods_<kind>.py).
@pytest.mark.parametrize("kind", ["sft", "causal_lm"])
def test_lora_trains_adapter_only(kind, tiny_model, tmp_path):
    from ftray.config import spec_from_dict
    from ftray.data.encode import ensure_chat_template
    from ftray.models.adapters import apply_adapter
    from ftray.models.load import load_tokenizer

    fmt = {"sft": "prompt_completion", "causal_lm": "text"}[kind]
    spec = spec_from_dict(
        {
            "model": {"path": str(tiny_model)},
            "data": {"train": "x.jsonl", "format": fmt, "max_length": 32},
            "method": {"kind": kind},
            "adapter": {"kind": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
            "train": {"max_steps": 1, "global_batch_size": 2, "micro_batch_size": 1},
            "output": {"dir": str(tmp_path)},
        }
    )
    m = get_method(kind)
    tok = load_tokenizer(str(tiny_model))
    ensure_chat_template(tok)
    row = {"prompt": "1+2=", "completion": "3"} if fmt == "prompt_completion" else {"text": "1+2=3 and 2+2=4"}
    examples = m.examples(row, tok, spec)
    torch.manual_seed(0)
    model = apply_adapter(m.load_base(str(tiny_model), torch.float32, spec), spec.adapter, task_type=m.task_type,
                          heads=m.trainable_heads(spec))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # LoRA B starts at zero: A moves only from the second step on
        loss, info = m.loss(model, m.collate(examples, tok.pad_token_id))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert info["target_tokens"] > 0
    for n, p in model.named_parameters():
        moved = not torch.equal(before[n], p.detach())
        assert moved == p.requires_grad, (n, p.requires_grad, moved)


def test_each_use_gets_its_own_method_instance():
    """A method's per-run state (ppo's adaptive KL coefficient, grpo's sampler) never leaks between runs:
    `get_method` makes a new instance each time."""
    a, b = get_method("ppo"), get_method("ppo")
    a.load_state_dict({"kl_coef": 0.5})
    assert a is not b and a.kl_coef == 0.5 and b.kl_coef == 0.0
    assert get_method("ppo").trainable_heads(None) == ("ftray_value_head",) and get_method("sft").trainable_heads(None) == ()
