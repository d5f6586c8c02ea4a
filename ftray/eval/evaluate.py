"""`ftray eval RUN --data FILE`: a run folder (or an untouched base model) judged on any file by its
method's own metric, in one process, without Ray. The same method code the training loop runs."""

from __future__ import annotations

from ftray import storage

__all__ = ["evaluate"]


def _spec_for(run: str, data: str, method: str | None, fmt: str | None, max_length: int | None = None,
              method_options: dict | None = None):
    from ftray.config import SpecError, resolve_paths, spec_from_dict
    from ftray.methods import REGISTRY, run_spec
    from ftray.runs import RunFolder

    spec = run_spec(RunFolder(run))
    if spec is not None:
        if method_options:  # fields that replace the run's own, e.g. a generation budget other than its job's
            fields = {**spec.method.model_dump(mode="json"), **method_options}
            spec = spec_from_dict({**spec.model_dump(mode="json"), "method": fields}, f"{run}: method options")
        if method and method != spec.method.kind:
            raise SpecError(f"--method {method}: {run} is a `{spec.method.kind}` run")
        if fmt and fmt != spec.data.format:
            spec = spec.model_copy(update={"data": spec.data.model_copy(update={"format": fmt})})
        if max_length:
            spec = spec.model_copy(update={"data": spec.data.model_copy(update={"max_length": max_length})})
        # What an evaluation writes (e.g. cluster's clusters.json) goes beside the run's own files, not over them.
        return spec.model_copy(update={"output": spec.output.model_copy(update={"dir": storage.join(run, ".ftray-eval")})})
    if not method:
        raise SpecError(f"{run}: not a run folder (no run.json); name the method to judge a base model with: --method")
    if method not in REGISTRY:
        raise SpecError(f"--method {method}: unknown; one of {', '.join(sorted(REGISTRY))}")
    d = {
        "model": {"path": run},
        # A base model has no training file: `data` stands in for it (e.g. classify's label names).
        "data": {"train": data, "format": fmt or REGISTRY[method].formats[0], **({"max_length": max_length} if max_length else {})},
        "method": {"kind": method, **(method_options or {})},  # e.g. a generation length: validated with the spec
        "adapter": {"kind": "full"},
        "train": {"max_steps": 1, "global_batch_size": 1, "micro_batch_size": 1},
        "scaling": {"num_workers": 1},
        "output": {"dir": storage.join(run, ".ftray-eval")},
    }
    return resolve_paths(spec_from_dict(d, "ftray eval"))


def evaluate(run: str, data: str, method: str | None = None, fmt: str | None = None, max_rows: int | None = None,
             max_length: int | None = None, method_options: dict | None = None) -> dict:
    """`max_length`: tokens per sequence, as `data.max_length` (default: the run's own; 512 for a base model), so
    that a base model is judged on the same cut as a run trained with another one. `method_options`: a base
    model's `method` fields beyond its kind (e.g. `{"max_new_tokens": 16}`), so it is judged as a run's job was;
    for a run, fields that replace its job's (validated alike), so it is judged as another run or the base was."""
    import torch

    from ftray.data.encode import ensure_chat_template
    from ftray.data.rows import read_checked
    from ftray.methods import EvalContext, get_method, load_run_model
    from ftray.models.load import load_tokenizer, resolve
    from ftray.progress import bar
    from ftray.train.held_out import evaluate_held_out

    spec = _spec_for(run, data, method, fmt, max_length, method_options)
    m = get_method(spec.method.kind)
    resolved = resolve(run, None, "RUN")
    rows = read_checked(data, spec.data.format, spec.data.on_bad_rows, limit=max_rows, columns=spec.data.columns).rows
    tok = load_tokenizer(resolved.tokenizer, spec.model.trust_remote_code)
    ensure_chat_template(tok)
    model = load_run_model(spec, resolved, torch.float32, method=m).eval()
    torch.manual_seed(0)

    # A method whose row scores carry the loss (dpo, reward) needs no examples: `score_rows` tokenizes its rows.
    examples = [] if m.scores_carry_loss else [
        e for r in bar(rows, "tokenize", unit="row") for e in m.examples(r, tok, spec) if len(e["input_ids"])]
    for e in examples:
        e.setdefault("position_ids", None)
    # The training loop's held-out evaluation, on one process.
    metrics = evaluate_held_out(m, model, examples, rows, tok, spec, EvalContext(), micro_batch=16)
    return {"run": run, "data": data, "method": spec.method.kind, "rows": len(rows), **metrics}
