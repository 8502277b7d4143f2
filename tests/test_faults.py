import os
import subprocess
import sys

import pytest

from speclabel.core.errors import UsageError
from speclabel.core.faults import FAULT_ENV, POINTS, Fault, InjectedFault, fault_point, planned_fault


def test_a_fault_fires_only_where_its_conditions_match():
    fault = Fault.parse("train.epoch:member=1,epoch=2")
    fault_point("train.epoch", fault, member=0, epoch=2)
    fault_point("train.epoch", fault, member=1, epoch=1)
    fault_point("label.batch", fault, member=1, epoch=2)
    with pytest.raises(InjectedFault, match=r"train\.epoch:member=1,epoch=2"):
        fault_point("train.epoch", fault, member=1, epoch=2)


def test_no_fault_planned_means_nothing_happens():
    assert planned_fault({}) is None
    fault_point("label.publish", None, release="DR1")


@pytest.mark.parametrize("text", ["train.epoc:member=1", "label.batch:batches", "label.batch!explode"])
def test_a_malformed_fault_is_a_usage_error(text):
    with pytest.raises(UsageError, match=FAULT_ENV):
        planned_fault({FAULT_ENV: text})


def test_undeclared_points_are_a_bug_in_the_caller():
    with pytest.raises(ValueError, match="unknown fault point"):
        fault_point("label.nowhere", None)


def test_parse_and_str_round_trip_every_point():
    for point in POINTS:
        text = f"{point}:release=DR1!kill"
        assert str(Fault.parse(text)) == text


def test_kill_ends_the_process_with_sigkill():
    code = (
        "from speclabel.core.faults import Fault, fault_point\n"
        "fault_point('label.publish', Fault.parse('label.publish!kill'), release='x')\n"
        "print('survived')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == -9 and "survived" not in done.stdout
