"""Prefix caching for the continuous batcher (`ftray.serve.batcher`): the keys and values of a prompt prefix that
recent requests share (a chat template's system prompt, a few-shot preamble, a shared document), computed once
per adapter and copied into each new row's cache, so that its prefill runs over the rest of its prompt only.

Which prefixes: a row's prompt is compared with the other prompts of its prefill group and the last `RECENT`
prompts, on the same adapter; the longest common prefix of at least `MIN_TOKENS` tokens (and at least one token
short of the prompt: the prefill needs one position to choose the first token from) is kept, unless an entry
(or another row of the group) already covers all but fewer than `MIN_TOKENS` of it. Its keys and values are
copied out of the row's own prefill (`keep`): learning costs no forward of its own (an earlier version computed
each new prefix in a one-row forward, and those forwards cost a burst more time than its hits saved). The
first rows that share a prefix each compute it; every later one starts from the entry. Entries live in an LRU
held under `max_tokens` cached tokens in all (`deployment.prefix_cache_tokens`); an adapter's entries go when it
is evicted or reloaded (`LoraEngine._drop` calls `forget`): keys and values depend on the adapter's weights.

Tokens as computed alone: the prefix's keys and values are the same numbers whether its positions run in the
row's own forward or in the entry's (the same weights, positions and causal attention); only the order of
floating-point sums may differ, as between batch sizes (tests/test_batcher.py compares answers with and
without the cache).
"""

from __future__ import annotations

import os
from collections import OrderedDict, deque

import torch

__all__ = ["Prefixes", "MIN_TOKENS", "RECENT"]

MIN_TOKENS = 16  # shorter shared prefixes save little prefill and would fill the LRU with near-copies
RECENT = 64  # prompts remembered per engine to find shared prefixes in


class _Entry:
    """A kept prefix (its adapter is in its key in `Prefixes.entries`)."""

    __slots__ = ("ids", "keys", "values")

    def __init__(self, ids: tuple[int, ...], keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.ids, self.keys, self.values = ids, keys, values  # per layer [1, heads, len, dim]


class Prefixes:
    """The prefix cache of one engine. `plan(rows)` before a prefill: per row, the entry to start from and the
    shared prefix to `keep` from its prefill; `forget(adapter)` when an adapter's weights go."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.entries: OrderedDict[tuple[str | None, tuple[int, ...]], _Entry] = OrderedDict()
        self.recent: deque[tuple[str | None, list[int]]] = deque(maxlen=RECENT)
        self.hits = self.saved = 0  # rows that used an entry, prompt tokens they did not prefill

    def cached_tokens(self) -> int:
        return sum(len(e.ids) for e in self.entries.values())

    def forget(self, adapter: str | None) -> None:
        for key in [k for k in self.entries if k[0] == adapter]:
            del self.entries[key]

    def lookup(self, adapter: str | None, prompt: list[int]) -> _Entry | None:
        """The longest entry of `adapter` that is a proper prefix of `prompt`."""
        best = None
        for (a, ids), e in self.entries.items():
            if a == adapter and len(ids) < len(prompt) and (best is None or len(ids) > len(best.ids)) \
                    and tuple(prompt[: len(ids)]) == ids:
                best = e
        return best

    def plan(self, rows: list[tuple[str | None, list[int]]]) -> list[tuple[_Entry | None, int]]:
        """Per (adapter, prompt): the entry its prefill starts from (a proper prefix of the prompt, or None) and the
        length of a longer shared prefix to keep from the row's own prefill (`keep`), 0 for none."""
        if self.max_tokens < MIN_TOKENS:
            return [(None, 0)] * len(rows)
        out: list[tuple[_Entry | None, int]] = []
        planned: list[tuple[str | None, tuple[int, ...]]] = []  # kept from this group's rows after its prefill
        for j, (adapter, prompt) in enumerate(rows):
            entry = self.lookup(adapter, prompt)
            have = max([len(entry.ids) if entry else 0] + [len(ids) for a, ids in planned
                                                          if a == adapter and tuple(prompt[: len(ids)]) == ids])
            others = [p for a, p in self.recent if a == adapter] + [p for k, (a, p) in enumerate(rows) if k != j and a == adapter]
            shared = min(max((len(os.path.commonprefix([prompt, p])) for p in others), default=0), len(prompt) - 1)
            learn = shared if shared - have >= MIN_TOKENS and MIN_TOKENS <= shared <= self.max_tokens else 0
            if learn:
                planned.append((adapter, tuple(prompt[:learn])))
            if entry is not None:
                self.entries.move_to_end((adapter, entry.ids))
                self.hits += 1
                self.saved += len(entry.ids)
            out.append((entry, learn))
        self.recent.extend(rows)
        return out

    def keep(self, adapter: str | None, ids: tuple[int, ...], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep a prefix's keys and values (per layer [1, heads, len(ids), dim]), taken from a row's prefill."""
        if (adapter, ids) in self.entries:
            return
        self.entries[(adapter, ids)] = _Entry(ids, keys, values)
        while self.cached_tokens() > self.max_tokens and len(self.entries) > 1:
            self.entries.popitem(last=False)
