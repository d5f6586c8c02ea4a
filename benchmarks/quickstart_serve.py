"""The quickstart's adapter, served: `make quickstart` trains SmolLM2-135M-Instruct's LoRA adapter on
two-digit additions; this serves the run folder as `ftray serve runs/quickstart` does (its base and the
adapter in one replica, behind the OpenAI-compatible API) and asks the real `openai` client for each of
the 100 held-out sums, once from the untouched base (model `smollm2`) and once from the adapter (model
`smollm2:quickstart`), greedy, 5 new tokens. Served exact match beside the run's own before/after figures
(run.json): the adapter behaves as it did in training, and the base as it did before.

    make quickstart && python benchmarks/quickstart_serve.py

Writes benchmarks/results/quickstart_serve.md (commit, date, command, both figures, sample answers).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUN, BASE, TEST = ROOT / "runs" / "quickstart", ROOT / "runs" / "smollm2", ROOT / "runs" / "data-add99" / "arith_test.jsonl"


def main() -> None:
    import ray
    from openai import OpenAI
    from ray import serve

    from benchmarks._cli import stamp
    from ftray.serve import build_app, config_from_runs
    from tests._specs import free_port

    if not (RUN / "run.json").exists():
        sys.exit(f"{RUN}: no finished run; `make quickstart` trains it")
    record = json.loads((RUN / "run.json").read_text())
    rows = [json.loads(x) for x in TEST.read_text().splitlines() if x.strip()]
    t0, load0 = time.time(), os.getloadavg()
    cfg = config_from_runs([str(RUN)])
    cfg["auth"] = {"api_keys_env": None, "allow_no_keys": True}
    (gen,) = cfg["generation"]
    gen["deployment"] = {"num_cpus": 1, "max_batch_size": 16}
    ray.init(num_cpus=4, include_dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="quickstart", route_prefix="/")
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    models = sorted(m.id for m in client.models.list().data)
    results = {}
    for model in (gen["name"], f"{gen['name']}:quickstart"):
        answers = []
        for r in rows:
            out = client.completions.create(model=model, prompt=r["prompt"], max_tokens=5, temperature=0)
            answers.append(out.choices[0].text)
        exact = sum(a.strip() == r["completion"] for a, r in zip(answers, rows, strict=True)) / len(rows)
        results[model] = (exact, answers)
    serve.shutdown()
    ray.shutdown()

    before, after = record["eval"]["before"]["exact_match"], record["eval"]["after"]["exact_match"]
    base_m, tuned_m = gen["name"], f"{gen['name']}:quickstart"
    lines = [
        "# The quickstart's adapter, served",
        "",
        f"Written by {stamp(t0, load0)}.",
        "",
        f"`runs/quickstart` (SmolLM2-135M-Instruct + LoRA, `jobs/quickstart.yaml`, {record['train']['steps']} steps) served as "
        f"`ftray serve runs/quickstart` serves it: models {', '.join(f'`{m}`' for m in models)} from one replica. "
        f"The real `openai` client asks `/v1/completions` for each of the {len(rows)} held-out sums (`a+b=`, greedy, "
        "5 new tokens); exact match = the answer, stripped, is the sum.",
        "",
        "| model | exact match served | the run's own evaluation (run.json) |",
        "|---|---|---|",
        f"| `{base_m}` (untouched base) | {results[base_m][0]:.2f} | before training: {before:.2f} |",
        f"| `{tuned_m}` (the adapter) | {results[tuned_m][0]:.2f} | after training: {after:.2f} |",
        "",
        "First five held-out prompts:",
        "",
        "| prompt | sum | base answers | adapter answers |",
        "|---|---|---|---|",
    ]
    for i, r in enumerate(rows[:5]):
        lines.append(f"| `{r['prompt']}` | {r['completion']} | `{results[base_m][1][i]!r}` | `{results[tuned_m][1][i]!r}` |")
    out = ROOT / "benchmarks" / "results" / "quickstart_serve.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
