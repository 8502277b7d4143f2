"""Member progress a person can follow, through the job's ``core.reporting.Reporter``.

One line per member epoch (loss, validation loss, best, time per epoch, ETA, device) on the
reporter's progress echo; a line when a member resumes from a checkpoint, when one of its workers
fails (Train restarts it from its checkpoint while ``--max-failures`` allows), when it finishes or
fails for good, and when it had finished in an earlier run of the same command.
"""

from __future__ import annotations

import datetime as dt

import numpy as np

from speclabel.core.reporting import Reporter

from .member import EPOCH, FINISHED, WORKER_FAILED


class MemberProgress:
    def __init__(self, reporter: Reporter, n_members: int):
        self.reporter = reporter
        self.n_members = n_members
        self.finished: set[int] = set()
        self.seconds: dict[int, list[float]] = {}
        self.last_epoch: dict[int, int] = {}
        self._resumed_from: dict[int, int] = {}

    def event(self, kind: str, member: int, values: dict) -> None:
        """An event of a member's run (``member.ProgressToDriver``)."""
        {EPOCH: self.epoch, FINISHED: self.member_finished, WORKER_FAILED: self.worker_failed}[kind](
            member, values
        )

    def epoch(self, member: int, result: dict) -> None:
        resumed = int(result.get("resumed_from_epoch") or 0)
        if resumed and self._resumed_from.get(member) != resumed:
            self.reporter.line(f"member {member}: resumed from its checkpoint at epoch {resumed}")
        self._resumed_from[member] = resumed
        self.last_epoch[member] = int(result["epoch"])
        times = self.seconds.setdefault(member, [])
        times.append(float(result["seconds"]))
        remaining = 0 if result["stopped"] else result["max_epochs"] - result["epoch"]
        eta = dt.timedelta(seconds=round(float(np.mean(times)) * remaining))
        workers = f" x{result['workers']}" if result.get("workers", 1) > 1 else ""
        self.reporter.progress_echo(
            f"member {member}  epoch {result['epoch']:>4}/{result['max_epochs']}  "
            f"loss {result['train_loss']:.4g}  val {result['val_loss']:.4g}  "
            f"best {result['best_val_loss']:.4g}@{result['best_epoch']}  "
            f"{result['seconds']:.1f} s/epoch  ETA {eta}  [{result['device']}{workers}]"
        )

    def member_finished(self, member: int, result: dict, *, earlier: bool = False) -> None:
        self.finished.add(member)
        early = " (stopped early)" if result["stopped"] else ""
        when = " in an earlier run; not trained again" if earlier else ""
        self.reporter.line(
            f"member {member}: finished{when}, best val loss {result['best_val_loss']:.4g} at epoch "
            f"{result['best_epoch']} of {result['epoch']}{early}"
            f"  [{len(self.finished)}/{self.n_members} members done]"
        )

    def worker_failed(self, member: int, result: dict) -> None:
        self.reporter.line(
            f"member {member}: a worker failed after epoch {self.last_epoch.get(member, 0)} "
            f"({result['error']}); Train restarts it from its checkpoint while --max-failures allows"
        )

    def member_failed(self, member: int) -> None:
        self.reporter.line(
            f"member {member}: FAILED after epoch {self.last_epoch.get(member, 0)}; "
            "its checkpoint is kept for a rerun"
        )
