"""Continuous batching (no Ray, no HTTP): requests join the running batch between decoding steps and leave at
their own EOS, stop string or `max_tokens`; whole answers and streams share the batch. `LoraEngine` owns one
`Batcher`; `ftray.serve.deployments.Generator` calls `step()` while there is work, in-process callers drain it.

Why not transformers' own continuous batching (`init_continuous_batching` / `generate_batch`, paged attention):
it flattens every request of a step into one ragged row (`input_ids` of shape [1, tokens]), so nothing can
give each request its own LoRA adapter (peft's `adapter_names` and the stacked path of `ftray.serve.multilora`
both select by the batch dimension). This schedules over transformers' model forward and its `DynamicCache`:

- A step first admits one group of waiting requests, up to `max_rows` rows and `max_loaded_adapters` distinct
  adapters in the batch: their prompts run as one left-padded prefill into a new cache (logits of the last
  position only), and that cache is joined to the running one, the shorter of the two left-padded in the
  sequence dimension. Each newcomer's first token is chosen at once (time to first token = wait + prefill).
  Waiting requests are taken shortest prompt first, those that were waiting when the previous ones arrived
  before them (so none waits forever behind later short prompts), and a group holds at most `prefill_tokens`
  prompt tokens padding included (rows x longest prompt; a longer prompt alone): a burst of newcomers is
  prefilled over several steps with little padding, the running rows decode between its groups, and the
  shortest prompts get their first token after one group rather than after the whole burst.
- Then one decoding step for every row, each row on its own adapter, unless requests still wait and the running
  rows have had a token within the last `pause_s` seconds: then the step ends after its group, and the next step
  admits the next group (prefill first, as vLLM's default scheduler). A burst is prefilled nearly back to back, so
  its last first token is not delayed by a decoding step after every group; the running streams pause for at most
  about `pause_s` plus one group. Each group is its own step, so a server sends its first tokens between groups.
  The cache's layers keep spare columns
  (`_RoomyLayer`): a step writes its keys and values in place instead of copying the whole cache.
- With prefix caching (`deployment.prefix_cache_tokens`, `ftray.serve.prefixes`), a newcomer whose prompt starts
  with a prefix kept from earlier rows on its adapter (a system prompt, a shared preamble) gets that prefix's keys
  and values copied into its first columns and prefills only the rest of its prompt; the group's token budget
  still counts whole prompts.
- A row that ends is dropped from the cache, and the leading columns that are padding for every remaining row
  are cut, so a long finished prompt stops costing attention.
Each row's positions count its own tokens only, so padding changes no row's rotary positions; the attention mask
hides the padding. Rows are chosen by argmax together when greedy and plain, else each by its own `RowSampler`
(seed, temperature, top_p, penalties, logit_bias, logprobs): a row's tokens depend on its own request, alone or
in any batch. The generation config's own logits processors are not applied (as a server, settings come from
the request). A model whose cache is not plain `DynamicLayer`s (sliding-window layers, ...) cannot be joined:
newcomers then wait until the running rows end, and all that fit are prefilled together (no token budget: they
cannot join later), one cohort at a time.

An adapter in use by a running row is neither evicted nor reloaded: a newer version of it (registry
reload-on-change) waits until its running rows end, and requests for it wait with it, so no answer mixes two
versions.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ftray.serve.prefixes import Prefixes
from ftray.serve.sampling import RowSampler, find_stop

__all__ = ["Batcher"]


class _Seq:
    """One request in the batch: its tokens so far and how it is chosen and told."""

    def __init__(self, req: dict, done: Callable[[dict], None], emit: Callable[[dict], None] | None,
                 cancelled: threading.Event | None):
        self.req, self.done, self.emit, self.cancelled = req, done, emit, cancelled
        self.prompt: list[int] = list(req["input_ids"])
        self.adapter: str | None = req.get("adapter") or None
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.sampler: RowSampler | None = None
        self.batch_size = self.adapters = 0  # the most rows / distinct adapters decoding beside it
        self.cohort: int | None = None  # which admission round first saw it waiting: older cohorts go first

    def result(self) -> dict:
        if self.emit is not None:  # a stream had its tokens already
            return {"finish_reason": self.finish, "prompt_tokens": len(self.prompt), "completion_tokens": len(self.tokens)}
        out = {"token_ids": self.tokens, "finish_reason": self.finish, "prompt_tokens": len(self.prompt),
               "batch_size": self.batch_size, "adapters_in_batch": self.adapters}
        if self.req.get("logprobs") is not None:
            out["logprobs"] = self.sampler.logprobs[0][: len(self.tokens)]
        return out


def _plain(req: dict) -> bool:
    return not (req.get("temperature") or req.get("presence_penalty") or req.get("frequency_penalty")
                or req.get("logit_bias") or req.get("logprobs") is not None)


class _RoomyLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers with room for more columns: a decoding step writes
    its column in place and attention reads a view, where `DynamicLayer.update` copies the whole cache with
    `torch.cat` (13 % of SmolLM2-135M's decoding time at 16 rows in a profile; with and without it:
    benchmarks/results/batcher_inprocess.md). A buffer full grows by half its width (one copy every width / 2
    steps); whatever sets `keys`/`values` (a join, a retire, `batch_select_indices`) sets a buffer
    with no room, which the next step grows."""

    _GROW_MIN = 16

    def __init__(self):
        self._k = self._v = None
        self._kn = self._vn = 0
        super().__init__()

    @property
    def keys(self):
        return None if self._k is None else self._k[:, :, : self._kn]

    @keys.setter
    def keys(self, t):
        self._k, self._kn = t, (0 if t is None or t.dim() < 4 else t.shape[-2])

    @property
    def values(self):
        return None if self._v is None else self._v[:, :, : self._vn]

    @values.setter
    def values(self, t):
        self._v, self._vn = t, (0 if t is None or t.dim() < 4 else t.shape[-2])

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = self.values = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._k, self._kn = self._append(self._k, self._kn, key_states)
        self._v, self._vn = self._append(self._v, self._vn, value_states)
        return self.keys, self.values

    @classmethod
    def _append(cls, buf: torch.Tensor | None, n: int, new: torch.Tensor) -> tuple[torch.Tensor, int]:
        if buf is None or n == 0:
            return new, new.shape[-2]  # a prefill: exactly its columns (most rows of a burst never decode alone)
        m = n + new.shape[-2]
        if m > buf.shape[-2]:
            grown = buf.new_empty(*buf.shape[:2], m + max(m // 2, cls._GROW_MIN), buf.shape[-1])
            grown[:, :, :n] = buf[:, :, :n]
            buf = grown
        buf[:, :, n:m] = new
        return buf, m


def _pad_left(cache, mask: torch.Tensor, n: int) -> torch.Tensor:
    if n:
        for layer in cache.layers:
            b, h, _, d = layer.keys.shape
            layer.keys = torch.cat([layer.keys.new_zeros(b, h, n, d), layer.keys], dim=-2)
            layer.values = torch.cat([layer.values.new_zeros(b, h, n, layer.values.shape[-1]), layer.values], dim=-2)
        mask = torch.cat([mask.new_zeros(mask.shape[0], n), mask], dim=1)
    return mask


class Batcher:
    """The running batch of one engine. `submit` from any thread; `step` from one thread at a time."""

    def __init__(self, engine, max_rows: int, prefill_tokens: int, pause_s: float = 0.0, prefix_tokens: int = 0):
        self.engine, self.max_rows, self.prefill_tokens, self.pause_s = engine, max_rows, prefill_tokens, pause_s
        self.prefixes = Prefixes(prefix_tokens) if prefix_tokens else None  # shared prompt prefixes' keys and values
        self._token_at = 0.0  # when the running rows last got a token (monotonic): a decoding step or their admission
        self.waiting: deque[_Seq] = deque()
        self.rows: list[_Seq] = []
        self.cache = None  # the rows' DynamicCache, left-padded to one length
        self.mask: torch.Tensor | None = None  # [rows, columns]: 1 where a row has a token
        self.joinable: bool | None = None  # whether a cache can be joined to a running one (known at the first take)
        self._cohorts = 0  # admission rounds that found new requests waiting
        self._layer: type[DynamicLayer] = _RoomyLayer  # the cache layer of a joinable model
        self._admitting: list[_Seq] = []  # taken from `waiting`, not yet rows
        self._lock = threading.Lock()

    def submit(self, req: dict, done: Callable[[dict], None], emit: Callable[[dict], None] | None = None,
               cancelled: threading.Event | None = None) -> None:
        """Queue a checked request (`LoraEngine.check`). `done(result)` is called once at its end, from `step`:
        {token_ids, finish_reason, prompt_tokens, batch_size, adapters_in_batch, logprobs?}, for a stream (`emit`
        given: called with {"token_ids": [t], "logprobs"?: [...]} per token) {finish_reason, prompt_tokens,
        completion_tokens}, or {"error": ...}."""
        with self._lock:
            self.waiting.append(_Seq(req, done, emit, cancelled))

    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def in_use(self) -> set[str]:
        return {s.adapter for s in self.rows if s.adapter}

    def step(self) -> None:
        """Admit what fits, then decode one token for every row. An unexpected error fails every request in the
        batch and waiting (each told once, with a 500) rather than leaving its caller waiting forever."""
        try:
            gone = [s for s in self.rows if s.cancelled is not None and s.cancelled.is_set()]
            for s in gone:
                s.finish = "cancelled"
            if gone:
                self._retire()
            admitted = self._admit()
            if self.rows and not (admitted and self._prefill_next()):
                self._decode()
        except Exception as e:  # noqa: BLE001 - told to every request below
            with self._lock:
                everyone, self.waiting = [*self.rows, *self._admitting, *self.waiting], deque()
            self.rows, self._admitting, self.cache, self.mask = [], [], None, None
            for s in everyone:
                if s.finish is None:
                    s.finish = "error"
                    s.done(_server_error(e))

    def drain(self) -> None:
        while self.busy():
            self.step()

    def _prefill_next(self) -> bool:
        """Whether the next step should admit another group before the running rows decode: requests wait, there
        is room, and the rows have not gone `pause_s` without a token."""
        return (bool(self.waiting) and len(self.rows) < self.max_rows and self.joinable is not False
                and time.monotonic() - self._token_at < self.pause_s)

    # admission ------------------------------------------------------------------------------------
    def _take(self) -> list[_Seq]:
        eng = self.engine
        if self.joinable is None:
            self.joinable = all(type(layer) is DynamicLayer for layer in DynamicCache(config=eng.model.config).layers)
        busy = self.in_use()
        taken: list[_Seq] = []
        with self._lock:
            if not self.waiting or len(self.rows) >= self.max_rows or (self.rows and self.joinable is False):
                return []
            fresh = [s for s in self.waiting if s.cohort is None]
            for s in fresh:
                s.cohort = self._cohorts
            self._cohorts += bool(fresh)
            budget = self.prefill_tokens if self.joinable else None  # a cache that cannot join takes all that fit
            width = 0
            # decided first, then `waiting` replaced: an error leaves it whole
            for s in sorted(self.waiting, key=lambda s: (s.cohort, len(s.prompt))):
                a = s.adapter
                used = busy | {t.adapter for t in taken if t.adapter}
                if s.cancelled is not None and s.cancelled.is_set():
                    continue  # the caller is gone; nothing to tell
                if len(self.rows) + len(taken) >= self.max_rows:
                    break
                if a and a not in used and len(used) >= eng.cfg.max_loaded_adapters:
                    continue  # no room for another adapter until a row ends
                if a and a in busy and eng.stale(a):
                    continue  # a newer version waits until the running rows of the old one end
                if budget is not None and taken and (len(taken) + 1) * max(width, len(s.prompt)) > budget:
                    continue  # the next group's (a shorter prompt of a later cohort may still fit)
                taken.append(s)
                width = max(width, len(s.prompt))
            chosen = set(map(id, taken))
            self.waiting = deque(s for s in self.waiting if id(s) not in chosen
                                 and not (s.cancelled is not None and s.cancelled.is_set()))
        self._admitting = taken
        return taken

    def _admit(self) -> bool:
        """Prefill one group of waiting requests into the batch; whether any joined."""
        eng = self.engine
        taken = self._take()
        if not taken:
            return False
        wanted = {s.adapter for s in taken if s.adapter}
        failed = eng.load_errors(wanted) if wanted else {}
        ok = []
        for s in taken:
            if s.adapter in failed:
                s.finish = "error"
                s.done(failed[s.adapter])
            else:
                ok.append(s)
        for s in ok:
            if not _plain(s.req):
                s.sampler = RowSampler([s.req], len(s.prompt), eng.device)
        try:
            cache, mask, logits = self._prefill(ok) if ok else (None, None, None)
        except Exception as e:  # noqa: BLE001 - these requests fail; the running rows go on
            for s in ok:
                s.finish = "error"
                s.done(_server_error(e))
            ok = []
        if not ok:
            self._admitting = []
            return False
        if not self.rows:  # an idle batch: its rows' clock starts with their first token
            self._token_at = time.monotonic()
        self._join(cache, mask)
        self.rows += ok
        self._admitting = []
        self._choose(ok, logits)
        self._count()
        self._retire()
        return True

    def _prefill(self, seqs: list[_Seq]):
        """One left-padded forward of the group's prompts into a new cache. With prefix caching, each row's cached
        prefix (`ftray.serve.prefixes`) is copied into the cache's first columns, right-aligned there, and only the
        rest of its prompt is fed: a row's columns are [padding][its prefix][padding][the rest], the mask hides
        the padding and the positions count the row's own tokens."""
        eng = self.engine
        plan = self.prefixes.plan([(s.adapter, s.prompt) for s in seqs]) if self.prefixes is not None and self.joinable \
            else [(None, 0)] * len(seqs)
        found = [e for e, _ in plan]
        lead = [len(e.ids) if e is not None else 0 for e in found]
        past = max(lead)
        width = max(len(s.prompt) - n for s, n in zip(seqs, lead, strict=True))
        ids = torch.full((len(seqs), width), eng.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), past + width), dtype=torch.long)
        for j, (s, n) in enumerate(zip(seqs, lead, strict=True)):  # every row's last prompt token in the last column
            rest = s.prompt[n:]
            ids[j, width - len(rest) :] = torch.tensor(rest)
            mask[j, past - n : past] = 1
            mask[j, past + width - len(rest) :] = 1
        ids, mask = ids.to(eng.device), mask.to(eng.device)
        cache = DynamicCache(config=eng.model.config)
        if self.joinable:  # plain DynamicLayers: the same layer with room to decode in place
            cache.layers = [self._layer() for _ in cache.layers]
        if past:
            ref = next(e for e in found if e is not None)  # any entry: the layers' head count, head size and dtype
            for i, layer in enumerate(cache.layers):
                k0, v0 = ref.keys[i], ref.values[i]
                keys = k0.new_zeros(len(seqs), k0.shape[1], past, k0.shape[3])
                values = v0.new_zeros(len(seqs), v0.shape[1], past, v0.shape[3])
                for j, e in enumerate(found):
                    if e is not None:
                        keys[j, :, past - lead[j] :] = e.keys[i][0]
                        values[j, :, past - lead[j] :] = e.values[i][0]
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys, values
        logits = eng.forward([s.adapter for s in seqs], input_ids=ids, attention_mask=mask,
                             position_ids=(mask.cumsum(1) - 1).clamp(min=0)[:, past:], past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
        for j, (s, (_, learn)) in enumerate(zip(seqs, plan, strict=True)):
            if learn:  # the row's columns holding its first `learn` prompt tokens
                cols = mask[j].nonzero().squeeze(1)[:learn]
                self.prefixes.keep(s.adapter, tuple(s.prompt[:learn]), [layer.keys[j : j + 1].index_select(2, cols) for layer in cache.layers],
                                   [layer.values[j : j + 1].index_select(2, cols) for layer in cache.layers])
        return cache, mask, logits[:, -1]

    def _join(self, cache, mask: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        have, new = self.mask.shape[1], mask.shape[1]
        self.mask = _pad_left(self.cache, self.mask, max(0, new - have))
        mask = _pad_left(cache, mask, max(0, have - new))
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.mask = torch.cat([self.mask, mask])

    # decoding -------------------------------------------------------------------------------------
    def _decode(self) -> None:
        eng = self.engine
        ids = torch.tensor([[s.tokens[-1]] for s in self.rows], device=eng.device)
        pos = self.mask.sum(1, keepdim=True)  # each row's own count of tokens: its next position
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        try:
            logits = eng.forward([s.adapter for s in self.rows], input_ids=ids, attention_mask=self.mask,
                                 position_ids=pos, past_key_values=self.cache, use_cache=True)
        except Exception as e:  # noqa: BLE001 - the cache may be half-updated: every running row fails
            for s in self.rows:
                s.done(_server_error(e))
            self.rows, self.cache, self.mask = [], None, None
            return
        self._choose(self.rows, logits[:, -1])
        self._token_at = time.monotonic()
        self._retire()

    def _choose(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        chosen = logits.argmax(-1).tolist()
        for j, s in enumerate(seqs):
            if s.sampler is not None:
                ids = torch.tensor([s.prompt + s.tokens], device=logits.device)
                chosen[j] = int(s.sampler(ids, logits[j : j + 1].float()).argmax(-1))
        eos, tok = self.engine.eos_ids, self.engine.tokenizer
        for s, t in zip(seqs, chosen, strict=True):
            if t in eos:
                s.finish = "stop"
                continue
            s.tokens.append(t)
            if s.emit is not None:
                item: dict = {"token_ids": [t]}
                if s.req.get("logprobs") is not None:
                    item["logprobs"] = s.sampler.logprobs[0][len(s.tokens) - 1 : len(s.tokens)]
                s.emit(item)
            stops = s.req.get("stop")
            if stops and find_stop(tok.decode(s.tokens, skip_special_tokens=True), stops) is not None:
                s.finish = "stop"
            elif len(s.tokens) >= s.req["max_tokens"]:
                s.finish = "length"

    def _count(self) -> None:
        adapters = len(self.in_use())
        for s in self.rows:
            s.batch_size, s.adapters = max(s.batch_size, len(self.rows)), max(s.adapters, adapters)

    def _retire(self) -> None:
        """Tell the rows that ended, drop them from the cache, and cut columns no remaining row uses."""
        ended = [s for s in self.rows if s.finish is not None]
        if not ended:
            return
        for s in ended:
            if s.finish != "cancelled":
                s.done(s.result())
        keep = [j for j, s in enumerate(self.rows) if s.finish is None]
        self.rows = [self.rows[j] for j in keep]
        if not self.rows:
            self.cache, self.mask = None, None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask.index_select(0, idx)
        lead = int((self.mask.sum(0) == 0).int().cumprod(0).sum())
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]


def _server_error(e: Exception) -> dict:
    return {"error": {"message": f"{type(e).__name__}: {e}"[:500], "type": "server_error", "code": None, "status": 500}}
