"""Run folders for serving tests and the serving benchmark, made without Ray Train.

They follow the trainer's on-disk contract: run.json (status completed), adapter/ (peft LoRA in
safetensors, `base_model_name_or_path` = the base folder), tokenizer/ (with the chat template), or
model/ for full models (here: a classifier and a reward model built from the tiny base's config).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ftray.runs import RunFolder
from tests._specs import ROOT

__all__ = ["engine_inputs", "expected_outputs", "make_adapter_run", "make_full_run", "make_scorer_run", "peft_greedy", "run_model"]


def _run_json(run: Path, base: Path, kind: str, adapter: str, spec: dict | None = None) -> None:
    """run.json in the trainer's schema (the fields serving reads: status, spec.method, spec.adapter; `spec`: a
    whole job spec, which a scorer run needs: serving loads it as its method builds it), written through the
    run-folder contract."""
    for sub in ("adapter", "model", "tokenizer"):  # storage.publish_dir's commit markers
        if (run / sub).is_dir():
            (run / sub / ".complete").write_text("ok\n")
    rec = {
        "status": "completed",
        "name": run.name,
        "spec": spec or {"method": {"kind": kind}, "adapter": {"kind": adapter}},
        "base_model": str(base),
        "parent_run": None,
        "outputs": sorted(p.name for p in run.iterdir()),
    }
    RunFolder(str(run)).write_record(rec)


def make_adapter_run(base: Path, run: Path, seed: int, r: int = 4, kind: str = "sft",
                     targets: tuple[str, ...] = ("q_proj", "v_proj"), alpha: int | None = None, **lora) -> Path:
    """A LoRA run (of method `kind`) whose random (non-zero) adapter makes the model answer unlike the base.
    `alpha` defaults to 4 * r; `lora`: more LoraConfig fields (use_rslora, lora_bias, ...)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=r, lora_alpha=alpha or 4 * r, target_modules=list(targets), init_lora_weights=False, **lora)
    peft = get_peft_model(model, cfg)
    with torch.no_grad():  # init_lora_weights=False is small on a nano model: make adapters clearly differ
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.mul_(4.0)
    peft.peft_config["default"].base_model_name_or_path = str(base)
    run.mkdir(parents=True, exist_ok=True)
    peft.save_pretrained(run / "adapter", safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "tokenizer")
    _run_json(run, base, kind, "lora")
    return run


def make_full_run(base: Path, run: Path, kind: str) -> Path:
    """A full fine-tune of method `kind`: the base's weights as the run's model/."""
    import shutil

    shutil.copytree(base, run / "model")
    shutil.copytree(base, run / "tokenizer", ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    _run_json(run, base, kind, "full")
    return run


def make_scorer_run(base: Path, run: Path, labels: list[str], seed: int = 0) -> Path:
    """A sequence classifier on the tiny base's config: labels=[x] makes a 1-label reward model."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    cfg = AutoConfig.from_pretrained(base)
    cfg.num_labels = len(labels)
    cfg.id2label = dict(enumerate(labels))
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    tok = AutoTokenizer.from_pretrained(base)
    cfg.pad_token_id = tok.pad_token_id
    model = AutoModelForSequenceClassification.from_config(cfg)
    (run / "model").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(run / "model", safe_serialization=True)
    tok.save_pretrained(run / "model")
    tok.save_pretrained(run / "tokenizer")
    kind = "reward" if len(labels) == 1 else "classify"
    spec = {"name": run.name, "model": {"path": str(base)},
            "data": {"train": str(run / "train.jsonl"), "format": "preference" if kind == "reward" else "labels"},
            "method": {"kind": kind} if kind == "reward" else {"kind": kind, "labels": labels},
            "adapter": {"kind": "full"}, "train": {"max_steps": 1, "global_batch_size": 1, "micro_batch_size": 1},
            "scaling": {"num_workers": 1},
            "output": {"dir": str(run)}}
    _run_json(run, base, kind, "full", spec)
    return run


def serve_config(base: Path, runs: Path, keys: Path) -> dict:
    """deploy/adapters.yaml's args, pointed at the test's folders and with tight limits."""
    doc = yaml.safe_load((ROOT / "deploy" / "adapters.yaml").read_text())
    args = doc["applications"][0]["args"]
    g = args["generation"][0]
    g.update(base=str(base), adapters={"sft-a": str(runs / "sft-a"), "sft-b": str(runs / "sft-b")}, registry=[str(runs / "registry")])
    g["deployment"].update(max_batch_size=8, batch_wait_timeout_s=0.05, max_ongoing_requests=8, max_queued_requests=8)
    args["scorers"] = [
        {"name": "emb", "path": str(base), "kind": "embedding"},
        {"name": "cls", "path": str(runs / "cls"), "kind": "classifier"},
        {"name": "rm", "path": str(runs / "rm"), "kind": "reward"},
    ]
    for s in args["scorers"]:
        s["deployment"] = {"num_cpus": 0.25, "max_batch_size": 8, "max_ongoing_requests": 16}
    g["deployment"]["num_cpus"] = 1
    args["limits"].update(max_prompt_tokens=64, max_tokens=64, max_body_bytes=4096, request_timeout_s=60)
    args["auth"] = {"api_keys_env": None, "api_keys_file": str(keys)}
    args["ingress"] = {"num_cpus": 0.25, "max_ongoing_requests": 256, "max_queued_requests": 256, "max_batch_size": 1}
    return args


def run_model(run: Path):
    """The run's own model as `ftray eval` loads it: the method's base (head, labels) + the adapter, not merged."""
    from ftray.methods import load_run_model
    from ftray.models.load import resolve

    return load_run_model(RunFolder(str(run)).spec(), resolve(str(run))).eval()


def engine_inputs(engine, items) -> dict:
    """The scorer engine's own rendering and tokenization of `items`, as the run's model takes them."""
    enc = engine.tokenizer([engine.text(t) for t in items], padding=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask")}


def expected_outputs(run: Path, kind: str, items) -> list:
    """What serving must return for `items` from a scorer run of `kind`: each label's probability (classifier),
    scores (reward), mean-pooled L2-normalised embeddings (embedding), computed by the run's own model."""
    import torch

    from ftray.serve.config import ScorerModel
    from ftray.serve.engine import ScorerEngine

    engine = ScorerEngine(ScorerModel(name="x", path=str(run), kind=kind))  # only for its tokenization
    enc = engine_inputs(engine, items)
    own = run_model(run)
    with torch.no_grad():
        out = own(**enc)
    if kind == "classifier":  # {label name: probability} per item
        names = [own.config.id2label[i] for i in range(out.logits.shape[-1])]
        return [dict(zip(names, p, strict=True)) for p in out.logits.softmax(-1).tolist()]
    if kind == "reward":
        return out.logits[:, 0].tolist()
    m = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((out.last_hidden_state * m).sum(1) / m.sum(1), dim=-1).tolist()


def peft_greedy(base: Path, adapter: Path, ids: list[int], n: int, suppress: tuple[int, ...] = ()) -> list[int]:
    """Greedy tokens of `base` + `adapter` with peft alone (up to EOS): what a served adapter must answer.
    `suppress`: tokens never chosen (a request's `logit_bias` of -100 on them)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    with torch.no_grad():
        ref = peft.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                            suppress_tokens=list(suppress) or None)[0, len(ids) :].tolist()
    eos = AutoTokenizer.from_pretrained(base).eos_token_id
    return ref[: ref.index(eos)] if eos in ref else ref
