"""What a job tells the person running it: a reporter passed in by the command, never bare prints.

Jobs write their user-facing lines (progress, summaries, tables) through a :class:`Reporter`; the
command line decides where they go (stdout, stderr, nowhere for ``--quiet``), tests and benchmarks
collect them. Everything else a job has to say goes to :mod:`logging`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

Echo = Callable[[str], None]


def to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def to_stdout(text: str) -> None:
    print(text, flush=True)


def silent(text: str) -> None:
    """An echo that drops everything (``--quiet`` progress, benchmarks)."""


def progress_text(
    what: str, done: int, total: int | None, elapsed_s: float, unit: str, extra: str = ""
) -> str:
    """``label DR1: 120/1000 rows (3 quarantined), 12.30 rows/s, ETA 1.2 min``."""
    rate = done / max(elapsed_s, 1e-9)
    count = f"{done}/{total}" if total is not None else f"{done}"
    text = f"{what}: {count} {unit}" + (f" ({extra})" if extra else "") + f", {rate:.2f} {unit}/s"
    if total is not None and rate > 0 and done < total:
        eta = (total - done) / rate
        if math.isfinite(eta):
            text += f", ETA {eta / 60:.1f} min"
    return text


class Reporter:
    """User-facing lines (:meth:`line`) and progress lines at most every ``every_s`` (:meth:`progress`)."""

    def __init__(
        self,
        echo: Echo = to_stdout,
        *,
        progress_echo: Echo | None = None,
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.echo = echo
        self.progress_echo = progress_echo if progress_echo is not None else echo
        self.every_s, self.clock = every_s, clock
        self._started: dict[str, float] = {}
        self._last: dict[str, float] = {}

    def line(self, text: str) -> None:
        self.echo(text)

    def start(self, what: str) -> None:
        """Start the clock of a progress line (its rate counts from here)."""
        self._started[what] = self._last[what] = self.clock()

    def progress(
        self,
        what: str,
        done: int,
        total: int | None,
        unit: str = "rows",
        extra: str = "",
        final: bool = False,
    ) -> None:
        now = self.clock()
        started = self._started.setdefault(what, now)
        if not final and now - self._last.setdefault(what, started) < self.every_s:
            return
        self._last[what] = now
        self.progress_echo(progress_text(what, done, total, now - started, unit, extra))


QUIET = Reporter(silent)
