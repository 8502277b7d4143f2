"""Connecting to Ray: one way for every command.

``--address`` names the cluster (``auto``, ``ray://HOST:10001``, ``HOST:6379``) or ``local`` for a
fresh local instance; without it Ray chooses (``RAY_ADDRESS``, a cluster started with ``ray start``
on this machine, else a new local instance). A session this process started is shut down when the
``with`` block ends; one that was already running (a test fixture, a notebook) is left as it was.

Ray remembers the last ``ray start`` on this machine in a file (``/tmp/ray/ray_current_cluster``)
and joins that address even after the head has died, retrying for minutes. So before Ray looks
there, :func:`check_recorded_cluster` tries a TCP connection to the recorded address and fails
within seconds with what happened and what to do.

Quiet sessions (``--quiet``) show the job's summary and real warnings only: Ray Data's INFO lines on
the console (each dataset's start, plan and end) are held back, as is its notice that the progress
bars the job turned off are off; Ray Data still writes everything to ``ray-data.log`` in the session's
log folder, which a session that is not quiet names when it starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

from speclabel.core.errors import SpeclabelError

log = logging.getLogger(__name__)

RECORDED_CLUSTER_TIMEOUT_S = 3.0  # a live head on this machine accepts a connection in milliseconds

# Ray Data's console handler (ray/data/_internal/logging.py); its file handler keeps every level.
RAY_DATA_CONSOLE = "console"
# Notices that only repeat what --quiet asked for.
QUIET_NOTICES = ("Progress bars disabled", "Progress bars for operators disabled")


@contextlib.contextmanager
def ray_session(
    address: str | None = None, *, quiet: bool = False, state_api: bool = False
) -> Iterator[bool]:
    """Join or start Ray for the duration of the block; yields True when this call started it.

    ``quiet``: worker output is not forwarded to this process (``log_to_driver=False``), Ray's own
    log lines are held to warnings and Ray Data's console lines to real warnings (see above).
    ``state_api``: a local instance this call starts also runs Ray's dashboard, which serves the
    State API. Ray Train needs it: its placement-group cleaner asks it every second whether the
    train controller lives, and without it warns on every ask ("State API may be temporarily
    unavailable"), which reads as a failure. Other jobs skip the dashboard's start-up and memory.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        check_recorded_cluster(address)
        context = ray.init(
            address=address,
            include_dashboard=state_api,
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


def recorded_cluster_file() -> str:
    """Where Ray records the address of the last ``ray start`` (it honours ``RAY_TMPDIR``)."""
    from ray._common.utils import get_ray_address_file

    return get_ray_address_file(None)


def check_recorded_cluster(address: str | None) -> None:
    """Fail fast when Ray would join a recorded ``ray start`` cluster that no longer answers.

    Only where Ray would read the record: no address given (or ``auto``) and no ``RAY_ADDRESS``."""
    if address not in (None, "auto") or os.environ.get("RAY_ADDRESS"):
        return
    path = recorded_cluster_file()
    try:
        with open(path) as fh:
            recorded = fh.read().strip()
    except FileNotFoundError:
        return
    host, _, port = recorded.rpartition(":")
    if not host or not port.isdigit():
        return  # not an address we can test: leave it to Ray
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=RECORDED_CLUSTER_TIMEOUT_S):
            return
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
    raise SpeclabelError(
        f"Ray records a cluster started with `ray start` on this machine at {recorded} (in {path}), "
        f"but nothing answers there ({reason}): its head has stopped or died. Start it again "
        "(`ray start --head`), run `ray stop` to make Ray forget it, or pass --address local for a "
        "fresh local Ray instance"
    )


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
