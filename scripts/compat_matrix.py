"""Render docs/compatibility.md: the adapter x method x ZeRO-stage matrix as ftray's spec validation
decides it (`ftray.config.adapter_refusal`), each allowed cell linked to the test that runs it.

The proofs are read from the tests themselves: `tests/test_adapters.py`'s parametrizations (`KINDS`: one
process per adapter kind, no DeepSpeed; `DS_CASES`: the training loop and DeepSpeed on one process;
`RAY_CASES`: 2 Ray workers under DeepSpeed) plus the few other tests named in `OTHER_PROOFS` (checked to
exist). `tests/test_adapters.py::test_compatibility_doc_is_current` fails when
the committed file differs from this output.

Usage: python scripts/compat_matrix.py [--print]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftray.config import METHOD_KINDS, PROMPT_FAMILY, adapter_refusal  # noqa: E402
from tests.test_adapters import DS_CASES, ENCODER_KINDS, KINDS, RAY_CASES  # noqa: E402

ADAPTERS = ("full", "freeze", "lora", "qlora", "adalora", "ia3", "prefix", "prompt", "p_tuning", "llama_adapter")
STAGES = (0, 1, 2, 3)
# Older tests that run a cell under Ray: (adapter, method, ZeRO stage) -> pytest node id.
OTHER_PROOFS = {
    ("lora", "sft", 2): "tests/test_train.py::test_loss_curves_equal_across_zero_stages",
    ("lora", "sft", 3): "tests/test_train.py::test_zero3_adapter_is_complete_and_reloads_in_fresh_process",
    ("lora", "classify", 3): "tests/test_methods_classify.py::test_two_workers_zero3_lora",
}
# Other tests that run a cell through the loop and DeepSpeed on one process.
OTHER_ONE_RANK = {
    ("freeze", "classify", 2): "tests/test_methods_classify.py::test_in_process_zero2_freeze_last_block",
    ("full", "sft", 2): "tests/test_train.py::test_sft_on_gpteacher_code_eval_loss_falls",
    ("lora", "sft", 0): "tests/test_train.py::test_loss_curves_equal_across_zero_stages",
}


def _check_exists(node: str) -> str:
    path, name = node.split("::")
    func = name.split("[")[0]
    if not re.search(rf"^def {func}\(", (ROOT / path).read_text(), re.M):
        raise SystemExit(f"{node}: no such test (update OTHER_PROOFS)")
    return node


def _spec(adapter: str, method: str, zero: int) -> SimpleNamespace:
    """What adapter_refusal reads of a job spec (prompt-family cells are shown with packing off, which
    they need; qlora cells on a GPU, which it needs)."""
    return SimpleNamespace(
        adapter=SimpleNamespace(kind=adapter), method=SimpleNamespace(kind=method),
        deepspeed=SimpleNamespace(zero_stage=zero), scaling=SimpleNamespace(use_gpu=adapter == "qlora"),
        data=SimpleNamespace(packing=adapter not in PROMPT_FAMILY), output=SimpleNamespace(merge=False),
    )


def proofs() -> tuple[dict, dict, dict]:
    """(adapter, method, stage) -> Ray test node; the same -> one-rank DeepSpeed test node; (adapter,
    method) -> one-process test node (no DeepSpeed)."""
    ray = {k: _check_exists(v) for k, v in OTHER_PROOFS.items()}
    for case_id, (kind_name, method, zero) in RAY_CASES.items():
        kind = KINDS[kind_name][0]["kind"]
        ray[(kind, method, zero)] = f"tests/test_adapters.py::test_two_workers[{case_id}]"
    one_rank = {k: _check_exists(v) for k, v in OTHER_ONE_RANK.items()}
    for case_id, (kind_name, method, zero) in DS_CASES.items():
        kind = KINDS[kind_name][0]["kind"]
        one_rank.setdefault((kind, method, zero), f"tests/test_adapters.py::test_deepspeed_one_process_and_exact_resume[{case_id}]")
    unit: dict[tuple[str, str], str] = {}
    for name, (adapter, _) in KINDS.items():
        unit.setdefault((adapter["kind"], "sft"),
                        f"tests/test_adapters.py::test_adapter_trains_only_its_own_params_saves_and_reloads[{name}]")
    for name, adapter in ENCODER_KINDS.items():
        unit[(adapter["kind"], "classify")] = f"tests/test_adapters.py::test_classify_adapter_trains_saves_and_reloads[{name}]"
    return ray, one_rank, unit


def render() -> str:
    ray, one_rank, unit = proofs()
    reasons: list[str] = []
    refs: dict[str, str] = {}  # test node -> reference label

    def ref(node: str) -> str:
        refs.setdefault(node, f"t{len(refs) + 1}")
        return refs[node]

    def cell(adapter: str, method: str, zero: int) -> str:
        why = adapter_refusal(_spec(adapter, method, zero))
        if why:
            why = re.sub(r"; got `\w+`$", "", why)  # one reason per adapter, not per method
            if why not in reasons:
                reasons.append(why)
            return f"❌ {reasons.index(why) + 1}"
        if (adapter, method, zero) in ray:
            return f"✅ [ray][{ref(ray[(adapter, method, zero)])}]"
        if (adapter, method, zero) in one_rank:
            return f"☑️ [1 rank][{ref(one_rank[(adapter, method, zero)])}]"
        test_file = ROOT / "tests" / f"test_methods_{method}.py"
        if adapter in ("full", "freeze", "lora") and test_file.exists() and f'"kind": "{adapter}"' in test_file.read_text():
            return f"🔸 [method][{ref(f'tests/test_methods_{method}.py')}]"
        if (adapter, method) in unit:
            return f"🔹 [1 proc][{ref(unit[(adapter, method)])}]"
        if (adapter, "sft") in unit:
            return f"🔹 [1 proc, sft][{ref(unit[(adapter, 'sft')])}]"
        return "⚪"

    out = [
        "# Adapter compatibility",
        "",
        "<!-- Generated by scripts/compat_matrix.py from ftray.config.adapter_refusal and the tests' "
        "parametrizations; do not edit. -->",
        "",
        "Which adapter (`adapter.kind`) ftray runs with which method (`method.kind`) and ZeRO stage "
        "(`deepspeed.zero_stage`). A refused cell fails when the spec is validated (`ftray validate`, "
        "before any Ray resource), in one line naming the field and the reason below. Every adapter is "
        "peft's own (`ftray/models/adapters.py` maps the spec onto its config).",
        "",
        "- ✅ a test runs this cell on 2 Ray Train workers under DeepSpeed",
        "- ☑️ a test runs this cell through the training loop and DeepSpeed on one process (world size 1: "
        "ZeRO's code paths, checkpoints and exact resume, saving; no second rank)",
        "- 🔸 allowed; the method's own tests use this adapter kind (at the stages they pin)",
        "- 🔹 allowed; the adapter kind is tested on one process, without DeepSpeed (trains only its own "
        "parameters, saves, reloads in peft with the same logits) with this method, or with `sft` where the "
        "link says so; no test runs it under this ZeRO stage",
        "- ⚪ allowed, no test runs it (`qlora`: needs a GPU and bitsandbytes, none in CI)",
        "- ❌ n: refused, reason n below",
        "",
        "## Adapter x ZeRO stage (method `sft`)",
        "",
        "| adapter | " + " | ".join(f"ZeRO-{z}" for z in STAGES) + " |",
        "|---|" + "---|" * len(STAGES),
    ]
    for a in ADAPTERS:
        out.append(f"| `{a}` | " + " | ".join(cell(a, "sft", z) for z in STAGES) + " |")
    for z in (2, 3):
        out += ["", f"## Adapter x method (ZeRO-{z})", "",
                "| adapter | " + " | ".join(f"`{m}`" for m in METHOD_KINDS) + " |",
                "|---|" + "---|" * len(METHOD_KINDS)]
        for a in ADAPTERS:
            out.append(f"| `{a}` | " + " | ".join(cell(a, m, z) for m in METHOD_KINDS) + " |")
    out += ["", "## Reasons", ""]
    out += [f"{i}. {r}" for i, r in enumerate(reasons, 1)]
    out += [
        "",
        "Also refused: `qlora` on CPU (`scaling.use_gpu: false`: bitsandbytes' 4-bit kernels need a GPU); "
        "prompt-family adapters with `data.packing: true` (shown above with packing off); "
        "`output.merge: true` with a prompt-family adapter or `llama_adapter` (nothing to merge; "
        "`ftray export RUN --merge` says the same); `llama_adapter` on a model type peft's adaption prompt "
        "does not support (checked on the model's config before Ray).",
        "",
        "## Tests",
        "",
    ]
    out += [f"- {label}: `{node}`" for node, label in refs.items()]
    out.append("")
    out += [f"[{label}]: ../{node.split('::')[0]}" for node, label in refs.items()]
    out.append("")
    return "\n".join(out)


def main() -> int:
    text = render()
    if "--print" in sys.argv:
        sys.stdout.write(text)
        return 0
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "compatibility.md").write_text(text)
    print(f"wrote {ROOT / 'docs' / 'compatibility.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
