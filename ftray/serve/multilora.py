"""Many LoRA adapters in one pass: every row of a batch gets its own adapter's delta from one batched matmul
per LoRA layer (the idea of S-LoRA / Punica), where peft's `adapter_names` runs one sub-batch per adapter in
every layer (measured on 2 CPU cores: a batch mixing 8 adapters at 0.68x the speed of one adapter).

For each peft `lora.Linear` the loaded adapters' A and B are stacked once per change of the loaded set: slot 0
is peft's "__base__" (zeros; its rows join no group below), slot k+1 adapter k, ranks zero-padded to the layer's largest, each adapter's
`scaling` folded into its B. A batch groups its rows by adapter (Punica's SGMV: groups padded to the largest
with repeated rows), gathers the used adapters' A and B once while the same adapters are used, and every forward adds
`bmm(bmm(x_grouped, A), B)`, scattered back to the rows, to the base layer's output. (Gathering A and B per row
instead, B copies where U adapters suffice, measured 25-35% slower for the LoRA part: on a CPU, reading the
adapters' weights is the cost.) Hooks sit where peft's own sit
(`LoraModel._enable_peft_forward_hooks`): a forward pre-hook on every LoRA layer injects
`adapter_names=["__base__"] * rows` so peft computes the base layer only, and a forward hook on each stacked
layer adds the delta; they are removed when the call ends, so `generate` with its KV cache runs unchanged.

Supported: eval mode, unmerged, plain LoRA (`peft_type` LORA; `r`, `lora_alpha`, rsLoRA, any targets that
are `nn.Linear`). Anything else is not stacked and a batch that names it runs on peft's own path: DoRA and
the other LoRA variants (aLoRA, ...; peft's path refuses DoRA in a mixed batch too), `lora_bias`, LoRA on
embeddings / conv / attention modules / `target_parameters`, quantized base layers (bnb, GPTQ, ...),
`modules_to_save`, trainable tokens, AdaLoRA and the other tuners, train mode (dropout), merged adapters.
Beam search (more rows than names) is an error here; the engine does not use it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch

__all__ = ["BASE", "StackedLora"]

BASE = "__base__"  # peft's name for "no adapter" in `adapter_names`


def _base_only(module, args, kwargs, rows: int):
    kwargs["adapter_names"] = [BASE] * rows  # peft's _mixed_batch_forward then runs the base layer alone
    return args, kwargs


def _add_delta(module, args, kwargs, output, a: torch.Tensor, b: torch.Tensor, seg: _Segments | None):
    x = args[0] if args else kwargs["x"]
    if seg is None:  # one adapter for every row: plain matmuls
        return output + ((x.to(a.dtype) @ a) @ b).to(output.dtype)
    if x.shape[0] != seg.rows:
        raise ValueError(f"stacked LoRA: the batch has {x.shape[0]} rows, adapters were given for {seg.rows}")
    u = a.shape[0]
    xs = x.reshape(seg.rows, -1, x.shape[-1]).index_select(0, seg.perm).to(a.dtype)  # [u * group, tokens, in]
    d = torch.bmm(torch.bmm(xs.reshape(u, -1, xs.shape[-1]), a), b).reshape(len(seg.perm), xs.shape[1], -1)
    out = output.reshape(seg.rows, xs.shape[1], -1).index_add(0, seg.dst, d.index_select(0, seg.keep).to(output.dtype))
    return out.reshape(output.shape)


class _Segments:
    """A batch's rows grouped by adapter (Punica's SGMV): group k holds the rows of the k-th adapter used, padded to
    the largest group with copies of its first row; `perm` picks x's rows in that order, `keep` the real
    positions in it, `dst` their rows in the batch. Rows with no adapter are in no group (their delta is zero)."""

    def __init__(self, slots: list[int], used: list[int], device):
        groups = [[j for j, s in enumerate(slots) if s == u] for u in used]
        size = max(len(g) for g in groups)
        perm, keep, dst = [], [], []
        for g in groups:
            for i in range(size):
                if i < len(g):
                    keep.append(len(perm))
                    dst.append(g[i])
                perm.append(g[min(i, len(g) - 1)])
        self.rows = len(slots)
        self.perm, self.keep, self.dst = (torch.tensor(v, device=device) for v in (perm, keep, dst))


class StackedLora:
    """The stacked A and B of a PeftModel's loaded LoRA adapters; `rows(names)` runs a forward or a `generate`
    inside it with row i on adapter names[i]. Call `invalidate()` after adapters are added or deleted."""

    def __init__(self, peft):
        self.peft = peft
        self._stacks: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor, set[int]]] | None = None
        self._slot: dict[str, int] = {}
        self._layers: list[torch.nn.Module] = []  # every LoRA layer and auxiliary wrapper: they all get _base_only
        # The used adapters' A and B of the last mixed call, per layer: a continuous batch calls once per decoding
        # step, mostly with the same adapters, and gathering them is a copy of all their weights.
        self._gathered: tuple[tuple[int, ...], dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]] | None = None

    def invalidate(self) -> None:
        self._stacks = None
        self._gathered = None

    @property
    def names(self) -> list[str]:
        """The adapters stacked now (built if they are not)."""
        self._build()
        return list(self._slot)

    def unsupported(self, names: Sequence[str]) -> str | None:
        """Why a batch naming `names` cannot run stacked (then peft's path runs it), or None."""
        if self.peft.training:
            return "the model is in train mode"
        self._build()
        bad = sorted({n for n in names if n != BASE and n not in self._slot})
        return f"adapter(s) {', '.join(bad)} are not plain LoRA on Linear layers" if bad else None

    @contextmanager
    def rows(self, names: Sequence[str]) -> Iterator[None]:
        why = self.unsupported(names)
        if why:
            raise ValueError(f"stacked LoRA: {why}")
        assert self._stacks is not None
        slots = [self._slot.get(n, 0) for n in names]
        used = sorted(set(slots) - {0})
        one = slots[0] if len(set(slots)) == 1 else None
        segs: dict[torch.device, tuple[_Segments, torch.Tensor]] = {}
        handles = [m.register_forward_pre_hook(partial(_base_only, rows=len(names)), with_kwargs=True) for m in self._layers]
        try:
            for layer, (a, b, here) in self._stacks.items():
                if not here.intersection(used):
                    continue  # no row's adapter touches this layer: peft's base output is the answer
                if one is not None:  # one adapter for every row: no grouping
                    wa, wb, seg = a[one], b[one], None
                else:  # the used adapters' weights, gathered once for as long as the same adapters are used
                    if a.device not in segs:
                        segs[a.device] = (_Segments(slots, used, a.device), torch.tensor(used, device=a.device))
                    seg, idx = segs[a.device]
                    if self._gathered is None or self._gathered[0] != tuple(used):
                        self._gathered = (tuple(used), {})
                    if layer not in self._gathered[1]:
                        self._gathered[1][layer] = (a.index_select(0, idx), b.index_select(0, idx))
                    wa, wb = self._gathered[1][layer]
                handles.append(layer.register_forward_hook(partial(_add_delta, a=wa, b=wb, seg=seg), with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    def _build(self) -> None:
        if self._stacks is not None:
            return
        from peft import PeftType
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import Linear
        from peft.utils.other import AuxiliaryTrainingWrapper

        lora = [m for m in self.peft.modules() if isinstance(m, LoraLayer)]
        self._layers = [m for m in self.peft.modules() if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))]
        ok = []
        for name, cfg in self.peft.peft_config.items():
            plain = cfg.peft_type == PeftType.LORA and not cfg.modules_to_save and not cfg.trainable_token_indices
            for m in lora:
                if not plain:
                    break
                mine = name in m.lora_A or name in m.lora_embedding_A
                plain = not mine or (
                    type(m) is Linear and not m.merged and name not in m.lora_variant and not m.lora_bias.get(name)
                )
            if plain and any(name in m.lora_A for m in lora):
                ok.append(name)
        ok.sort()
        self._slot = {n: k + 1 for k, n in enumerate(ok)}
        stacks = {}
        for m in lora:
            here = [n for n in ok if n in m.lora_A]
            if not here:
                continue
            rank = max(m.r[n] for n in here)
            dtype = m.lora_A[here[0]].weight.dtype
            device = m.lora_A[here[0]].weight.device
            a = torch.zeros(len(ok) + 1, m.in_features, rank, dtype=dtype, device=device)
            b = torch.zeros(len(ok) + 1, rank, m.out_features, dtype=dtype, device=device)
            with torch.no_grad():
                for n in here:
                    r, k = m.r[n], self._slot[n]
                    a[k, :, :r] = m.lora_A[n].weight.T
                    b[k, :r, :] = m.lora_B[n].weight.T * m.scaling[n]
            stacks[m] = (a, b, {self._slot[n] for n in here})
        self._stacks = stacks
