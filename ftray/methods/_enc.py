"""What the encoder methods (classify, contrastive, ...) share: loading with a given auto class,
padding token lists, and gathering held-out results from every rank for metrics that are not
means of per-row values (Spearman, retrieval)."""

from __future__ import annotations

import json
import zlib

import torch

__all__ = ["all_gather_with_grad", "gather_objects", "gather_rows", "load_auto", "max_over_ranks", "pad", "row_hash", "strip_padding", "tokenize", "write_sentence_transformers"]


def load_auto(auto_class, path: str, dtype, spec, **kw):
    """`auto_class.from_pretrained` with the same rules as `ftray.models.load.load_model`: safetensors
    only, remote code only when the spec allows it."""
    from ftray.models.load import _local

    if spec.model.attn_implementation != "auto":
        kw["attn_implementation"] = spec.model.attn_implementation
    return auto_class.from_pretrained(
        _local(path),
        dtype=dtype or torch.float32,
        trust_remote_code=spec.model.trust_remote_code,
        use_safetensors=True,
        **kw,
    )


def tokenize(tokenizer, text: str, max_length: int) -> tuple[list[int], bool]:
    """Token ids with the tokenizer's special tokens ([CLS] ... [SEP] on BERT), truncated to max_length."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return ids[:max_length], len(ids) > max_length


def pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to the longest: (ids, attention mask)."""
    n = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def row_hash(row: dict) -> float:
    return float(zlib.crc32(json.dumps(row, sort_keys=True).encode()))


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's (n, d) tensor (same n everywhere) -> (world * n, d) in the loop's global row order:
    rank r holds rows r, r + world, r + 2 world, ... A no-op outside torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts, 1).reshape(-1, *x.shape[1:])


def all_gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's (n_r, d) rows concatenated in rank order, and where this rank's rows start in it.
    Differentiable (torch.distributed.nn's all_gather): in backward each rank's rows receive the sum of
    the gradients every rank's loss sends them. n_r may differ between ranks (the held-out last batch):
    each rank pads to the largest n_r for the collective and the padding is cut off again. (x, 0)
    outside torch.distributed or on one rank."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn
    import torch.nn.functional as F

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.empty_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    offset = sum(sizes[: dist.get_rank()])
    if max(sizes) == 0:  # e.g. no rank has a hard negative in this batch
        return x, offset
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, max(sizes) - x.shape[0]))
    parts = dist_fn.all_gather(padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]), offset


def strip_padding(x: torch.Tensor, hashes: torch.Tensor) -> torch.Tensor:
    """The loop fills the last ranks' shards up with copies of row 0; they sit at the end of the global
    order (at most world - 1 of them) and are dropped here."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    n = len(hashes)
    while n > max(1, len(hashes) - world + 1) and hashes[n - 1] == hashes[0]:
        n -= 1
    return x[:n]


def max_over_ranks(n: int, device="cpu") -> int:
    """The largest `n` of all ranks: ZeRO-3 gathers parameters collectively, so every rank must run as
    many forward passes as the busiest one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def write_sentence_transformers(folder, dim: int, max_length: int) -> None:
    """The files that make a saved encoder a sentence-transformers model: Transformer -> mean Pooling ->
    Normalize (the embeddings the methods train are compared by cosine)."""
    from pathlib import Path

    folder = Path(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length, "do_lower_case": False}))
    pooling = {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (folder / "2_Normalize").mkdir(exist_ok=True)


def gather_objects(items: list) -> list:
    """Every rank's list (same length everywhere), in the loop's global row order (rank r holds rows
    r, r + world, ...), with the trailing copies of row 0 that fill the last shards dropped."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    world = dist.get_world_size()
    parts: list = [None] * world
    dist.all_gather_object(parts, items)
    out = [p[i] for i in range(len(items)) for p in parts]
    n = len(out)
    while n > max(1, len(out) - world + 1) and out[n - 1] == out[0]:
        n -= 1
    return out[:n]
