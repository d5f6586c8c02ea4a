"""What a model replica computes, without Ray: token ids in, token ids (or scores) out.

`LoraEngine` keeps one base model and many LoRA adapters in one `PeftModel` and decodes its requests by
continuous batching (`ftray.serve.batcher`): requests join the running batch between decoding steps and leave
at their own end. A batch that mixes adapters computes each LoRA layer for all rows at once from the adapters'
stacked weights (`ftray.serve.multilora`), or, for what that cannot stack, with peft's per-row `adapter_names`
("__base__" is the bare base). Each row is decoded by its own request's settings (`ftray.serve.sampling`: seed,
temperature, top_p, penalties, logit_bias, stop strings, max_tokens, logprobs), so it gets the tokens it
gets alone. Adapters load on first use and the least recently used one is deleted beyond `max_loaded_adapters`;
`release(name)` deletes one sooner (Serve's multiplex LRU evicted it: `ftray.serve.deployments`).

`ScorerEngine` runs an embedding model (mean or last-token pooling of the last hidden state, L2
normalised), a classifier (softmax over `id2label`) or a reward model (the one logit).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

from ftray import storage
from ftray.models.load import load_model, load_tokenizer, resolve
from ftray.runs import RunFolder
from ftray.serve.batcher import Batcher
from ftray.serve.config import GenerationModel, ScorerModel
from ftray.serve.multilora import BASE, StackedLora
from ftray.serve.registry import AdapterError, AdapterRegistry

__all__ = ["LoraEngine", "ScorerEngine", "error"]


def error(message: str, status: int = 400, type_: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "code": code, "status": status}}


def adapter_error(e: AdapterError) -> dict:
    return error(str(e), e.status, "invalid_request_error" if e.status < 500 else "server_error", e.code)


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class LoraEngine:
    def __init__(self, cfg: GenerationModel, device: str | None = None):
        import torch

        self.cfg = cfg
        resolved = resolve(cfg.base, field=f"generation[{cfg.name}].base")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(resolved.base, dtype=_dtype(cfg.dtype)).to(self.device).eval()
        self.tokenizer = load_tokenizer(resolved.tokenizer)
        self.registry = AdapterRegistry(cfg, resolved.base)
        self.peft = None  # the PeftModel, made when the first adapter loads
        self.stacked: StackedLora | None = None  # its adapters' stacked weights, for mixed batches
        self.loaded: OrderedDict[str, str] = OrderedDict()
        self._released: set[str] = set()
        self._stale: set[str] = set()  # rewritten in the registry since loaded, not reloaded yet (in use)
        self.batcher = Batcher(self, max_rows=cfg.deployment.max_batch_size, prefill_tokens=cfg.deployment.prefill_tokens,
                               pause_s=cfg.deployment.prefill_pause_s, prefix_tokens=cfg.deployment.prefix_cache_tokens)
        self.eos = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        self.eos_ids = set(self.eos if isinstance(self.eos, list) else [self.eos])
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self.vocab = self.model.get_output_embeddings().weight.shape[0]

    # adapters -------------------------------------------------------------------------------------
    def release(self, name: str) -> None:
        """Delete `name` at the next `ensure_loaded` that does not need it. Safe from any thread (set.add is
        atomic): Serve evicts on a worker thread, possibly while a stream is decoding with peft's adapters."""
        self._released.add(name)

    def stale(self, name: str) -> bool:
        """Whether a loaded adapter was rewritten in its registry since it loaded (checked at most every
        `reload_check_s`); the next `ensure_loaded` that may replace it loads the new version."""
        if name not in self._stale and name in self.loaded and self.registry.changed(name):
            self._stale.add(name)
        return name in self._stale

    def ensure_loaded(self, names: set[str]) -> dict[str, AdapterError]:
        """Load what is missing; evict the least recently used adapters not needed now. Returns the names
        that could not be loaded, each with its error: one adapter's failure (its store unreachable, its
        files half-copied) fails its own requests only. Adapters of running rows (`batcher.in_use()`) are
        neither evicted nor reloaded here."""
        from peft import PeftModel

        failed: dict[str, AdapterError] = {}
        busy = self.batcher.in_use()
        keep = names | busy
        for name in sorted(names):
            if name in self.loaded:
                if name in busy or not self.stale(name):
                    self.loaded.move_to_end(name)
                    continue
                self._drop(name)  # rewritten under the same name: load the new version
            try:
                folder = self.registry.lookup(name)
                with self.registry.guard():
                    local = str(storage.cached_copy(folder))
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.model, local, adapter_name=name, is_trainable=False)
                    self.peft.eval()
                    self.stacked = StackedLora(self.peft)
                else:
                    self.peft.load_adapter(local, adapter_name=name, is_trainable=False)
                    self.stacked.invalidate()
            except AdapterError as e:
                failed[name] = e
                continue
            except Exception as e:  # unreadable weights (a truncated safetensors file, a wrong shape)
                if self.peft is not None and name in self.peft.peft_config:
                    self.peft.delete_adapter(name)
                failed[name] = AdapterError(f"adapter {name} failed to load: {type(e).__name__}: {e}"[:500], 500, "adapter_load_failed")
                continue
            self.loaded[name] = folder
        # Released by Serve, after the loads: peft keeps an active adapter, so the last one loaded stays (it costs
        # memory only).
        for gone in [n for n in self._released if n not in busy]:
            self._released.discard(gone)
            if gone in self.loaded and gone not in names and len(self.loaded) > 1:
                self._drop(gone)
        for old in list(self.loaded):
            if len(self.loaded) <= self.cfg.max_loaded_adapters:
                break
            if old not in keep:
                self._drop(old)
        return failed

    def load_errors(self, names: set[str]) -> dict[str, dict]:
        """`ensure_loaded`, its failures as error dicts."""
        return {name: adapter_error(e) for name, e in self.ensure_loaded(names).items()}

    def _drop(self, name: str) -> None:
        self.peft.delete_adapter(name)
        self.stacked.invalidate()  # the stacks would keep the deleted adapter's weights
        if self.batcher.prefixes is not None:
            self.batcher.prefixes.forget(name)  # its prefixes' keys and values came from its weights
        del self.loaded[name]
        self._stale.discard(name)

    # generation -----------------------------------------------------------------------------------
    def check(self, r: dict) -> dict | None:
        """An error dict for a request this model cannot run, else None."""
        if not r.get("input_ids"):
            return error("the prompt is empty", code="empty_prompt")
        if self.max_positions and len(r["input_ids"]) + r["max_tokens"] > self.max_positions:
            return error(
                f"prompt ({len(r['input_ids'])} tokens) + max_tokens ({r['max_tokens']}) exceeds the model's"
                f" context of {self.max_positions} tokens",
                code="context_length_exceeded",
            )
        bad = [t for t in r.get("logit_bias") or {} if not 0 <= int(t) < self.vocab]
        if bad:
            return error(f"logit_bias: token {bad[0]} is not in the model's vocabulary (0-{self.vocab - 1})", code="invalid_value")
        return None

    def submit(self, req: dict, done: Callable[[dict], None], emit: Callable[[dict], None] | None = None,
               cancelled: threading.Event | None = None) -> None:
        """Queue one request on the running batch (`ftray.serve.batcher`); `done(result)` is called from the
        `batcher.step()` that ends it (at once for a request this model cannot run)."""
        bad = self.check(req)
        if bad:
            done(bad)
        else:
            self.batcher.submit(req, done, emit, cancelled)

    def generate(self, reqs: list[dict]) -> list[dict]:
        """reqs: {adapter|None, input_ids, max_tokens, temperature, top_p, seed, stop, presence_penalty,
        frequency_penalty, logit_bias, logprobs} (all but input_ids and max_tokens optional; see
        `ftray.serve.sampling`). One result per request: {token_ids, finish_reason, prompt_tokens, batch_size,
        adapters_in_batch, logprobs (when asked: (id, logprob, top alternatives) per token)} or {"error": ...}.
        In process: the requests join the running batch together and it runs until all have ended."""
        out: list[dict | None] = [None] * len(reqs)
        for i, r in enumerate(reqs):
            self.submit(r, partial(out.__setitem__, i))
        self.batcher.drain()
        return out  # type: ignore[return-value]

    def stream(self, req: dict, emit: Callable[[dict], None], cancelled: threading.Event) -> dict:
        """Generate one request in process, calling `emit({"token_ids", "logprobs"?})` as tokens come; stops early
        when `cancelled`. Returns {finish_reason, prompt_tokens, completion_tokens} or {"error": ...}."""
        res: list[dict] = []
        self.submit(req, res.append, emit, cancelled)
        self.batcher.drain()
        return res[0] if res else {"finish_reason": "cancelled", "prompt_tokens": len(req["input_ids"]), "completion_tokens": 0}

    def forward(self, names: list[str | None], **kw):
        """The model's logits with row i on adapter names[i] (None: the base): stacked when it can be, else on
        peft's path."""
        import torch

        with torch.inference_mode():
            if self.peft is None:
                return self.model(**kw).logits
            rows = [n or BASE for n in names]
            if self.cfg.mixed_adapters == "stacked" and self.stacked.unsupported(rows) is None:
                with self.stacked.rows(rows):
                    return self.peft(**kw).logits
            return self.peft(adapter_names=rows, **kw).logits


class ScorerEngine:
    def __init__(self, cfg: ScorerModel, device: str | None = None):
        import torch
        from transformers import AutoModel, AutoModelForSequenceClassification

        from ftray.data.encode import ensure_chat_template

        self.cfg = cfg
        resolved = resolve(cfg.path, field=f"scorers[{cfg.name}].path")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.method = None  # the run's method, whose `logits` scores (classify's `method.pooling`)
        run = RunFolder(cfg.path)
        if resolved.adapter or (cfg.kind != "embedding" and run.has_record()):
            # A run (e.g. classify + LoRA, or a full classifier): its model as the run built it (head, labels,
            # pooling, adapter), as `ftray eval` loads it.
            from ftray.methods import get_method, load_run_model, run_spec

            spec = run_spec(run)  # with what training settled (classify's label names): no training file read
            if spec is None:
                raise ValueError(f"scorers[{cfg.name}]: {cfg.path} is a run whose run.json has no spec naming its method")
            self.method = get_method(spec.method.kind)
            model = load_run_model(spec, resolved, merge=True, method=self.method)
        else:  # a plain model folder: its config carries the head and label names
            auto = AutoModel if cfg.kind == "embedding" else AutoModelForSequenceClassification
            model = load_model(resolved.base, auto_class=auto)
        self.model = model.to(self.device).eval()
        self.tokenizer = load_tokenizer(resolved.tokenizer)
        self.tokenizer.padding_side = "right"
        if cfg.kind == "reward":  # keep the reply: a long conversation loses its start, as `reward` trained on it
            self.tokenizer.truncation_side = "left"
        ensure_chat_template(self.tokenizer)
        if cfg.kind != "embedding":
            n = self.model.config.num_labels
            if cfg.kind == "reward" and n != 1:
                raise ValueError(f"scorers[{cfg.name}]: a reward model has 1 label, {cfg.path} has {n}")
            if self.model.config.pad_token_id is None:
                self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def text(self, item: Any) -> str:
        """A reward input: a string, {prompt, response} or {messages}, rendered with the chat template."""
        if isinstance(item, str):
            return item
        if "messages" in item:
            msgs = item["messages"]
        else:
            msgs = [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": item["response"]}]
        return self.tokenizer.apply_chat_template(msgs, tokenize=False)

    def run(self, items: list[Any]) -> list[dict]:
        import torch

        texts = [self.text(x) for x in items]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        n_tokens = enc["attention_mask"].sum(1).tolist()
        with torch.inference_mode():
            if self.cfg.kind != "embedding" and self.method is not None:
                logits = self.method.logits(self.model, enc["input_ids"], enc["attention_mask"]).float()
            else:
                out = self.model(**enc)
                logits = out.logits.float() if self.cfg.kind != "embedding" else None
        if self.cfg.kind == "embedding":
            h = out.last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            if self.cfg.pooling == "mean":
                v = (h * m).sum(1) / m.sum(1).clamp(min=1)
            else:
                v = h[torch.arange(h.shape[0]), enc["attention_mask"].sum(1) - 1]
            v = torch.nn.functional.normalize(v.float(), dim=-1)
            return [{"embedding": e, "tokens": t} for e, t in zip(v.tolist(), n_tokens, strict=True)]
        if self.cfg.kind == "reward":
            return [{"score": s, "tokens": t} for s, t in zip(logits[:, 0].tolist(), n_tokens, strict=True)]
        probs = logits.softmax(-1).tolist()
        labels = [self.model.config.id2label.get(i, str(i)) for i in range(logits.shape[-1])]
        rows = []
        for p, t in zip(probs, n_tokens, strict=True):
            best = max(range(len(p)), key=p.__getitem__)
            rows.append({"label": labels[best], "score": p[best], "scores": dict(zip(labels, p, strict=True)), "tokens": t})
        return rows
