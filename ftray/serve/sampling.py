"""Each request's own decoding settings inside a batch (no Ray, no HTTP).

`RowSampler` (a logits processor) picks a row's next token itself: the row's `logit_bias`, then its presence /
frequency penalties, then its temperature and top_p, then a draw from the row's own `torch.Generator` (seeded by
the request's `seed`, else at random), or the argmax at temperature 0. It returns scores that are -inf but for
the chosen token (greedy over them picks it). A row's tokens thus depend on its own request only: the same
seed gives the same text alone or in any batch.

Logprobs are the model's own: the log-softmax of the model's logits, before this request's logit_bias, penalties, temperature and top_p
(vLLM's default `raw_logprobs`; OpenAI's do not change with temperature either). Summed over a completion they
are the model's log-likelihood of it, whatever the sampling settings were.

Stop strings: the batcher (`ftray.serve.batcher`) ends a row when one appears in the text of its generated
tokens, decoded each step (SmolLM2's tokenizer: 50 us for 64 tokens, 300 us for 512). transformers'
`StopStringCriteria` takes one list for the whole batch and preprocesses the vocabulary for each: 1.2-2.7 s on
SmolLM2's 49,152 tokens here, every time (its cache is keyed on `get_vocab()`, whose order changes between
calls), so every request with stop strings would hold the replica that long. `Decoded` cuts the text where
the first stop string begins, for a whole answer and a stream alike.
"""

from __future__ import annotations

import functools
import os

import torch
from transformers import LogitsProcessor, TopPLogitsWarper

__all__ = ["Decoded", "RowSampler", "find_stop", "token_bytes"]


def find_stop(text: str, stops: list[str] | None) -> int | None:
    """Where the first of `stops` to appear in `text` begins (the earliest start), or None."""
    found = [i for i in (text.find(s) for s in stops or ()) if i >= 0]
    return min(found) if found else None


def _held(text: str, stops: list[str]) -> int:
    """The length of the longest tail of `text` that may be the start of a stop string."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)


class RowSampler(LogitsProcessor):
    """Per-row sampling for a left-padded batch whose prompts end at column `width`. Request keys read:
    temperature, top_p, seed, presence_penalty, frequency_penalty, logit_bias ({token id: bias}) and
    logprobs (None, or how many top alternatives to record with the chosen token's logprob).
    `self.logprobs[j]` gets one (chosen id, logprob, [(id, logprob), ...]) per step of row j."""

    def __init__(self, reqs: list[dict], width: int, device):
        self.width = width
        self.temperature = [float(r.get("temperature") or 0.0) for r in reqs]
        self.top_p = [float(r.get("top_p") or 1.0) for r in reqs]
        self.gens = [
            None if t == 0 else torch.Generator(device=device).manual_seed(_seed(r.get("seed")))
            for t, r in zip(self.temperature, reqs, strict=True)
        ]
        self.freq = torch.tensor([[float(r.get("frequency_penalty") or 0.0)] for r in reqs], device=device)
        self.pres = torch.tensor([[float(r.get("presence_penalty") or 0.0)] for r in reqs], device=device)
        self.penalize = bool(self.freq.any() or self.pres.any())
        self.biases = [r.get("logit_bias") or {} for r in reqs]
        self.bias = None  # [rows, vocab], made on the first step (the logits' width is the model's vocabulary)
        self.top = [r.get("logprobs") for r in reqs]
        self.logprobs: list[list[tuple]] = [[] for _ in reqs]

    def adjust(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """The logits each row samples from, before temperature: + logit_bias, then OpenAI's penalties,
        logit - count * frequency_penalty - (count > 0) * presence_penalty, counting the row's generated tokens."""
        if any(self.biases):
            if self.bias is None:
                self.bias = torch.zeros_like(scores)
                for j, bias in enumerate(self.biases):
                    for tok, b in bias.items():
                        self.bias[j, int(tok)] = float(b)
            scores = scores + self.bias
        if self.penalize:
            gen = input_ids[:, self.width :]
            counts = torch.zeros_like(scores).scatter_add_(1, gen, torch.ones_like(gen, dtype=scores.dtype))
            scores = scores - counts * self.freq - (counts > 0).to(scores.dtype) * self.pres
        return scores

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        lp = scores.log_softmax(-1) if any(k is not None for k in self.top) else None
        scores = self.adjust(input_ids, scores)
        chosen = scores.argmax(-1).tolist()
        for j, t in enumerate(self.temperature):
            c = chosen[j]
            if t > 0:
                s = scores[j : j + 1] / t
                if self.top_p[j] < 1:
                    s = TopPLogitsWarper(self.top_p[j])(input_ids[j : j + 1], s)
                c = chosen[j] = int(torch.multinomial(s.softmax(-1)[0], 1, generator=self.gens[j]))
            if self.top[j] is not None:
                top = lp[j].topk(self.top[j]) if self.top[j] else None
                alts = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
                self.logprobs[j].append((c, float(lp[j, c]), alts))
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(chosen), device=scores.device), torch.tensor(chosen, device=scores.device)] = 0.0
        return out


def _seed(seed: int | None) -> int:
    # torch.Generator takes seeds in [-2**63, 2**64); a request may send any int64, plus its choice index.
    return int.from_bytes(os.urandom(8), "little") if seed is None else int(seed) % 2**64


class Decoded:
    """A completion's text as its tokens come: whole characters only (a byte-level BPE token may be half of
    one), cut where the first stop string begins, with a tail that may be the start of a stop string held
    back until it is known not to be. A whole answer is the same pushes and a `flush`, so a stream and a
    whole answer give the same text. `offsets[i]`: where token i's text begins (OpenAI's `text_offset`)."""

    def __init__(self, tokenizer, stops: list[str] | None = None):
        self.tok, self.stops = tokenizer, list(stops or [])
        self.ids: list[int] = []
        self.offsets: list[int] = []
        self.text = ""  # all decoded so far, a trailing half character included
        self.sent = 0  # how much of `text` has been handed out
        self.cut: int | None = None  # where the first stop string begins, once one has appeared

    def push(self, ids: list[int]) -> str:
        """Take the next tokens; return the text that may be sent now."""
        if self.cut is not None:
            return ""
        self.offsets += [len(self.text)] * len(ids)
        self.ids += ids
        self.text = self.tok.decode(self.ids, skip_special_tokens=True)
        return self._release(self.text.endswith("\ufffd"))

    def flush(self) -> str:
        """At the end: what was held back, when no stop string came."""
        return "" if self.cut is not None else self._release(False, final=True)

    def _release(self, partial: bool, final: bool = False) -> str:
        whole = self.text[:-1] if partial else self.text
        end = self.cut = find_stop(whole, self.stops)
        if end is None:
            end = len(whole) - (0 if final else _held(whole, self.stops))
        new = whole[self.sent : max(end, self.sent)]
        self.sent = max(self.sent, end)
        return new

    def ready(self, final: bool = False) -> int:
        """How many tokens have had their text (begin to be) handed out: those whose logprobs may go with it.
        With `final`, every token before the stop string, or all of them when none came."""
        if final and self.cut is None:
            return len(self.offsets)
        return sum(1 for o in self.offsets if o < self.sent)


@functools.cache
def _byte_table() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """A token's own bytes: a byte-level BPE token may be part of a UTF-8 character, which `decode` would turn
    into U+FFFD."""
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)  # absent on a pure-Python (slow) tokenizer
    if backend is not None and isinstance(backend.decoder, decoders.ByteLevel):
        piece, table = tokenizer.convert_ids_to_tokens(token_id), _byte_table()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
    return tokenizer.decode([token_id]).encode()
