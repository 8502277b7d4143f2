"""The write lock of a dataset (spectra store, label catalogue, reprocess records) and its heartbeat.

``ROOT/_lock`` is one small JSON file naming its holder::

    {"run_id": "20261125T101500Z-3f2a9c1d", "host": "node-3", "pid": 4242, "user": "survey",
     "acquired_at": 1795601700.0, "renewed_at": 1795601760.0, "timeout_s": 600.0}

* **Taking it** is one conditional create (:mod:`speclabel.core.conditional`: ``link(2)`` locally,
  ``If-None-Match: *`` on S3, ``ifGenerationMatch=0`` on GCS): of any number of concurrent runs,
  on one machine or many, exactly one wins; the others get :class:`LockedError` naming the holder.
* **Holding it**: one heartbeat thread per held lock rewrites ``renewed_at`` every
  ``timeout_s / 4`` (at most every 60 s) as a compare-and-swap on the version it wrote last. When that
  fails another run has taken the lock over: the heartbeat stops and :meth:`DatasetLock.check`
  raises, so the run stops before it publishes.
* **A stale lock**, one not renewed for longer than the ``timeout_s`` its holder declared (the
  holder was killed, or its node lost), is taken over by a compare-and-swap on the version read: two
  runs taking over the same stale lock cannot both win. Nothing else makes a lock stale: a process
  id says nothing across containers and pid namespaces, and a running job renews its lock.

Staleness compares the taker's clock with the holder's ``renewed_at``: hosts must agree to well
within the timeout (NTP does).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time

import pyarrow.fs as pafs

from speclabel.core.conditional import conditional_store
from speclabel.core.errors import SpeclabelError

log = logging.getLogger(__name__)

# A killed run blocks its dataset this long; a live one renews every timeout/4, so a short timeout
# costs a few small writes a minute and nothing else.
DEFAULT_LOCK_TIMEOUT_S = 600.0
MAX_BEAT_S = 60.0


class LockedError(SpeclabelError):
    """Another run holds the dataset's lock (or took it over from this one)."""


class DatasetLock:
    """The lock file at ``path`` held by run ``run_id``; a context manager that takes it, renews it
    from a heartbeat thread while the block runs, and gives it back."""

    def __init__(
        self, fs: pafs.FileSystem, path: str, run_id: str, *, timeout_s: float, location: str | None = None
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"lock timeout must be > 0, got {timeout_s}")
        self.store = conditional_store(fs)
        self.path, self.run_id, self.timeout_s = path, run_id, float(timeout_s)
        self.location = location or path.rsplit("/", 1)[0]
        self.shown = f"{location.rstrip('/')}/{path.rsplit('/', 1)[-1]}" if location else path  # for people
        self.owner = {
            "run_id": run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": getpass.getuser(),
            "timeout_s": self.timeout_s,
        }
        self.version: str | None = None
        self.acquired_at = 0.0
        self.took_over: dict | None = None  # the stale holder this run replaced, if any
        self._lost: LockedError | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- taking and giving back -------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lock, or take over a stale one; :class:`LockedError` while another run holds it."""
        self.acquired_at = time.time()
        data = self._content(acquired_at=self.acquired_at, renewed_at=self.acquired_at)
        for _ in range(8):  # each round lost means the lock changed under us: look again
            self.version = self.store.create(self.path, data)
            if self.version is not None:
                return
            current = self.store.read(self.path)
            if current is None:
                continue  # given back between the two calls
            held = _parse(current[0])
            if not self._stale(held):
                raise LockedError(self._held_message(held))
            self.version = self.store.replace(self.path, data, current[1])
            if self.version is not None:
                self.took_over = held
                log.warning("took over the stale lock %s: %s", self.path, self._held_message(held))
                return
        raise LockedError(f"could not take the lock {self.path}: other runs kept changing it")

    def release(self) -> None:
        """Give the lock back, unless another run has taken it over meanwhile."""
        self._stop_heartbeat()
        if self.version is not None and not self.store.delete(self.path, self.version):
            log.warning("the lock %s was taken over before run %s ended", self.shown, self.run_id)
        self.version = None

    def __enter__(self) -> DatasetLock:
        self.acquire()
        self._stop.clear()
        every_s = min(MAX_BEAT_S, self.timeout_s / 4)
        self._beat = threading.Thread(target=self._heartbeat, args=(every_s,), name="lock-heartbeat")
        self._beat.daemon = True
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- holding ----------------------------------------------------------------------------------

    def renew(self) -> None:
        """Rewrite ``renewed_at``; :class:`LockedError` when another run has taken the lock over."""
        if self.version is None:
            raise LockedError(f"run {self.run_id} does not hold the lock of {self.location}")
        data = self._content(acquired_at=self.acquired_at, renewed_at=time.time())
        version = self.store.replace(self.path, data, self.version)
        if version is None:
            current = self.store.read(self.path)
            holder = _parse(current[0]) if current else None
            ours = (self.run_id, self.acquired_at)
            if holder and (holder.get("run_id"), holder.get("acquired_at")) == ours:
                # Our own earlier renewal, whose answer was lost to a network error: still ours.
                version = self.store.replace(self.path, data, current[1])
        if version is None:
            raise LockedError(
                f"run {self.run_id} lost the lock of {self.location}: "
                + (self._held_message(holder) if holder else "the lock file was removed")
            )
        self.version = version

    def check(self) -> None:
        """Raise :class:`LockedError` if the heartbeat found the lock taken over: call before publishing."""
        if self._lost is not None:
            raise self._lost

    def _heartbeat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.renew()
            except LockedError as exc:
                self._lost = exc
                log.error("%s", exc)
                return
            except OSError as exc:  # a flaky object store: the next beat tries again
                log.warning("could not renew the lock %s: %s", self.path, exc)

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._beat is not None and self._beat is not threading.current_thread():
            self._beat.join()
        self._beat = None

    # -- the file ---------------------------------------------------------------------------------

    def _content(self, *, acquired_at: float, renewed_at: float) -> bytes:
        record = {**self.owner, "acquired_at": acquired_at, "renewed_at": renewed_at}
        return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()

    def _stale(self, held: dict | None) -> bool:
        if held is None:  # not a lock this code wrote (writes are whole): nobody can be holding it
            return True
        timeout = float(held.get("timeout_s") or self.timeout_s)
        renewed = float(held.get("renewed_at") or held.get("acquired_at") or 0)
        return time.time() - renewed > timeout

    def _held_message(self, held: dict | None) -> str:
        held = held or {}
        timeout = float(held.get("timeout_s") or self.timeout_s)
        renewed = float(held.get("renewed_at") or held.get("acquired_at") or 0)
        return (
            f"{self.location} is locked by run {held.get('run_id')} (pid {held.get('pid')} on "
            f"{held.get('host')}, user {held.get('user')}, since {time.ctime(held.get('acquired_at', 0))}, "
            f"renewed {max(0.0, time.time() - renewed):.0f} s ago); it is taken over once not renewed "
            f"for {timeout:g} s, or remove {self.shown} if that run is dead"
        )


def read_lock(fs: pafs.FileSystem, path: str) -> dict | None:
    """Who holds the lock at ``path`` (its JSON), or None when nobody does."""
    current = conditional_store(fs).read(path)
    return _parse(current[0]) if current else None


def _parse(data: bytes) -> dict | None:
    try:
        held = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return held if isinstance(held, dict) else None
