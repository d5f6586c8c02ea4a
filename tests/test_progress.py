"""Progress bars (ftray/progress.py): tqdm bars for data preparation, held-out evaluation and generation on
an interactive terminal (a real pseudo-terminal here), none in a pipe, where the plain `[ftray]` lines stay.
No Ray: the job runs in this process (`run_here`) and `ftray eval`'s function on a base model."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading

import pytest

from tests._specs import ROOT, job_dict, run_here

PHASES = ("tokenize", "eval loss", "generate")


@contextlib.contextmanager
def _stderr_to(kind: str):
    """sys.stderr on a fresh pseudo-terminal (120 columns: tqdm draws nothing on a 0-column one) or pipe;
    yields a list that holds everything written to it once the block ends (read as it comes, so a full
    buffer never blocks the writer)."""
    if kind == "tty":
        reader, writer = pty.openpty()
        fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    else:
        reader, writer = os.pipe()
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                data = os.read(reader, 65536)
            except OSError:  # a pty's reader gets EIO once the writer is closed
                break
            if not data:
                break
            chunks.append(data)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    saved = sys.stderr
    sys.stderr = open(writer, "w", buffering=1, closefd=True)  # noqa: SIM115 - closed below
    out: list[str] = []
    try:
        yield out
    finally:
        sys.stderr.close()
        sys.stderr = saved
        t.join(timeout=10)
        os.close(reader)
        out.append(b"".join(chunks).decode(errors="replace"))


def _job(tmp_path, name, tiny_model, arith):
    # A fresh cache per run, so that both runs tokenize; exact match, so that both generate.
    return job_dict(tiny_model, arith[0], arith[1], tmp_path / name, tmp_path / f"cache-{name}",
                    method__exact_match=True, method__max_new_tokens=2, scaling__num_workers=1,
                    train__max_steps=1, train__global_batch_size=4, data__eval_max_rows=16)


@pytest.mark.skipif(bool(os.environ.get("TQDM_DISABLE")), reason="TQDM_DISABLE is set: tqdm draws no bars")
def test_bars_on_a_terminal_none_in_a_pipe(tmp_path, tiny_model, arith, capfd):
    from ftray.eval.evaluate import evaluate

    with _stderr_to("tty") as tty:
        run_here(_job(tmp_path, "tty", tiny_model, arith))
        evaluate(str(tiny_model), str(arith[1]), method="grpo", max_rows=8)  # `ftray eval` on a base model
    with _stderr_to("pipe") as pipe:
        run_here(_job(tmp_path, "pipe", tiny_model, arith))
        evaluate(str(tiny_model), str(arith[1]), method="grpo", max_rows=8)
    tty, pipe = tty[0], pipe[0]
    lines = capfd.readouterr().out

    for phase in PHASES:
        # A drawn tqdm bar: the phase, a percentage and its bar, redrawn in place (carriage return).
        assert f"\r{phase}:" in tty and f"{phase}:   0%|" in tty, (phase, tty[-2000:])
        assert f"{phase}:" not in pipe, (phase, pipe[-2000:])
    # The bars are erased when done (leave=False): the terminal is left with the same lines as a log.
    assert tty.count("tokenize:") >= 2 and "\r" in tty
    # The plain lines are the same either way (stdout, both runs).
    for line in ("[ftray] data ", "[ftray] eval before training: ", "[ftray] step 1/1 ", "[ftray] exact_match: "):
        assert lines.count(line) == 2, (line, lines[-3000:])


@pytest.mark.parametrize("disable", ["", "1"])
def test_tqdm_disable_is_tqdms_own(disable):
    """`TQDM_DISABLE` (read by tqdm itself when it is imported) turns the bars off on a terminal too; our
    helper adds no switch of its own. A fresh process: the variable counts only before tqdm's import."""
    code = "from ftray.progress import bar\nfor _ in bar(range(3), 'phase'): pass\n"
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    if disable:
        env["TQDM_DISABLE"] = disable
    reader, writer = pty.openpty()
    fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.run([sys.executable, "-c", code], stderr=writer, stdout=subprocess.DEVNULL, env=env, timeout=60,
                          cwd=ROOT)  # `-c` imports ftray from the working directory: this checkout's
    os.close(writer)
    chunks = []
    while True:
        try:
            data = os.read(reader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(reader)
    out = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, out
    assert ("phase:" in out) == (not disable), out
