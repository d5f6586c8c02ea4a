"""`ftray runs [DIR]`: the run folders under DIR as a table (or JSON) — name, method, adapter, status, the
headline metric before → after, parent run, when, base; `ftray runs show RUN`: the lineage chain down to the
base model. Runs made in process (no Ray): a LoRA sft run, a run continued from it, an unfinished one."""

from __future__ import annotations

import json
import shutil

import pytest

from ftray.cli import main
from tests._specs import job_dict, run_here


@pytest.fixture(scope="module")
def run_tree(tmp_path_factory, tiny_model, arith, cache_dir):
    root = tmp_path_factory.mktemp("runs-cli")
    parent = root / "sft-a"
    run_here(job_dict(tiny_model, arith[0], arith[1], parent, cache_dir, train__max_steps=2, scaling__num_workers=1,
                      method__exact_match=False))
    child = root / "sft-b"
    d = job_dict(parent, arith[0], arith[1], child, cache_dir, train__max_steps=2, scaling__num_workers=1,
                 method__exact_match=False)
    d["adapter"] = {"kind": "lora"}  # the parent's adapter config is reused
    run_here(d)
    # A run that stopped before its end: checkpoints, no run.json.
    (root / "stopped" / "checkpoints").mkdir(parents=True)
    shutil.copytree(parent / "tokenizer", root / "stopped" / "tokenizer")
    return root, parent, child


def test_runs_table_and_json(run_tree, tiny_model, capsys):
    root, parent, child = run_tree
    assert main(["runs", str(root), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"sft-a", "sft-b", "stopped"}
    a, b = rows["sft-a"], rows["sft-b"]
    assert (a["method"], a["adapter"], a["status"], a["base"], a["parent"]) == ("sft", "lora", "completed", str(tiny_model), None)
    assert b["parent"] == str(parent) and b["base"] == str(tiny_model)
    record = json.loads((child / "run.json").read_text())
    assert b["metric"] == "eval_loss" and b["after"] == record["eval"]["after"]["eval_loss"]
    assert b["before"] == record["eval"]["before"]["eval_loss"] and a["when"]
    assert rows["stopped"]["status"] == "unfinished" and rows["stopped"]["method"] is None

    assert main(["runs", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "method", "adapter", "status", "metric", "parent", "when", "base"]
    row_b = next(line for line in lines if line.startswith("sft-b"))
    assert "sft  " in row_b and " completed " in row_b and " sft-a " in row_b
    assert f"eval_loss {record['eval']['before']['eval_loss']:.4g} -> {record['eval']['after']['eval_loss']:.4g}" in row_b


def test_runs_show_gives_the_lineage(run_tree, tiny_model, capsys):
    root, parent, child = run_tree
    assert main(["runs", "show", str(child), "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert [c["run"] for c in chain] == [str(child), str(parent)]
    assert main(["runs", "show", str(child)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("sft-b  sft + lora  completed") and out[1].lstrip().startswith("<- sft-a")
    assert out[-1].strip() == f"<- base {tiny_model}"
    assert main(["runs", "show", str(root / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a run folder" in err
