"""Tiny random-init causal LMs with a tokenizer trained here (offline), for tests and the quickstart.

Digits are split one per token, so arithmetic tasks are learnable by a model this small.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ftray.models.load import DEFAULT_CHAT_TEMPLATE

__all__ = ["SIZES", "build_tiny", "train_tokenizer"]

# name: (hidden, intermediate, layers, heads, kv_heads)
SIZES = {
    "nano": (64, 128, 2, 4, 2),  # ~0.1M without embeddings: mechanics tests
    "micro": (128, 256, 2, 4, 2),  # quickstart
    "small": (384, 1024, 6, 6, 2),  # ~15M: benchmarks
}

SPECIAL = ["<|endoftext|>", "<pad>", "<|bos|>", "<|user|>", "<|assistant|>", "<|system|>", "<mask>"]

_BUILTIN = """The quick brown fox jumps over the lazy dog. Question: what is the answer? Answer: it depends.
def add(a, b):
    return a + b
Write a function that returns the sum of a list of numbers in Python.
Once upon a time there was a model that learned to add numbers: 12+30=42, 7+8=15, 99+1=100.
"""


def _texts_from_file(path: str) -> Iterable[str]:
    p = Path(path)
    if p.suffix == ".jsonl":
        for line in p.read_text(encoding="utf-8").split("\n"):  # not splitlines(): U+2028 may be inside a string
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            stack = [row]
            while stack:
                v = stack.pop()
                if isinstance(v, str):
                    yield v
                elif isinstance(v, dict):
                    stack.extend(v.values())
                elif isinstance(v, list):
                    stack.extend(v)
    else:
        yield p.read_text(encoding="utf-8")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer (digits split) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) + [_BUILTIN], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        bos_token="<|bos|>",
        mask_token="<mask>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def build_tiny(
    out: str | Path,
    size: str = "nano",
    corpus: list[str] | None = None,
    vocab_size: int = 512,
    seed: int = 0,
    max_positions: int = 1024,
) -> Path:
    """Write a tiny Llama (safetensors) and its tokenizer to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if size not in SIZES:
        raise ValueError(f"unknown tiny size {size!r}; choose from {', '.join(SIZES)}")
    texts: list[str] = []
    for f in corpus or []:
        texts.extend(_texts_from_file(f))
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    hidden, inter, layers, heads, kv = SIZES[size]
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
