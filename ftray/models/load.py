"""Load a base model and tokenizer from a local folder, an s3:// folder, a hub id or an ftray run folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ftray import storage
from ftray.runs import RunFolder

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "ModelError",
    "Resolved",
    "ensure_chat_template",
    "load_model",
    "load_tokenizer",
    "resolve",
    "meta_model",
]

# Used when a tokenizer has no chat template of its own (documented in the README).
DEFAULT_CHAT_TEMPLATE = (
    "{%- for m in messages %}"
    # Encoders (BERT) have no eos token: nothing ends a turn but the newline.
    "{{ '<|' + m['role'] + '|>\n' + m['content'] + (eos_token if eos_token is defined and eos_token else '') + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{%- endif %}"
)


class ModelError(ValueError):
    """The model named in a spec can't be used; one line naming the field and path."""


@dataclass(frozen=True)
class Resolved:
    base: str  # folder (or hub id) holding config + weights of the base model
    tokenizer: str
    adapter: str | None = None  # an earlier run's adapter to continue training
    parent_run: str | None = None


def _looks_local(path: str) -> bool:
    """A hub id is `name` or `org/name`; a path that starts like a local one, has more parts, or whose
    first folder exists here is local (then a missing folder is reported, not a hub connection error)."""
    if storage.is_remote(path):
        return False
    if path.startswith((".", "/", "~", "runs/")) or Path(path).is_absolute():
        return True
    parts = Path(path).parts
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def _check_present(path: str, field: str, hint: str = "") -> None:
    if _looks_local(path) and not Path(path).expanduser().exists():
        raise ModelError(f"{field}: {path}: no such {'file' if path.endswith('.gguf') else 'folder'}{hint}")


def resolve(path: str, tokenizer: str | None = None, field: str = "model.path") -> Resolved:
    """Find base weights, tokenizer and (for a run folder) the adapter to continue from."""
    path = str(path)
    if tokenizer is not None:
        _check_present(tokenizer, field.removesuffix(".path") + ".tokenizer" if field.endswith(".path") else field)
    _check_present(path, field, "" if path.endswith(".gguf") else " (`ftray models get` or `ftray models tiny` writes one)")
    if path.endswith(".gguf"):  # one file: config, weights and tokenizer (`_local` converts it)
        if not storage.exists(path):
            raise ModelError(f"{field}: {path}: no such file")
        return Resolved(path, tokenizer or path)
    if RunFolder(path).has_record():
        for sub in ("merged", "model", "adapter"):
            inner = storage.join(path, sub)
            if storage.exists(inner) and not storage.is_complete(inner):
                raise ModelError(f"{field}: {inner} is incomplete (no .complete marker: an interrupted write)")
        for sub in ("merged", "model"):
            if storage.exists(storage.file_in(storage.join(path, sub), "config.json")):
                inner = storage.join(path, sub)
                return Resolved(inner, tokenizer or inner, None, path)
        adapter = storage.join(path, "adapter")
        if storage.exists(storage.file_in(adapter, "adapter_config.json")):
            cfg = json.loads(storage.read_text(storage.file_in(adapter, "adapter_config.json")))
            base = resolve(cfg["base_model_name_or_path"], None, f"{field} (the base of run {path})")
            return Resolved(base.base, tokenizer or storage.join(path, "tokenizer"), adapter, path)
        raise ModelError(f"{field}: {path} is a run folder without `model/` or `adapter/`")
    if storage.exists(storage.file_in(path, "config.json")):
        return Resolved(path, tokenizer or path)
    if storage.is_remote(path) or _looks_local(path) or Path(path).exists():
        raise ModelError(f"{field}: {path}: no model there (no config.json)")
    return Resolved(path, tokenizer or path)  # a hub id: transformers resolves it (or says why not)


def _local(path: str) -> str:
    if str(path).endswith(".gguf"):
        from ftray.models.real import gguf_folder

        return str(gguf_folder(path))
    return str(storage.cached_copy(path)) if storage.is_remote(path) else path


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_local(path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template ftray's default one (in place)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def load_config(path: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(_local(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.path: {path}: {str(e).splitlines()[0]}") from None


def meta_model(path: str, trust_remote_code: bool = False, auto_class=None):
    """The model's module tree on the meta device: no weights read, no memory used (for validation)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = load_config(path, trust_remote_code)
    with torch.device("meta"):
        return (auto_class or AutoModelForCausalLM).from_config(cfg, trust_remote_code=trust_remote_code)


def load_model(path: str, dtype=None, trust_remote_code: bool = False, attn_implementation: str = "auto", auto_class=None,
               **extra):
    """Weights from safetensors only (`use_safetensors=True`): nothing is unpickled. `extra` goes to
    from_pretrained (e.g. qlora's quantization_config)."""
    import torch
    from transformers import AutoModelForCausalLM

    kw = {}
    if attn_implementation != "auto":
        kw["attn_implementation"] = attn_implementation
    elif torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            kw["attn_implementation"] = "flash_attention_2"
        except ImportError:
            kw["attn_implementation"] = "sdpa"
    return (auto_class or AutoModelForCausalLM).from_pretrained(
        _local(path),
        dtype=dtype or torch.float32,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        **kw,
        **extra,
    )
