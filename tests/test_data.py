"""Rows, formats, loss masks and packing: pure functions, no Ray."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ftray.data.encode import IGNORE, encode_row, ensure_chat_template, pack_examples
from ftray.data.rows import DataError, check_row, read_checked


@pytest.fixture(scope="module")
def tok(tiny_model):
    from ftray.models.load import load_tokenizer

    t = load_tokenizer(str(tiny_model))
    ensure_chat_template(t)
    return t


def jsonl(tmp_path, lines: list[str], name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: no such data file"):
        read_checked(str(tmp_path / "nope.jsonl"), "instruction")


def test_empty_file(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("")
    with pytest.raises(DataError, match=r"e.jsonl: no usable rows \(empty file\)"):
        read_checked(str(p), "instruction")


def test_bad_json_line_named(tmp_path):
    p = jsonl(tmp_path, ['{"instruction": "a", "output": "b"}', "{not json", '{"instruction": "c", "output": "d"}'])
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        read_checked(p, "instruction")


def test_missing_output_named(tmp_path):
    p = jsonl(tmp_path, ['{"instruction": "a", "output": "b"}', "", '{"instruction": "c"}'])
    with pytest.raises(DataError, match=r"d.jsonl:3: missing `output`"):
        read_checked(p, "instruction")


def test_skip_bad_rows_counts(tmp_path):
    p = jsonl(tmp_path, ['{"instruction": "a", "output": "b"}', "{x", '{"instruction": "c"}', '[1]'])
    c = read_checked(p, "instruction", on_bad_rows="skip")
    assert len(c.rows) == 1 and c.skipped == 3
    assert c.first_skipped[0].endswith("d.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)")


def test_chat_row_checks():
    with pytest.raises(Exception, match=r"`messages\[1\].role` is 'bot'"):
        check_row({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}, "chat")
    with pytest.raises(Exception, match="no assistant turn"):
        check_row({"messages": [{"role": "user", "content": "hi"}]}, "chat")


def test_csv_and_parquet_and_txt(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.csv").write_text("prompt,completion\n1+1=,2\n2+2=,4\n")
    assert len(read_checked(str(tmp_path / "a.csv"), "prompt_completion").rows) == 2
    pq.write_table(pa.table({"prompt": ["a"], "completion": ["b"]}), tmp_path / "a.parquet")
    assert read_checked(str(tmp_path / "a.parquet"), "prompt_completion").rows == [{"prompt": "a", "completion": "b"}]
    (tmp_path / "a.txt").write_text("doc one\nline two\n\n\ndoc two\n")
    assert [r["text"] for r in read_checked(str(tmp_path / "a.txt"), "text").rows] == ["doc one\nline two", "doc two"]


def test_prompt_completion_loss_only_on_answer(tok):
    [ex] = encode_row(tok, {"prompt": "12+7=", "completion": "19"}, 64)
    learned = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE]
    assert tok.decode(learned) == "19" + tok.eos_token
    assert ex["labels"][: len(ex["labels"]) - 3] == [IGNORE] * (len(ex["labels"]) - 3)


def test_chat_loss_on_every_assistant_turn(tok):
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "second"},
    ]
    [ex] = encode_row(tok, {"messages": msgs}, 256)
    learned = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE])
    assert learned == f"first{tok.eos_token}\nsecond{tok.eos_token}\n"
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ex["input_ids"]) == full


def test_truncation_is_reported_and_answerless_dropped(tok):
    [ex] = encode_row(tok, {"prompt": "1" * 10, "completion": "2" * 10}, 15)
    assert ex["truncated"] and len(ex["input_ids"]) == 15
    [gone] = encode_row(tok, {"prompt": "1" * 30, "completion": "2"}, 15)
    assert gone["input_ids"] == [] and gone["truncated"]


def test_text_is_split_not_truncated(tok):
    exs = encode_row(tok, {"text": "1 2 3 4 5 6 7 8 9 " * 5}, 16)
    assert len(exs) > 1 and all(len(e["input_ids"]) <= 16 for e in exs)
    assert sum(len(e["input_ids"]) for e in exs) == len(tok("1 2 3 4 5 6 7 8 9 " * 5)["input_ids"]) + 2


def test_packing_restarts_positions_and_masks_boundaries():
    exs = [
        {"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]},
        {"input_ids": [4, 5], "labels": [4, 5]},
        {"input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]},
    ]
    packed = pack_examples(exs, 8, pad_id=0)
    assert all(len(p["input_ids"]) == 8 for p in packed)
    assert sum(p["tokens"] for p in packed) == 9
    for p in packed:
        starts = [i for i, x in enumerate(p["position_ids"]) if x == 0]
        assert all(p["labels"][i] == IGNORE for i in starts)
    flat = sorted(t for p in packed for t, pos in zip(p["input_ids"], p["position_ids"], strict=True) if t)
    assert flat == list(range(1, 10))


def test_json_array_file(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"instruction": "x", "output": "y"}, {"instruction": "z"}]))
    with pytest.raises(DataError, match=r"a.json:2: missing `output`"):
        read_checked(str(p), "instruction")


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """U+2028 / U+0085 inside a JSON string are not line ends (GSM8K's train split has them)."""
    from ftray.data.rows import read_checked

    p = tmp_path / "u.jsonl"
    p.write_text('{"prompt": "a\u2028b", "completion": "c\u0085d"}\n{"prompt": "e", "completion": "f"}\n', encoding="utf-8")
    rows = read_checked(str(p), "prompt_completion").rows
    assert [r["prompt"] for r in rows] == ["a\u2028b", "e"] and rows[0]["completion"] == "c\u0085d"


def test_arithmetic_preferences_follow_the_task_split(tmp_path):
    from ftray.data.synthetic import write_arithmetic, write_arithmetic_preferences

    tr, te = write_arithmetic(tmp_path)
    ptr, pte = write_arithmetic_preferences(tmp_path)
    for src, prefs in ((tr, ptr), (te, pte)):
        answers = {r["prompt"]: r["completion"] for r in map(json.loads, src.read_text().split("\n")[:-1])}
        rows = [json.loads(x) for x in prefs.read_text().split("\n")[:-1]]
        assert len(rows) == 3 * len(answers) and {r["prompt"] for r in rows} == set(answers)
        assert all(r["chosen"] == answers[r["prompt"]] != r["rejected"] for r in rows)


def test_arithmetic_as_chat_questions_of_two_digit_sums(tmp_path, capsys):
    """`--min-operand 10 --max-operand 99 --question ...`: chat rows an instruct model reads through its template,
    every operand two digits, the reply the sum; train and test share no question; a bad question or range is one
    line naming the option, and nothing is written."""
    from ftray.cli import main
    from ftray.data.rows import read_checked

    q = "What is {a} + {b}? Answer with the number only."
    assert main(["data", "arithmetic", str(tmp_path / "a"), "--min-operand", "10", "--max-operand", "99",
                 "--test-size", "200", "--question", q]) == 0
    split = {}
    for name in ("train", "test"):
        rows = read_checked(str(tmp_path / "a" / f"arith_{name}.jsonl"), "chat").rows
        for r in rows:
            user, reply = r["messages"]
            a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\? Answer with the number only\.", user["content"]).groups())
            assert 10 <= a <= 99 and 10 <= b <= 99 and reply == {"role": "assistant", "content": str(a + b)}
        split[name] = {r["messages"][0]["content"] for r in rows}
    assert len(split["test"]) == 200 and len(split["train"]) == 90 * 90 - 200 and not split["train"] & split["test"]
    capsys.readouterr()
    for bad, word in ((["--question", "What is {a}?"], "question"), (["--min-operand", "50", "--max-operand", "9"], "min_operand"),
                      (["--max-operand", "3", "--test-size", "16"], "test_size")):
        assert main(["data", "arithmetic", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and word in err, err
    assert not (tmp_path / "bad").exists()


@pytest.mark.integration
def test_ray_data_and_the_driver_write_the_same_shards(tiny_model, arith, tmp_path, ray_local):
    """`data.prepare_with`: a Ray Data job and the driver tokenize and pack into the same shards and counts."""
    from ftray.config import resolve_paths, spec_from_dict
    from ftray.data.prepare import load_split
    from ftray.methods import get_method
    from ftray.train.launch import check_job, prepare_data
    from tests._specs import job_dict

    got = {}
    for how in ("ray_data", "driver"):
        d = job_dict(tiny_model, arith[0], arith[1], tmp_path / how, tmp_path / f"cache-{how}", data__prepare_with=how)
        plan = check_job(resolve_paths(spec_from_dict(d)))
        prepared, meta, _ = prepare_data(plan, get_method("sft"))
        assert not meta["cached"] and (tmp_path / f"cache-{how}") in Path(prepared).parents
        got[how] = ({s: load_split(prepared, s) for s in ("train", "eval")}, {s: meta[s] for s in ("train", "eval")})
    assert got["ray_data"][0]["train"]["position_ids"] is not None  # packed
    assert got["ray_data"] == got["driver"]


def test_columns_template_fills_from_the_row(tmp_path):
    p = jsonl(tmp_path, ['{"source": "a cat", "target": "un chat", "x": 1}', '{"target": "deux"}'])
    cols = {"instruction": "Translate into French:\n{source}", "output": "target"}
    rows = read_checked(p, "instruction", on_bad_rows="skip", columns=cols)
    assert rows.rows == [{"messages": [{"role": "user", "content": "Translate into French:\na cat"},
                                       {"role": "assistant", "content": "un chat"}]}]
    assert rows.first_skipped == [f"{p}:2: missing column 'source' named in `data.columns`"]


def test_shipped_smollm2_jobs_read_their_rows(monkeypatch, tmp_path):
    """The SmolLM2 jobs' columns (templates included) turn every shared train and test row into their format; a job
    on generated rows reads what the `ftray data arithmetic` command of its own comment writes."""
    import shlex

    from ftray.cli import main
    from ftray.config import load_spec
    from ftray.data.prepare import check_data
    from tests._specs import needs_shared

    root = Path(__file__).resolve().parents[1]
    needs_shared()
    monkeypatch.chdir(root)  # the jobs' paths are relative to the repository root
    jobs = sorted((root / "jobs").glob("*_smollm2.yaml"))
    assert len(jobs) == 7
    generated = 0
    for job in jobs:
        comment = " ".join(x[1:].strip().rstrip("\\") for x in job.read_text().splitlines() if x.startswith("#"))
        over = []
        if "ftray data arithmetic" in comment:
            cmd = shlex.split(comment.split("ftray data arithmetic", 1)[1].split("ftray ", 1)[0])
            out = tmp_path / job.stem
            assert main(["data", "arithmetic", str(out), *cmd[1:]]) == 0
            spec = load_spec(job)
            assert spec.data.train.endswith(f"{cmd[0]}/arith_train.jsonl") and spec.data.eval.endswith(f"{cmd[0]}/arith_test.jsonl")
            over, generated = [f"data.train={out}/arith_train.jsonl", f"data.eval={out}/arith_test.jsonl"], generated + 1
        train, ev = check_data(load_spec(job, over))
        assert train.skipped == 0 and ev is not None and ev.rows, job.name
    assert generated == 1


def test_the_cache_key_follows_the_code_that_makes_examples(tmp_path, tiny_model, arith, monkeypatch):
    """Shards prepared by other code are never reused: the key hashes the source of `ftray/data` and every
    method's module. (A hand-bumped version was there; `reward` changed its cut without a bump and the cache
    kept serving the old cut's shards.)"""
    import inspect
    import shutil

    from ftray.config import spec_from_dict
    from ftray.data import prepare
    from ftray.methods import REGISTRY, get_method
    from tests._specs import job_dict

    files = prepare._code_files()
    for kind in REGISTRY:
        assert Path(inspect.getsourcefile(type(get_method(kind)))) in files, kind
    assert Path(prepare.__file__) in files and Path(inspect.getsourcefile(pack_examples)) in files
    # One line added to a copy of reward.py: another fingerprint.
    copies = {d: tuple(tmp_path / d / f.parent.name / f.name for f in files) for d in ("a", "b")}
    for paths in copies.values():
        for f, c in zip(files, paths, strict=True):
            c.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, c)
    reward = tmp_path / "b" / "methods" / "reward.py"
    reward.write_text(reward.read_text() + "\n# cut on the left\n")
    same, edited = (prepare.code_fingerprint(copies[d]) for d in ("a", "b"))
    assert same == prepare.code_fingerprint(tuple(files)) and edited != same
    # ... and the fingerprint is part of the key.
    spec = spec_from_dict(job_dict(tiny_model, arith[0], arith[1], tmp_path / "run", tmp_path / "cache"))
    key = prepare.cache_key(spec, str(tiny_model))
    monkeypatch.setattr(prepare, "code_fingerprint", lambda: edited)
    assert prepare.cache_key(spec, str(tiny_model)) != key
