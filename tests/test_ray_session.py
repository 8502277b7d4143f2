"""pipeline.ray_session: a dead `ray start` cluster that Ray still records is found within seconds.

Ray's record lives under RAY_TMPDIR here (a private folder), never in the shared /tmp/ray."""

from __future__ import annotations

import socket

import pytest

from speclabel.core.errors import SpeclabelError
from speclabel.jobs.cli import main
from speclabel.pipeline import ray_session as session


@pytest.fixture
def record(tmp_path, monkeypatch):
    """Write Ray's recorded-cluster file in a private temp dir; returns a function of the address."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = tmp_path / "ray" / "ray_current_cluster"
    assert session.recorded_cluster_file() == str(path)  # where Ray itself reads it

    def write(address: str) -> None:
        path.parent.mkdir(exist_ok=True)
        path.write_text(address + "\n")

    return write


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_dead_recorded_cluster_fails_fast_with_what_to_do(record):
    port = closed_port()
    record(f"127.0.0.1:{port}")
    with pytest.raises(SpeclabelError) as info:
        session.check_recorded_cluster(None)
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "ray_current_cluster" in message
    assert "ray start --head" in message and "ray stop" in message and "--address local" in message
    with pytest.raises(SpeclabelError):
        session.check_recorded_cluster("auto")  # auto reads the record too


def test_a_live_recorded_cluster_and_explicit_addresses_pass(record, monkeypatch):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        record(f"127.0.0.1:{listener.getsockname()[1]}")
        session.check_recorded_cluster(None)
    record(f"127.0.0.1:{closed_port()}")
    session.check_recorded_cluster("local")  # Ray does not read the record for these
    session.check_recorded_cluster("10.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    session.check_recorded_cluster(None)


def test_no_record_passes(record):
    session.check_recorded_cluster(None)


def test_commands_fail_before_ray_init(record, monkeypatch, tmp_path, capsys):
    """Through the one place every command connects: Ray is never asked to join the dead head."""
    import ray

    record(f"127.0.0.1:{closed_port()}")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def init(**kwargs):
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(SpeclabelError, match="nothing answers there"), session.ray_session():
        pass
    # `ingest` of real FITS files reaches ray_session; the job fails with exit 1 and the message.
    assert (
        main(["simulate", "--n", "1", "--format", "fits", "--out", str(tmp_path / "sim"), "--workers", "1"])
        == 0
    )
    store = tmp_path / "store"
    assert main(["ingest", str(tmp_path / "sim" / "spectra"), "--out", str(store), "--release", "R"]) == 1
    assert "its head has stopped or died" in capsys.readouterr().err
