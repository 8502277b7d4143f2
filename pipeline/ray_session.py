"""Connecting to Ray: one way for every command.

``--address`` names the cluster (``auto``, ``ray://HOST:10001``, ``HOST:6379``) or ``local`` for a
fresh local instance; without it Ray chooses (``RAY_ADDRESS``, a cluster started with ``ray start``
on this machine, else a new local instance). A session this process started is shut down when the
``with`` block ends; one that was already running (a test fixture, a notebook) is left as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def ray_session(address: str | None = None, *, quiet: bool = False) -> Iterator[bool]:
    """Join or start Ray for the duration of the block; yields True when this call started it.

    ``quiet``: worker output is not forwarded to this process (``log_to_driver=False``) and Ray's own
    log lines are held to warnings.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=not quiet,
            # Worker INFO lines (one per checkpoint, one per dataset) would bury a job's own progress.
            logging_config=ray.LoggingConfig(log_level="WARNING"),
        )
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def no_data_progress_bars() -> Iterator[None]:
    """Ray Data's progress bars off for the datasets run in the block (``--quiet``), restored after."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved, context.enable_progress_bars = context.enable_progress_bars, False
    try:
        yield
    finally:
        context.enable_progress_bars = saved
