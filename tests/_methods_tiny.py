"""A tiny random-init BERT encoder (built from a config) with the `tiny_model` fixture's tokenizer
(it has `<mask>` and `<pad>`), and small labelled / paired data sets for the encoder methods."""

from __future__ import annotations

import json
import random
from pathlib import Path


def build_tiny_bert(tokenizer_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sign_task(folder: Path, n_train: int = 96, n_test: int = 32) -> tuple[Path, Path]:
    """Labels a tiny model can learn: is the sum `a+b` above 9 ('big') or not ('small')."""
    rng = random.Random(0)

    def rows(n):
        out = []
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            out.append({"text": f"{a}+{b}", "label": "big" if a + b > 9 else "small"})
        return out

    return write_jsonl(folder / "train.jsonl", rows(n_train)), write_jsonl(folder / "test.jsonl", rows(n_test))


def pairs_task(folder: Path, n_train: int = 64, n_test: int = 32) -> tuple[Path, Path, Path]:
    """(anchor/positive train, scored train, scored test) over digit strings: similar = same digits."""
    rng = random.Random(1)

    def num():
        return " ".join(str(rng.randint(0, 9)) for _ in range(4))

    ap = []
    for _ in range(n_train):
        s = num()
        ap.append({"anchor": s, "positive": s + " ."})

    def scored(n):
        out = []
        for i in range(n):
            s = num()
            same = i % 2 == 0
            out.append({"sentence1": s, "sentence2": s if same else num(), "score": 5.0 if same else 0.0})
        return out

    return (
        write_jsonl(folder / "ap_train.jsonl", ap),
        write_jsonl(folder / "sts_train.jsonl", scored(n_train)),
        write_jsonl(folder / "sts_test.jsonl", scored(n_test)),
    )


def build_tiny_t5(out: Path, corpus: list[str], vocab_size: int = 1000, d_model: int = 64, layers: int = 2) -> Path:
    """A tiny random-init T5 with a byte-level BPE tokenizer trained on `corpus` (texts)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from ftray.models.tiny import train_tokenizer

    if (out / "config.json").exists():
        return out
    tok = train_tokenizer(corpus, vocab_size=vocab_size)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(cfg).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def copy_task(folder: Path, n_train: int = 64, n_test: int = 16) -> tuple[Path, Path]:
    """Translation rows a tiny T5 learns in a few steps: the target is the source's digits spelled out."""
    names = "zero one two three four five six seven eight nine".split()
    rng = random.Random(3)

    def rows(n):
        out = []
        for _ in range(n):
            d = [rng.randint(0, 9) for _ in range(3)]
            out.append({"source": " ".join(map(str, d)), "target": " ".join(names[x] for x in d)})
        return out

    return write_jsonl(folder / "train.jsonl", rows(n_train)), write_jsonl(folder / "test.jsonl", rows(n_test))
