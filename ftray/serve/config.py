"""The serve config: which models, which adapters, how each deployment scales, and the limits.

It is the `args:` block of a Serve config file (`import_path: ftray.serve.app:build_app`), so
`serve run deploy/adapters.yaml`, `serve deploy` and `ftray serve` all go through this one schema.
Unknown keys are errors, as in the job spec.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ftray.config import SERVED_NAME

__all__ = ["ADAPTER_NAME", "Auth", "Deployment", "Feedback", "GenerationModel", "Limits", "ScorerModel", "ServeConfig"]

# A model or adapter name: a path component, never a path. "../../etc/passwd" fails here. One pattern with
# the job spec's `output.publish_name`: what a job publishes is servable by its name.
ADAPTER_NAME = SERVED_NAME


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Deployment(_Strict):
    """How one model deployment scales; passed to `serve.deployment(...).options()`."""

    num_replicas: int | Literal["auto"] | None = Field(1, description="fixed replica count; ignored with autoscaling_config")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Serve autoscaling config, e.g. {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16}"
    )
    num_cpus: float = Field(1.0, description="CPUs reserved per replica (also torch's thread count on CPU)")
    num_gpus: float = Field(0.0, description="GPUs per replica; fractions share a GPU between replicas")
    max_ongoing_requests: int = Field(64, ge=1, description="requests one replica works on at once (>= max_batch_size)")
    max_queued_requests: int = Field(
        64, ge=-1, description="requests waiting for a replica before new ones get 429 (-1: unbounded, not advised)"
    )
    max_batch_size: int = Field(
        16, ge=1, description="generator: most rows decoding together (continuous batching; requests beyond it wait"
        " for a row to end); scorer: @serve.batch size. 1 serves one request at a time"
    )
    prefill_tokens: int = Field(
        512, ge=1, description="generator: most prompt tokens prefilled in one step, padding included (rows x longest"
        " prompt; a longer prompt is prefilled alone). Waiting requests are taken shortest prompt first in groups under"
        " it, one group per decoding step: running rows go on decoding and short prompts get their first token early"
        " (ftray/serve/batcher.py). 512: SmolLM2-135M on CPU prefills about as many tokens/s from 256 tokens per"
        " forward up, and 512 gave more output tokens/s and a lower p50 first-token time than 256 at concurrency 16, the same p95"
        " (benchmarks/results/batcher_inprocess.md)"
    )
    prefill_pause_s: float = Field(
        2.0, ge=0, description="generator: while requests wait, prefill groups run back to back (each its own step,"
        " so first tokens go out between them) until the running rows have gone this long without a token, then"
        " every row decodes one; 0 decodes after every group. Prefill first, as vLLM's default scheduler: a burst's"
        " last first token comes sooner, at a pause of the running streams (benchmarks/results/batcher_pause.md)"
    )
    prefix_cache_tokens: int = Field(
        4096, ge=0, description="generator: prompt tokens whose keys and values are kept for prefixes that recent"
        " requests share (a system prompt, a few-shot preamble), per adapter, LRU; a request starting with one prefills"
        " only the rest of its prompt (ftray/serve/prefixes.py). Memory: these tokens x layers x 2 x KV heads x head"
        " dim x dtype bytes (SmolLM2-135M in fp32: 46 KB a token, 4096 tokens 188 MB). 0 turns prefix caching off"
    )
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, description="scorer: how long a batch waits to fill (a generator does not wait: requests join"
        " its running batch at the next decoding step)"
    )

    @model_validator(mode="after")
    def _check(self):
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) < max_batch_size ({self.max_batch_size}):"
                " batches could never fill"
            )
        return self

    def serve_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.autoscaling_config:
            opts["autoscaling_config"] = self.autoscaling_config
            opts["num_replicas"] = None
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class GenerationModel(_Strict):
    """One base causal LM and the LoRA adapters served on it (requests name `base` or `base:adapter`)."""

    name: str = Field(description="the base's served name, e.g. `tiny` (requests say `tiny` or `tiny:sft-a`)")
    base: str = Field(description="base model folder, ftray run folder with model/ (full fine-tune), or s3://")
    adapters: dict[str, str] = Field(default_factory=dict, description="adapter name -> ftray run folder or adapter folder")
    registry: list[str] = Field(
        default_factory=list,
        description="folders (local or s3://) whose sub-folders are run or adapter folders, looked up on each"
        " request: an adapter written there later is servable without a restart",
    )
    max_loaded_adapters: int = Field(
        16, ge=1, description="adapters kept in memory per replica (LRU; also Serve's `max_num_models_per_replica`)"
    )
    route_by_adapter: bool = Field(
        True,
        description="send an adapter's requests to a replica that holds it (Serve model multiplexing): with N replicas "
        "each adapter is loaded about once, not N times; one hot adapter's traffic then stays on its replica until that "
        "replica is at `max_ongoing_requests`. false: any replica (base-model requests always go to any replica)",
    )
    max_unknown_names: int = Field(
        4096,
        ge=1,
        description="unknown adapter names remembered per replica (for a second each, so a name asked again and "
        "again costs one registry listing); the oldest are forgotten first, so endless new names cannot grow memory",
    )
    reload_check_s: float | None = Field(
        5.0,
        ge=0,
        description="how often (seconds, per adapter, on use) a loaded adapter's weights file is checked for a "
        "rewrite under the same name; a new complete version is loaded in place. null: never",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    mixed_adapters: Literal["stacked", "peft"] = Field(
        "stacked",
        description="how a batch mixing adapters runs: `stacked` computes each LoRA layer for all rows in one batched"
        " matmul over the adapters' stacked weights (ftray.serve.multilora; what it cannot stack runs on peft's path),"
        " `peft` runs peft's `adapter_names` path (one sub-batch per adapter in every LoRA layer)",
    )
    deployment: Deployment = Field(default_factory=Deployment)

    @model_validator(mode="after")
    def _names(self):
        for n in [self.name, *self.adapters]:
            if not ADAPTER_NAME.match(n):
                raise ValueError(f"name {n!r}: use letters, digits, '.', '_', '-' (at most 64)")
        return self


class ScorerModel(_Strict):
    """An embedding, classifier or reward model (a folder or a run folder with model/)."""

    name: str
    path: str
    kind: Literal["embedding", "classifier", "reward"]
    max_length: int = Field(512, ge=8, description="inputs are truncated to this many tokens")
    pooling: Literal["mean", "last"] = Field("mean", description="embedding pooling over the last hidden state")
    deployment: Deployment = Field(default_factory=lambda: Deployment(num_cpus=0.5, max_ongoing_requests=64, max_batch_size=32))

    @model_validator(mode="after")
    def _names(self):
        if not ADAPTER_NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '.', '_', '-' (at most 64)")
        return self


class Limits(_Strict):
    max_prompt_tokens: int = Field(2048, ge=1, description="longer prompts get 400")
    max_tokens: int = Field(512, ge=1, description="cap on a request's max_tokens (400 above it)")
    default_max_tokens: int = Field(16, ge=1, description="max_tokens when a request omits it")
    max_n: int = Field(4, ge=1, description="cap on a request's n")
    max_inputs: int = Field(64, ge=1, description="cap on the inputs of one embeddings/classify/rewards request")
    max_prompts: int = Field(
        16, ge=1, description="cap on the prompts of one completions request (each is generated n times; 400 above it)"
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    request_timeout_s: float = Field(60.0, gt=0, description="a request not answered by then gets 408")
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 429/503")


class Auth(_Strict):
    """API keys (`Authorization: Bearer KEY`). Without any key the app does not start, unless `allow_no_keys`
    says so; then it binds loopback only and answers loopback clients only (see `ftray/serve/auth.py`)."""

    api_keys_env: str | None = Field("FTRAY_API_KEYS", description="environment variable with comma-separated keys")
    api_keys_file: str | None = Field(None, description="file with one key per line")
    allow_no_keys: bool = Field(
        False,
        description="serve without API keys (a warning at start). Loopback is no boundary: behind a port-forward, a "
        "same-host proxy or a mesh sidecar every client looks local, so this lets in anyone who reaches the port. "
        "An HTTP proxy bound beyond loopback is refused without keys all the same",
    )


class Feedback(_Strict):
    """`POST /v1/feedback`: ratings and preferred/rejected pairs of served answers, kept as `preference` rows."""

    path: str | None = Field(
        None,
        description="a local .jsonl file (appended, one write per line under a lock) or a folder / s3:// prefix "
        "(one object per row); null turns /v1/feedback off (404)",
    )
    remember: int = Field(10_000, ge=1, description="recent completion choices kept per ingress replica for feedback")
    remember_bytes: int = Field(
        64 << 20,
        ge=1 << 16,
        description="bytes of remembered prompts and answers per ingress replica (each choice counts its prompt, "
        "history and text); the oldest are forgotten first, so a few huge answers cannot exhaust memory",
    )


class ServeConfig(_Strict):
    generation: list[GenerationModel] = Field(default_factory=list)
    scorers: list[ScorerModel] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    auth: Auth = Field(default_factory=Auth)
    feedback: Feedback = Field(default_factory=Feedback)
    ingress: Deployment = Field(
        default_factory=lambda: Deployment(num_cpus=0.25, max_ongoing_requests=512, max_queued_requests=512, max_batch_size=1)
    )

    @model_validator(mode="after")
    def _unique(self):
        names = [g.name for g in self.generation] + [s.name for s in self.scorers]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"model names must be unique; repeated: {', '.join(sorted(dup))}")
        if not names:
            raise ValueError("nothing to serve: give at least one `generation` or `scorers` entry")
        return self
