"""The dataset lock (pipeline/lock.py) with many processes at once, on a local folder and on an
S3-compatible server started here (moto's server mode): exactly one taker wins, also when they race
for a stale lock; a lock whose heartbeat stopped is taken over after its timeout, a live one never."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time

import pytest

from speclabel.pipeline.lock import DatasetLock
from speclabel.pipeline.publish import Dataset, LockedError

TAKERS = 8
ROUNDS = 4  # even rounds: no lock there; odd rounds: a stale one left by a dead run
BUCKET = "speclabel-lock-test"


class _OneRequestAtATime:
    """S3 applies each conditional write atomically. moto checks the precondition and stores the
    object in two steps, so two requests on its threaded server could both pass the check: serving
    one request at a time gives the test the store's real guarantee (and only that)."""

    def __init__(self, app) -> None:
        self.app, self.lock = app, threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            return list(self.app(environ, start_response))


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 on 127.0.0.1 at a free port, as ``moto.server.ThreadedMotoServer`` runs it."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app = _OneRequestAtATime(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the takers are started with this environment
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.shutdown()
    thread.join()


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "catalogue")
    request.getfixturevalue("s3_server")
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}-{time.time_ns()}"


def _take(location: str, index: int, start, tried, checked, released, results) -> None:
    """One taker process: in each round, try once when all are ready; hold until all have tried and
    the test has looked at the lock."""
    dataset = Dataset.open(location)
    for round_ in range(ROUNDS):
        lock = dataset.lock(f"round{round_}-taker{index}", stale_after_s=60)
        start.wait()
        try:
            lock.acquire()
            results.put((round_, index, "won"))
        except LockedError as exc:
            results.put((round_, index, str(exc)))
            lock = None
        tried.wait()
        checked.wait()
        if lock is not None:
            lock.release()
        released.wait()


def _plant_stale_lock(dataset: Dataset) -> None:
    long_ago = time.time() - 3600
    record = {"run_id": "dead-run", "host": "gone", "pid": 1, "user": "x", "timeout_s": 60.0}
    with dataset.fs.open_output_stream(dataset.path("_lock")) as out:
        out.write(json.dumps({**record, "acquired_at": long_ago, "renewed_at": long_ago}).encode())


def test_exactly_one_of_many_processes_takes_the_lock(location):
    dataset = Dataset.open(location)
    dataset.fs.create_dir(dataset.root, recursive=True)
    context = multiprocessing.get_context("spawn")  # no fork of a process that runs server threads
    barriers = [context.Barrier(TAKERS + 1) for _ in range(4)]
    start, tried, checked, released = barriers
    results = context.Queue()
    takers = [context.Process(target=_take, args=(location, i, *barriers, results)) for i in range(TAKERS)]
    for taker in takers:
        taker.start()
    try:
        for round_ in range(ROUNDS):
            if round_ % 2:
                _plant_stale_lock(dataset)
            start.wait(timeout=120)
            tried.wait(timeout=120)
            outcomes = dict(results.get(timeout=30)[1:] for _ in range(TAKERS))
            winners = [i for i, outcome in outcomes.items() if outcome == "won"]
            assert len(winners) == 1, (round_, outcomes)
            holder = dataset.lock_holder()
            assert holder["run_id"] == f"round{round_}-taker{winners[0]}"
            assert holder["pid"] != os.getpid() and holder["acquired_at"] <= holder["renewed_at"]
            for i, outcome in outcomes.items():
                if i != winners[0]:
                    assert f"locked by run round{round_}-taker{winners[0]}" in outcome
            checked.wait(timeout=120)
            released.wait(timeout=120)
            assert dataset.lock_holder() is None  # the winner gave it back
    except BaseException:
        for barrier in barriers:  # a failed check must not leave the takers waiting
            barrier.abort()
        raise
    finally:
        for taker in takers:
            taker.join(timeout=30)
            if taker.is_alive():
                taker.kill()
    assert [taker.exitcode for taker in takers] == [0] * TAKERS


def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(location):
    dataset = Dataset.open(location)
    timeout = 1.5
    with dataset.lock("holder", stale_after_s=timeout) as holder:
        time.sleep(2 * timeout)  # two timeouts after taking it: renewed meanwhile, so live
        with pytest.raises(LockedError, match=r"locked by run holder \(pid .* renewed [01] s ago"):
            dataset.lock("taker", stale_after_s=timeout).acquire()
        holder._stop_heartbeat()  # as if its process had been killed
        renewed = dataset.lock_holder()["renewed_at"]
        while time.time() - renewed < timeout / 2:  # not yet stale, though nothing renews it
            with pytest.raises(LockedError):
                dataset.lock("early", stale_after_s=timeout).acquire()
            time.sleep(0.1)
        time.sleep(max(0.0, renewed + timeout - time.time()))
        with dataset.lock("taker", stale_after_s=timeout) as taker:
            assert taker.took_over["run_id"] == "holder"
            assert dataset.lock_holder()["run_id"] == "taker"
            with pytest.raises(LockedError, match=r"run holder lost the lock .* locked by run taker"):
                holder.renew()  # the old holder, should it wake, learns it lost the lock
            time.sleep(2 * timeout)
            taker.check()  # its own heartbeat kept it
        assert dataset.lock_holder() is None
    assert dataset.lock_holder() is None  # the old holder's exit removed nothing of the taker's


def test_a_holder_whose_lock_was_taken_over_stops(location):
    dataset = Dataset.open(location)
    with dataset.lock("first", stale_after_s=0.4) as first:
        # Someone removes the lock (its run looked dead) and another run takes it: the first run's
        # next heartbeat finds it gone, and the run stops where it checks, before it publishes.
        dataset.fs.delete_file(dataset.path("_lock"))
        second = dataset.lock("second", stale_after_s=60)
        second.acquire()
        deadline = time.time() + 30
        while first._lost is None and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(LockedError, match=r"run first lost the lock .* locked by run second"):
            first.check()
    assert dataset.lock_holder()["run_id"] == "second"  # the first run's exit left it alone
    second.release()


def test_the_lock_file_says_who_holds_it_since_when(tmp_path):
    dataset = Dataset.open(str(tmp_path))
    before = time.time()
    with dataset.lock("20261125T101500Z-3f2a9c1d", stale_after_s=120):
        held = json.loads((tmp_path / "_lock").read_text())
    assert set(held) == {"run_id", "host", "pid", "user", "acquired_at", "renewed_at", "timeout_s"}
    assert held["run_id"] == "20261125T101500Z-3f2a9c1d" and held["pid"] == os.getpid()
    assert before <= held["acquired_at"] <= held["renewed_at"] <= time.time()
    assert held["timeout_s"] == 120
    assert not (tmp_path / "_lock").exists()


def test_a_lock_of_the_old_format_is_judged_by_its_age(tmp_path):
    dataset = Dataset.open(str(tmp_path))
    old = {"run_id": "old", "host": "h", "pid": 1, "user": "u", "acquired_at": time.time() - 30}
    (tmp_path / "_lock").write_text(json.dumps(old))
    with pytest.raises(LockedError, match="locked by run old"):
        dataset.lock("new", stale_after_s=60).acquire()
    lock = DatasetLock(dataset.fs, dataset.path("_lock"), "new", timeout_s=10)
    lock.acquire()
    assert lock.took_over["run_id"] == "old"
    lock.release()
