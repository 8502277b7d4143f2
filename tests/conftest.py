"""Shared fixtures: the default setup, small simulated surveys, and one local Ray instance per session."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from speclabel.core.setups import get_setup
from speclabel.pipeline.simulate import SurveyConfig, simulate_chunk

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def setup():
    return get_setup("giraffe-hr10-hr21")


@pytest.fixture(scope="session")
def small_survey(setup):
    """40 simulated spectra with labels (one chunk), as an Arrow table."""
    return simulate_chunk(setup, SurveyConfig(n=40, seed=11, chunk_size=40), 0)


@pytest.fixture(scope="session")
def shared_data():
    if not (SHARED_DATA / "giraffe_synth_train.parquet").exists():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (start-up costs seconds on 2 cores)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local tests only; clusters use tokens
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            object_store_memory=200 * 2**20,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_setup():
    """A two-arm setup of 96 + 64 pixels with line windows, small enough for fast model tests."""
    from speclabel.core.setups import Setup

    return Setup.from_dict(
        {
            "name": "tiny-two-arm",
            "arms": [
                {
                    "name": "blue",
                    "wave_start": 5000.0,
                    "wave_step": 0.5,
                    "n_pixels": 96,
                    "resolution": 5000.0,
                },
                {"name": "red", "wave_start": 8500.0, "wave_step": 0.5, "n_pixels": 64, "resolution": 5000.0},
            ],
            "line_windows": {"Fe I": [[5010.0, 5012.0], [5030.0, 5031.0]], "Ca II": [[8510.0, 8515.0]]},
            "label_lines": {"feh": ["Fe I"]},
        }
    )


class RayHead:
    """A real Ray head started with ``ray start --head --block``, as on a cluster's head node.

    Every port is a free one and the temp dir is private, so it never meets another Ray instance
    on this machine; it is stopped through its own process group (``ray stop`` would stop every
    Ray instance on the machine). Jobs run with the test interpreter first on PATH, as a cluster
    node runs them with the interpreter that has speclabel installed.
    """

    PORTS = (
        "port",
        "dashboard-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "node-manager-port",
        "object-manager-port",
        "metrics-export-port",
        "ray-client-server-port",
    )

    def __init__(self, num_cpus: int = 2, env: dict[str, str] | None = None):
        sockets = []
        for _ in self.PORTS:  # hold all sockets open until every port is chosen: no duplicates
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        ports = {name: sock.getsockname()[1] for name, sock in zip(self.PORTS, sockets, strict=True)}
        for sock in sockets:
            sock.close()
        # Short and private: Ray's socket paths under it must stay below the 107-byte limit.
        self.temp_dir = tempfile.mkdtemp(prefix="slray-", dir="/tmp")
        self.address = f"http://127.0.0.1:{ports['dashboard-port']}"
        bin_dir = os.path.dirname(sys.executable)
        head_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        head_env.update({"RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"})
        head_env.update(env or {})
        command = [
            os.path.join(bin_dir, "ray"),
            "start",
            "--head",
            "--block",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--object-store-memory=100000000",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            *(f"--{name}={port}" for name, port in ports.items()),
        ]
        self._log = open(os.path.join(self.temp_dir, "ray-start.log"), "w")
        self.process = subprocess.Popen(
            command, env=head_env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code == 401:  # up, and asking for the token it was started with
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the Ray head did not answer within {timeout_s} s: {self.log_tail()}")

    def log_tail(self) -> str:
        with open(os.path.join(self.temp_dir, "ray-start.log")) as fh:
            return fh.read()[-2000:]

    def stop(self) -> None:
        """SIGTERM to `ray start` (it stops the processes it started), then SIGKILL to its process
        group, then to any process still naming this head's private temp dir."""
        pgid = self.process.pid  # start_new_session: the leader's pid is the group id
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.process.wait()
        for pid in _pids_mentioning(self.temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if text.encode() in fh.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head with its dashboard and Jobs API, for the tests of one module; see RayHead."""
    head = RayHead()
    yield head
    head.stop()
