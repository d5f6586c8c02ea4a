"""`ftray eval` of a base model: the spec it is judged with (no model is run here)."""

from __future__ import annotations

import pytest

from ftray.config import GRPOMethod, SpecError
from ftray.eval.evaluate import _spec_for


def test_a_base_model_is_judged_with_the_method_fields_it_is_given(tiny_model, arith):
    default = _spec_for(str(tiny_model), str(arith[1]), "grpo", None)
    assert default.method.max_new_tokens == GRPOMethod().max_new_tokens
    wanted = GRPOMethod().max_new_tokens + 7  # e.g. the generation length of the job its runs are compared with
    spec = _spec_for(str(tiny_model), str(arith[1]), "grpo", None, method_options={"max_new_tokens": wanted})
    assert spec.method.kind == "grpo" and spec.method.max_new_tokens == wanted
    with pytest.raises(SpecError, match="max_new_tokenz"):  # validated as a job's `method` is: one line naming it
        _spec_for(str(tiny_model), str(arith[1]), "grpo", None, method_options={"max_new_tokenz": 3})
