"""Connecting to Ray: one way for every command.

``--address`` names the cluster (``auto``, ``ray://HOST:10001``, ``HOST:6379``) or ``local`` for a
fresh local instance; without it Ray chooses (``RAY_ADDRESS``, a cluster started with ``ray start``
on this machine, else a new local instance). A session this process started is shut down when the
``with`` block ends; one that was already running (a test fixture, a notebook) is left as it was.

Quiet sessions (``--quiet``) show the job's summary and real warnings only: Ray Data's INFO lines on
the console (each dataset's start, plan and end) are held back, as is its notice that the progress
bars the job turned off are off; Ray Data still writes everything to ``ray-data.log`` in the session's
log folder, which a session that is not quiet names when it starts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)

# Ray Data's console handler (ray/data/_internal/logging.py); its file handler keeps every level.
RAY_DATA_CONSOLE = "console"
# Notices that only repeat what --quiet asked for.
QUIET_NOTICES = ("Progress bars disabled", "Progress bars for operators disabled")


@contextlib.contextmanager
def ray_session(address: str | None = None, *, quiet: bool = False) -> Iterator[bool]:
    """Join or start Ray for the duration of the block; yields True when this call started it.

    ``quiet``: worker output is not forwarded to this process (``log_to_driver=False``), Ray's own
    log lines are held to warnings and Ray Data's console lines to real warnings (see above).
    """
    import ray

    started = not ray.is_initialized()
    if started:
        context = ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=not quiet,
            # Worker INFO lines (one per checkpoint, one per dataset) would bury a job's own progress.
            logging_config=ray.LoggingConfig(log_level="WARNING"),
        )
        session_dir = (getattr(context, "address_info", None) or {}).get("session_dir")
        if session_dir and not quiet:
            log.info("Ray's logs are in %s/logs (Ray Data's in ray-data/ray-data.log there)", session_dir)
    try:
        with _quiet_ray_data() if quiet else contextlib.nullcontext():
            yield started
    finally:
        if started:
            ray.shutdown()


class _QuietNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not str(record.msg).startswith(QUIET_NOTICES)


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data's console handler keeps real warnings only, for the block."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger and its handlers)

    consoles = [h for h in logging.getLogger("ray.data").handlers if h.name == RAY_DATA_CONSOLE]
    quiet = _QuietNotices()
    for handler in consoles:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in consoles:
            handler.removeFilter(quiet)
