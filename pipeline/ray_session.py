"""Connecting to Ray: one way for every command.

``--address`` names the cluster (``auto``, ``ray://HOST:10001``, ``HOST:6379``) or ``local`` for a
fresh local instance; without it Ray chooses (``RAY_ADDRESS``, a cluster started with ``ray start``
on this machine, else a new local instance). A session this process started is shut down when the
``with`` block ends; one that was already running (a test fixture, a notebook) is left as it was.

Ray remembers the last ``ray start`` on this machine in a file (``/tmp/ray/ray_current_cluster``)
and joins that address even after the head has died, retrying for minutes. So before Ray looks
there, :func:`check_recorded_cluster` tries a TCP connection to the recorded address and fails
within seconds with what happened and what to do.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

from speclabel.core.errors import SpeclabelError

RECORDED_CLUSTER_TIMEOUT_S = 3.0  # a live head on this machine accepts a connection in milliseconds


@contextlib.contextmanager
def ray_session(address: str | None = None, *, quiet: bool = False) -> Iterator[bool]:
    """Join or start Ray for the duration of the block; yields True when this call started it.

    ``quiet``: worker output is not forwarded to this process (``log_to_driver=False``) and Ray's own
    log lines are held to warnings.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        check_recorded_cluster(address)
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
