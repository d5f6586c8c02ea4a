"""Hugging Face datasets as `data.train` / `data.eval` (`hf:`), offline: a folder written by
`save_to_disk` (a DatasetDict with splits, and a single Dataset), a local dataset repository folder
(parquet files named by split, read by `load_dataset` as the Hub copy would be), the errors (unknown
split, malformed row, no such dataset) naming the source and row, and a job trained from them whose
prepared-data cache is found again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftray.data.rows import DataError, read_checked
from tests._specs import job_dict, run_here


@pytest.fixture(scope="module")
def arith_rows(arith):
    return [json.loads(x) for x in arith[0].read_text().splitlines()], [json.loads(x) for x in arith[1].read_text().splitlines()]


@pytest.fixture(scope="module")
def saved(arith_rows, tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("hf")
    train, test = arith_rows
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}).save_to_disk(
        str(root / "dict"))
    datasets.Dataset.from_list(test).save_to_disk(str(root / "single"))
    repo = root / "repo" / "data"
    repo.mkdir(parents=True)
    datasets.Dataset.from_list(train).to_parquet(str(repo / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(test).to_parquet(str(repo / "test-00000-of-00001.parquet"))
    return root


def test_saved_and_repository_datasets_read_as_their_rows(saved, arith_rows):
    train, test = arith_rows
    fmt = "prompt_completion"
    want = [(r["prompt"], r["completion"]) for r in train]
    for src in (f"hf:{saved / 'dict'}?split=train", f"hf:{saved / 'repo'}?split=train"):
        got = read_checked(src, fmt).rows
        assert [(r["prompt"], r["completion"]) for r in got] == want, src
    assert len(read_checked(f"hf:{saved / 'single'}", fmt).rows) == len(test)


def test_bad_sources_are_one_line_naming_them(saved, tmp_path):
    import datasets

    with pytest.raises(DataError, match=r"dict: the dataset has splits train, test: name one with \?split="):
        read_checked(f"hf:{saved / 'dict'}", "prompt_completion")
    with pytest.raises(DataError, match=r"repo\?split=valid: no split 'valid' \(the dataset has train, test\)"):
        read_checked(f"hf:{saved / 'repo'}?split=valid", "prompt_completion")
    with pytest.raises(DataError, match=r"hf:.*no-such\?split=train: cannot load the dataset"):
        read_checked(f"hf:{tmp_path / 'no-such'}?split=train", "prompt_completion")
    with pytest.raises(DataError, match=r"unknown: revision"):
        read_checked(f"hf:{saved / 'dict'}?split=train&revision=main", "prompt_completion")
    datasets.Dataset.from_list([{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": None}]).save_to_disk(
        str(tmp_path / "bad"))
    with pytest.raises(DataError, match=rf"hf:{tmp_path / 'bad'}:2: "):
        read_checked(f"hf:{tmp_path / 'bad'}", "prompt_completion")


def test_job_trains_from_hf_datasets_and_finds_its_cache(saved, arith_rows, tiny_model, cache_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(saved)  # relative dataset folders are made absolute against the cwd, as file paths are
    d = job_dict(tiny_model, "hf:dict?split=train", "hf:repo?split=test", tmp_path / "a", cache_dir,
                 scaling__num_workers=1, train__max_steps=2, train__global_batch_size=4)
    d["data"]["train"], d["data"]["eval"] = "hf:dict?split=train", "hf:repo?split=test"
    first = run_here(d)
    assert first["spec"]["data"]["train"] == f"hf:{saved / 'dict'}?split=train"
    assert first["data"]["train"]["rows"] == len(arith_rows[0]) and first["eval"]["after"]["eval_loss"] > 0
    meta = Path(first["data"]["path"]).parent / "meta.json"  # names the finished attempt under the key
    written = meta.stat().st_mtime_ns
    d["output"]["dir"] = str(tmp_path / "b")
    second = run_here(d)  # the same datasets: the same cache key, the prepared shards read again, not rewritten
    assert second["data"]["key"] == first["data"]["key"] and meta.stat().st_mtime_ns == written
