"""The train driver's resume, with hard kills: the real CLI in its own process, SIGKILL, rerun.

Each run of ``speclabel train`` starts its own local Ray (``--address local``) under a private
``RAY_TMPDIR``, so that a killed driver's Ray processes can be found and ended by that folder and
never meet another Ray instance on the machine.
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import _pids_mentioning
from train_inputs import tiny_model_toml

from speclabel.core.faults import FAULT_ENV

SPECLABEL = str(Path(sys.executable).with_name("speclabel"))
EPOCH_LINE = re.compile(r"^member (\d+)  epoch +(\d+)/")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".cloudpickle")


@pytest.fixture
def ray_tmpdir():
    """A private, short Ray temp root (socket paths must stay below 107 bytes); its processes end with it."""
    folder = tempfile.mkdtemp(prefix="slkill-", dir="/tmp")
    yield folder
    for pid in _pids_mentioning(folder):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)


def _command(tmp_path, *extra):
    data = tmp_path / "survey.parquet"
    config = tmp_path / "model.toml"
    out = tmp_path / "models" / "tiny"
    return [SPECLABEL, "train", "--data", str(data), "--out", str(out), "--config", str(config),
            "--streaming", "off", "--address", "local", *extra]  # fmt: skip


def _env(ray_tmpdir, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", FAULT_ENV)}
    return {**env, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmpdir, **extra}


def _epochs(lines):
    """(member, epoch) of every progress line of a member epoch."""
    return [tuple(int(g) for g in m.groups()) for line in lines if (m := EPOCH_LINE.match(line))]


def _write_inputs(tmp_path, small_survey, epochs, members=2):
    pq.write_table(small_survey, tmp_path / "survey.parquet", row_group_size=10)
    tiny_model_toml(tmp_path / "model.toml", epochs=epochs, members=members)


def assert_no_pickles(folder: Path) -> None:
    """Nothing in ``folder`` is a pickle, by name or by content (protocol 2+ starts with 0x80, 2-5)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                head = handle.read(2)
            is_pickle = len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5
            assert not is_pickle and path.suffix not in PICKLE_SUFFIXES, f"a pickle in the run folder: {path}"


@pytest.mark.ray
def test_driver_killed_mid_run_resumes_unfinished_members_and_keeps_finished_ones(
    small_survey, tmp_path, ray_tmpdir
):
    _write_inputs(tmp_path, small_survey, epochs=4)
    # Two CPUs per member on the two-CPU local Ray: one member at a time, so member 0 has finished
    # and member 1 is between epochs when its epoch-2 line appears and the driver is killed.
    command = _command(tmp_path, "--cpus-per-member", "2")
    env = _env(ray_tmpdir)
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = []
    for line in first.stdout:
        seen.append(line.rstrip("\n"))
        if _epochs(seen[-1:]) == [(1, 2)]:
            first.send_signal(signal.SIGKILL)
            break
    first.wait(timeout=60)
    first.stdout.close()
    assert first.returncode == -signal.SIGKILL, "\n".join(seen)
    assert (0, 4) in _epochs(seen) and not (tmp_path / "models" / "tiny").exists()

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    # Ray Train's placement-group cleaner asks the State API every second; without the dashboard
    # that serves it, each ask was a warning line (54 in a 70 s run) that reads as a failure.
    assert "State API may be temporarily unavailable" not in rerun.stdout + rerun.stderr
    lines = rerun.stdout.splitlines()
    assert any(line.startswith("member 0: finished in an earlier run; not trained again") for line in lines)
    resumed = [
        int(m.group(1)) for line in lines if (m := re.match(r"member 1: resumed .* at epoch (\d+)$", line))
    ]
    assert len(resumed) == 1 and resumed[0] >= 2, lines
    # Member 0 is not trained again; member 1 trains only the epochs after its last checkpoint.
    assert _epochs(lines) == [(1, epoch) for epoch in range(resumed[0] + 1, 5)]
    assert (tmp_path / "models" / "tiny" / "model.json").exists()
    assert_no_pickles(tmp_path / "models" / ".speclabel-train" / "tiny")


@pytest.mark.ray
def test_a_killed_worker_is_restarted_from_its_checkpoint_within_the_run(small_survey, tmp_path, ray_tmpdir):
    # One member: the restart is within that member's run; a second member would only add its own run.
    _write_inputs(tmp_path, small_survey, epochs=3, members=1)
    env = _env(ray_tmpdir, **{FAULT_ENV: "train.epoch:member=0,epoch=1!kill"})
    result = subprocess.run(
        _command(tmp_path, "--max-failures", "1"), env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("member 0: a worker failed after epoch 1") for line in lines), lines
    assert "member 0: resumed from its checkpoint at epoch 1" in lines
    # Every epoch was trained once: the killed worker's epoch 1 was not repeated.
    assert _epochs(lines) == [(0, 1), (0, 2), (0, 3)]
    # Ray Train's per-report INFO lines stay in Ray's logs, not on the job's console.
    assert "Reporting training result" not in result.stdout + result.stderr
    assert (tmp_path / "models" / "tiny" / "model.json").exists()
