"""Fault injection for crash-safety tests: one hook, one environment variable, one grammar.

``SPECLABEL_FAULT="POINT[:key=value,...][!kill]"`` makes the job fail at ``POINT`` when every
``key=value`` matches what the job passes there, e.g.::

    SPECLABEL_FAULT="train.epoch:member=1,epoch=2"      member 1 fails after its epoch-2 checkpoint
    SPECLABEL_FAULT="label.batch:batches=3"             every label actor fails on its 4th batch
    SPECLABEL_FAULT="reprocess.after-ingest:release=DR2"
    SPECLABEL_FAULT="label.publish!kill"                SIGKILL, as a preempted node or the OOM killer

By default the point raises :class:`InjectedFault`; ``!kill`` sends SIGKILL to the process instead,
so nothing (no ``finally``, no atexit) runs: what a hard crash leaves behind is what the test sees.
A job reads the variable once in its driver (:func:`planned_fault`) and hands the :class:`Fault` to
the Ray tasks that need it, since workers of an already running cluster do not see the driver's
environment.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import UsageError

FAULT_ENV = "SPECLABEL_FAULT"

# Every point a job offers, with what its keys mean: a typo in a test fails loudly, not silently.
POINTS: dict[str, str] = {
    "train.epoch": "a member's worker after an epoch's checkpoint (member, epoch, rank)",
    "label.batch": "a label actor before a batch (batches: how many it has labelled)",
    "label.publish": "the label job's driver just before publishing (release)",
    "ingest.publish": "the ingest job's driver just before publishing (release)",
    "reprocess.after-ingest": "reprocessing after a release's ingest (release)",
    "reprocess.after-label": "reprocessing after a release's labelling (release)",
}
ACTIONS = ("raise", "kill")


class InjectedFault(RuntimeError):
    """The failure ``SPECLABEL_FAULT`` asked for."""


@dataclass(frozen=True)
class Fault:
    point: str
    when: Mapping[str, str] = field(default_factory=dict)
    action: str = "raise"

    @classmethod
    def parse(cls, text: str) -> Fault:
        spec, _, action = text.strip().partition("!")
        point, _, conditions = spec.partition(":")
        action = action or "raise"
        if point not in POINTS or action not in ACTIONS:
            raise UsageError(
                f"{FAULT_ENV}={text!r}: expected POINT[:key=value,...][!kill] with POINT one of "
                f"{sorted(POINTS)}"
            )
        try:
            when = dict(item.split("=", 1) for item in conditions.replace(" ", "").split(",") if item)
        except ValueError:
            raise UsageError(f"{FAULT_ENV}={text!r}: conditions must be key=value pairs") from None
        return cls(point, when, action)

    def matches(self, point: str, context: Mapping[str, object]) -> bool:
        return point == self.point and all(str(context.get(k)) == v for k, v in self.when.items())

    def __str__(self) -> str:
        conditions = ",".join(f"{k}={v}" for k, v in self.when.items())
        kill = "!kill" if self.action == "kill" else ""
        return self.point + (f":{conditions}" if conditions else "") + kill


def planned_fault(environ: Mapping[str, str] = os.environ) -> Fault | None:
    """The fault the environment asks for, checked (a :class:`UsageError` names a malformed one)."""
    text = environ.get(FAULT_ENV)
    return Fault.parse(text) if text else None


def fault_point(point: str, fault: Fault | None, **context) -> None:
    """Fail here if ``fault`` names this point and its conditions match ``context``."""
    if point not in POINTS:  # a job calling an undeclared point is a bug in the job
        raise ValueError(f"unknown fault point {point!r}")
    if fault is None or not fault.matches(point, context):
        return
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"{FAULT_ENV}={fault}: failing at {point} ({POINTS[point]})")
