"""`ftray eval` of a base model or a run folder: the spec it is judged with (no model is run here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftray.config import GRPOMethod, SpecError
from ftray.eval.evaluate import _spec_for

ROOT = Path(__file__).resolve().parents[1]


def test_a_base_model_is_judged_with_the_method_fields_it_is_given(tiny_model, arith):
    default = _spec_for(str(tiny_model), str(arith[1]), "grpo", None)
    assert default.method.max_new_tokens == GRPOMethod().max_new_tokens
    wanted = GRPOMethod().max_new_tokens + 7  # e.g. the generation length of the job its runs are compared with
    spec = _spec_for(str(tiny_model), str(arith[1]), "grpo", None, method_options={"max_new_tokens": wanted})
    assert spec.method.kind == "grpo" and spec.method.max_new_tokens == wanted
    with pytest.raises(SpecError, match="max_new_tokenz"):  # validated as a job's `method` is: one line naming it
        _spec_for(str(tiny_model), str(arith[1]), "grpo", None, method_options={"max_new_tokenz": 3})


def test_a_run_is_judged_with_its_own_method_fields_or_the_ones_it_is_given(tiny_model, arith, tmp_path):
    import json

    from ftray.config import load_spec

    job = load_spec(ROOT / "jobs" / "grpo_arith.yaml", [f"model.path={tiny_model}", f"data.train={arith[0]}",
                                                         f"output.dir={tmp_path}", "method.max_new_tokens=4"])
    (tmp_path / "run.json").write_text(json.dumps({"spec": job.model_dump(mode="json")}))
    own = _spec_for(str(tmp_path), str(arith[1]), None, None)
    assert own.method.kind == "grpo" and own.method.max_new_tokens == 4 and own.method.rewards == job.method.rewards
    spec = _spec_for(str(tmp_path), str(arith[1]), None, None, method_options={"max_new_tokens": 16})
    assert spec.method.max_new_tokens == 16  # e.g. judged at the budget the untouched model was judged at
    assert spec.method.model_dump(exclude={"max_new_tokens"}) == own.method.model_dump(exclude={"max_new_tokens"})
    assert spec.adapter == own.adapter and spec.output.dir == own.output.dir  # its evaluation writes beside the run
    with pytest.raises(SpecError, match="max_new_tokenz"):
        _spec_for(str(tmp_path), str(arith[1]), None, None, method_options={"max_new_tokenz": 3})
