"""`ftray.storage` on local paths, where fsspec's own code depends on more than the path (no Ray)."""

from __future__ import annotations

from ftray import storage


def test_remove_works_when_the_working_folder_is_gone(tmp_path, monkeypatch):
    """A Ray job driver's working folder is its runtime_env package, which a lost node's agent may delete on one
    machine: fsspec's LocalFileSystem.rm compares with os.getcwd() and raised FileNotFoundError there, failing
    the pruning of checkpoints at the end of a job that had succeeded."""
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint_a").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint_a" / "state.json").write_text("{}")
    (run / "stray.txt").write_text("x")
    gone = tmp_path / "cwd"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    storage.remove(str(run / "checkpoints" / "checkpoint_a"))
    storage.remove(f"file://{run / 'stray.txt'}")
    storage.remove(str(run / "never-there"))  # nothing to remove: no error
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints"]
