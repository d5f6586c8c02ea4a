"""Progress bars for a person at a terminal: tqdm (as transformers and datasets use) over data preparation,
held-out evaluation and generation, drawn only by rank 0 and only when stderr is an interactive terminal.
In a Ray worker's log, `ray job logs` or a pipe nothing is drawn: the plain `[ftray] ...` lines say it all."""

from __future__ import annotations

import sys
from collections.abc import Iterable

__all__ = ["bar"]


def _for_a_person() -> bool:
    if not sys.stderr.isatty():
        return False
    # Other ranks would draw the same bar over rank 0's (a terminal shared by local ranks). A process group
    # needs torch.distributed imported: without it there is none, and nothing to import for the question.
    dist = sys.modules.get("torch.distributed")
    return dist is None or not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def bar(iterable: Iterable | None = None, desc: str = "", *, total: int | None = None, unit: str = "it"):
    """A tqdm bar over `iterable` (or for `update(n)` when None); a silent one (tqdm's `disable`, which yields
    `iterable` as it is) when no person is watching. Where one is, `disable` is left unset, so that tqdm's own
    `TQDM_DISABLE` still turns bars off (tqdm reads it at import; any non-empty value, even 0, disables)."""
    from tqdm import tqdm

    quiet = {} if _for_a_person() else {"disable": True}
    # leave=False: a finished bar is erased, so the terminal keeps the same plain lines as a log.
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True, **quiet)
