"""Job submission: command lines, deterministic ids, the once-per-work logic, and real jobs on a real
Ray head started with `ray start --head` (see RayHead in conftest.py)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import RayHead
from label_data import saved_model, spectra_file

from speclabel.core.errors import InputError, UsageError
from speclabel.jobs import submit as sub
from speclabel.jobs.cli import COMMANDS, build_parser, main
from speclabel.pipeline.publish import Dataset, new_run_id

# -- command lines --------------------------------------------------------------------------------


def test_submit_options_are_picked_out_wherever_they_stand():
    argv = ["ingest", "/d/*.fits", "--follow", "--out", "/s", "--address=http://h:8265", "--seed", "-1"]
    own, job = sub.split_submit_options(argv)
    assert own.follow and own.address == "http://h:8265" and own.submission_id is None
    assert job == ["ingest", "/d/*.fits", "--out", "/s", "--seed", "-1"]


def test_the_job_runs_the_same_command_line_with_the_clusters_speclabel(tmp_path):
    out = tmp_path / "a folder" / "survey.parquet"
    request = sub.build_request(["simulate", "--n", "3", "--out", str(out), "--seed", "4"])
    assert shlex.split(request.entrypoint) == [
        "python",
        "-m",
        "speclabel.jobs",
        "simulate",
        "--n",
        "3",
        "--out",
        str(out),
        "--seed",
        "4",
    ]


def test_usage_errors_stop_before_anything_reaches_a_cluster(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = str(tmp_path / "x.parquet")
    with pytest.raises(SystemExit) as exit_info:  # the subcommand's own parser, as on the cluster
        main(["submit", "simulate", "--n", "-1", "--out", out, "--address", "http://127.0.0.1:1"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["submit", "simulate", "--n", "1", "--out", out, "--submission-id", "my job"])
    assert exit_info.value.code == 2
    assert main(["submit", "demo", "--address", "http://127.0.0.1:1"]) == 2
    assert main(["submit", "--address", "http://127.0.0.1:1"]) == 2
    assert main(["submit", "simulate", "--n", "2", "--out", "rel/x.parquet", "--address", "http://h:1"]) == 2
    assert main(["submit", "simulate", "--n", "2", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "'demo' cannot be submitted" in err
    assert "--out rel/x.parquet: give a URI or an absolute path" in err
    assert "no cluster address" in err


def test_an_unreachable_cluster_is_a_failed_job_not_a_traceback(tmp_path, capsys):
    out = str(tmp_path / "x.parquet")
    assert main(["submit", "simulate", "--n", "2", "--out", out, "--address", "http://127.0.0.1:1"]) == 1
    assert "cannot use the Ray Jobs API at http://127.0.0.1:1" in capsys.readouterr().err


def _parser_dests(command: str) -> set[str]:
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {action.dest for action in subparsers.choices[command]._actions}


@pytest.mark.parametrize("command", [c for c in sub.JOB_LOCATIONS if c in COMMANDS])
def test_job_locations_name_real_options(command):
    locations = sub.JOB_LOCATIONS[command]
    assert set(locations["reads"]) | set(locations["writes"]) <= _parser_dests(command)


# -- the deterministic id -------------------------------------------------------------------------


def test_the_id_is_deterministic_and_changes_with_the_inputs_and_the_command_line(tmp_path):
    prior = tmp_path / "prior.csv"
    prior.write_text("Teff,logg,FeH,MgFe,AlFe\n4800,2.5,-0.3,0.1,0.05\n")
    out = str(tmp_path / "survey.parquet")
    argv = ["simulate", "--n", "4", "--out", out, "--label-prior", str(prior), "--release", "DR5"]
    first = sub.build_request(argv).submission_id
    assert re.fullmatch(r"speclabel-simulate-DR5-[0-9a-f]{16}", first)
    assert sub.build_request(argv).submission_id == first
    assert sub.build_request([*argv, "--seed", "2"]).submission_id != first
    assert sub.build_request([*argv[:4], str(tmp_path / "other.parquet"), *argv[5:]]).submission_id != first
    stat = prior.stat()
    os.utime(prior, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: may have changed
    touched = sub.build_request(argv).submission_id
    assert touched != first
    prior.write_text("Teff,logg,FeH,MgFe,AlFe\n4800,2.5,-0.3,0.1,0.06\n")  # same size, new content
    os.utime(prior, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    assert sub.build_request(argv).submission_id not in (first, touched)


def test_an_input_this_machine_cannot_read_is_refused(tmp_path):
    argv = ["simulate", "--n", "2", "--out", str(tmp_path / "x.parquet"), "--label-prior", "/nowhere/p.csv"]
    with pytest.raises(InputError, match="--submission-id"):
        sub.build_request(argv)
    # ...unless the user names the work: then nothing is read on this machine.
    assert sub.build_request(argv, identify=False).inputs == {}


def _publish(store: Dataset, release: str, rows: int) -> str:
    run_id = new_run_id()
    with store.lock(run_id):
        staged = os.path.join(store.staging_dir(run_id), f"release={release}")
        os.makedirs(staged)
        pq.write_table(
            pa.table({"spectrum_id": [f"s{i}" for i in range(rows)]}), f"{staged}/part-{run_id}-0.parquet"
        )
        store.publish(release, run_id, {"rows": rows}, {"input_fingerprint": "x"})
    return run_id


def test_a_published_store_is_fingerprinted_by_its_index(tmp_path):
    store = Dataset.open(str(tmp_path / "store"))
    run_id = _publish(store, "DR1", 3)
    index_bytes = (tmp_path / "store" / "_index.json").read_bytes()
    fingerprint = sub.input_fingerprint(str(tmp_path / "store"))
    assert fingerprint == hashlib.sha256(b"index\0" + index_bytes).hexdigest()
    # Files that are not published (a crashed run's leftovers) do not change what a job reads...
    (tmp_path / "store" / "_staging").mkdir(exist_ok=True)
    (tmp_path / "store" / "_staging" / "junk").write_text("x")
    assert sub.input_fingerprint(str(tmp_path / "store")) == fingerprint
    # ...a new publication does.
    assert _publish(store, "DR1", 4) != run_id
    assert sub.input_fingerprint(str(tmp_path / "store")) != fingerprint


def test_a_folder_is_fingerprinted_by_the_files_a_job_would_read(tmp_path):
    release = tmp_path / "releases" / "DR1"
    release.mkdir(parents=True)
    (release / "a.fits").write_bytes(b"x" * 10)
    root = str(tmp_path / "releases")
    before = sub.input_fingerprint(root)
    (release / ".partial-upload").write_bytes(b"y")  # hidden files are skipped, as the readers skip them
    assert sub.input_fingerprint(root) == before
    (tmp_path / "releases" / "DR2").mkdir()
    (tmp_path / "releases" / "DR2" / "b.fits").write_bytes(b"z" * 10)  # a new release
    assert sub.input_fingerprint(root) != before


def test_the_model_enters_the_id_through_its_model_id(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text(json.dumps({"model_id": "ens8-2026.11 v3", "members": 8}))
    assert sub.read_model_id(str(model)) == "ens8-2026.11 v3"
    request = sub.JobRequest("label", ("label",), "DR7", "ens8-2026.11 v3", {})
    assert re.fullmatch(r"speclabel-label-DR7-ens8_2026.11_v3-[0-9a-f]{16}", request.submission_id)
    assert sub.JobRequest("label", ("label",), "DR7", "ens8-v4", {}).submission_id != request.submission_id
    (model / "model.json").write_text(json.dumps({"members": 8}))
    with pytest.raises(InputError, match="no 'model_id'"):
        sub.read_model_id(str(model))
    with pytest.raises(InputError, match="cannot read the model id"):
        sub.read_model_id(str(tmp_path / "missing"))


# -- once per piece of work -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ({}, ("submit", "B")),
        ({"B": "SUCCEEDED"}, ("succeeded", "B")),
        ({"B": "RUNNING"}, ("running", "B")),
        ({"B": "PENDING"}, ("running", "B")),
        ({"B": "FAILED"}, ("submit", "B-retry1")),
        ({"B": "STOPPED"}, ("submit", "B-retry1")),
        ({"B": "FAILED", "B-retry1": "FAILED"}, ("submit", "B-retry2")),
        ({"B": "FAILED", "B-retry1": "RUNNING"}, ("running", "B-retry1")),
        ({"B": "FAILED", "B-retry1": "SUCCEEDED", "B-retry2": "FAILED"}, ("succeeded", "B-retry1")),
        # Attempts are ordered by number, not by name: retry10 follows retry9.
        ({"B": "FAILED", **{f"B-retry{n}": "FAILED" for n in range(1, 11)}}, ("submit", "B-retry11")),
        # Other work whose id merely starts alike is not an attempt of this one.
        ({"B-2": "SUCCEEDED", "B-retry1x": "SUCCEEDED", "XB": "RUNNING"}, ("submit", "B")),
    ],
)
def test_decide(statuses, expected):
    decision = sub.decide("B", statuses)
    assert (decision.action, decision.submission_id) == expected


def test_a_token_without_ray_auth_mode_is_still_sent(tmp_path, monkeypatch):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.ray/auth_token
    assert sub.auth_headers() == {}
    token_file = tmp_path / "auth_token"
    token_file.write_text("s3cr3t\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert sub.auth_headers() == {"Authorization": "Bearer s3cr3t"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "fromenv")  # Ray's precedence: the variable before the file
    assert sub.auth_headers() == {"Authorization": "Bearer fromenv"}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # then Ray's client sends it itself
    assert sub.auth_headers() == {}
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="RAY_AUTH_TOKEN_PATH"):
        sub.auth_headers()


def test_the_token_ray_start_left_in_the_home_folder_is_used(tmp_path, monkeypatch, caplog):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("fromhome\n")
    with caplog.at_level("INFO", logger="speclabel.jobs.submit"):
        assert sub.auth_headers() == {"Authorization": "Bearer fromhome"}
    assert "using the Ray auth token in ~/.ray/auth_token" in caplog.text
    assert sub.auth_token()[1].startswith("~/.ray/auth_token")
    # Anything given explicitly comes first.
    other = tmp_path / "other_token"
    other.write_text("fromfile\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(other))
    assert sub.auth_headers() == {"Authorization": "Bearer fromfile"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "fromenv")
    assert sub.auth_headers() == {"Authorization": "Bearer fromenv"}


def test_job_table_lists_speclabel_jobs_oldest_first():
    from ray.dashboard.modules.job.pydantic_models import JobDetails

    def job(submission_id, status, start, end, metadata, message=None):
        return JobDetails(
            type="SUBMISSION",
            submission_id=submission_id,
            status=status,
            entrypoint=f"python -m speclabel.jobs {submission_id} --n 1",
            start_time=start,
            end_time=end,
            metadata=metadata,
            message=message,
        )

    jobs = [
        job("b", "FAILED", 1_764_000_100_000, 1_764_000_165_000, {"speclabel_command": "label"}, "exit 1"),
        job("a", "SUCCEEDED", 1_764_000_000_000, 1_764_003_725_000, {"speclabel_command": "ingest"}),
        job("other", "RUNNING", 1_764_000_050_000, None, {}),
    ]
    rows = sub.job_table(jobs)
    assert [r["submission_id"] for r in rows] == ["a", "b"]
    assert rows[0]["duration"] == "1:02:05" and rows[1]["duration"] == "0:01:05"
    assert rows[0]["started"] == "2025-11-24 16:00:00"
    assert rows[0]["command"] == "a --n 1"
    assert (rows[0]["message"], rows[1]["message"]) == ("", "exit 1")
    assert [r["submission_id"] for r in sub.job_table(jobs, include_all=True)] == ["a", "other", "b"]


# -- real jobs on a real Ray head -----------------------------------------------------------------


@pytest.mark.ray
def test_token_auth_from_ray_auth_token_path(tmp_path, capsys, monkeypatch):
    # Its own head, started before the module's head so that the two do not share the 2 cores.
    token = "speclabel-test-" + os.urandom(12).hex()
    head = RayHead(num_cpus=1, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    try:
        for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            monkeypatch.delenv(name, raising=False)
        home = tmp_path / "home"
        monkeypatch.setenv("HOME", str(home))
        assert main(["jobs", "--address", head.address]) == 1
        err = capsys.readouterr().err
        assert "Authentication required" in err and "RAY_AUTH_TOKEN_PATH" in err
        assert "no token was found in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token" in err
        assert "Traceback" not in err
        # A wrong token in the default file: the message says where the token came from.
        (home / ".ray").mkdir(parents=True)
        (home / ".ray" / "auth_token").write_text("wrong\n")
        assert main(["jobs", "--address", head.address]) == 1
        assert "the token sent came from ~/.ray/auth_token" in capsys.readouterr().err
        # As `ray start` leaves it: the default file holds the cluster's token.
        (home / ".ray" / "auth_token").write_text(token + "\n")
        assert main(["jobs", "--address", head.address]) == 0
        assert "no speclabel jobs" in capsys.readouterr().out
        token_file = tmp_path / "auth_token"
        token_file.write_text(token + "\n")
        (home / ".ray" / "auth_token").unlink()
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
        assert main(["jobs", "--address", head.address]) == 0
        assert "no speclabel jobs" in capsys.readouterr().out
    finally:
        head.stop()


def _jobs(address: str) -> dict:
    return {job.submission_id: job for job in sub.list_jobs(sub.connect(address))}


@pytest.mark.ray
def test_submit_runs_the_job_once_and_follows_it(ray_head, tmp_path, capsys, monkeypatch):
    out = tmp_path / "survey.parquet"
    job_argv = ["simulate", "--n", "3", "--out", str(out), "--workers", "1"]
    # submit's own options in the middle and at the end of the job's options
    argv = ["submit", *job_argv[:3], "--follow", *job_argv[3:], "--address", ray_head.address]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "simulate: wrote 3 spectra" in stdout  # the job's own log, streamed by --follow
    assert pq.read_table(out).num_rows == 3
    expected_id = sub.build_request(job_argv).submission_id
    jobs = _jobs(ray_head.address)
    assert list(jobs) == [expected_id]
    job = jobs[expected_id]
    assert str(job.status) == "SUCCEEDED"
    assert job.entrypoint == shlex.join(["python", "-m", "speclabel.jobs", *job_argv])
    assert not (job.runtime_env or {}).get("working_dir")  # nothing was uploaded
    assert job.metadata["speclabel_command"] == "simulate" and job.metadata["release"] == "SIM"

    # The same work again does nothing, and an explicit --address wins over a stale RAY_ADDRESS.
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    written = out.stat().st_mtime_ns
    assert main(argv) == 0
    assert f"{expected_id} already succeeded" in capsys.readouterr().out
    assert list(_jobs(ray_head.address)) == [expected_id]
    assert out.stat().st_mtime_ns == written

    monkeypatch.setenv("RAY_ADDRESS", ray_head.address)  # `speclabel jobs` defaults to RAY_ADDRESS
    assert main(["jobs"]) == 0
    listing = capsys.readouterr().out
    assert re.search(rf"^{re.escape(expected_id)}\s+SUCCEEDED\s.*simulate --n 3", listing, re.M)


@pytest.mark.ray
def test_a_failed_job_is_resubmitted_as_a_retry(ray_head, tmp_path, capsys):
    blocked = tmp_path / "out"
    blocked.write_text("a file where the output folder should be")
    out = blocked / "survey.parquet"
    argv = ["submit", "simulate", "--n", "2", "--out", str(out), "--workers", "1", "--follow"]
    argv += ["--address", ray_head.address]
    base_id = sub.build_request(argv[1:8]).submission_id

    assert main(argv) == 1  # --follow: exit 0 exactly when the job succeeded
    assert f"job {base_id} ended FAILED" in capsys.readouterr().err

    blocked.unlink()
    blocked.mkdir()
    assert main(argv) == 0
    assert f"submitted {base_id}-retry1" in capsys.readouterr().out
    assert pq.read_table(out).num_rows == 2
    statuses = {k: str(v.status) for k, v in _jobs(ray_head.address).items() if k.startswith(base_id)}
    assert statuses == {base_id: "FAILED", f"{base_id}-retry1": "SUCCEEDED"}

    assert main(argv) == 0
    assert f"{base_id}-retry1 already succeeded" in capsys.readouterr().out


@pytest.mark.ray
def test_a_submitted_label_job_publishes_the_catalogue(ray_head, tmp_path, tiny_setup, capsys):
    model, ensemble = saved_model(tiny_setup, tmp_path / "model")
    spectra = spectra_file(tiny_setup, tmp_path / "spectra.parquet", n=10, seed=5, release="DR3")
    catalogue = tmp_path / "catalogue"
    job_argv = ["label", "--spectra", str(tmp_path / "spectra.parquet"), "--model", model]
    # Default pool sizing on a 2-CPU head, one CPU of which the job's driver holds.
    job_argv += ["--out", str(catalogue), "--saliency", "none", "--batch-size", "8", "--quiet"]
    argv = ["submit", *job_argv, "--follow", "--address", ray_head.address]
    assert main(argv) == 0
    assert "label: release DR3 published" in capsys.readouterr().out  # the job's log, followed
    submission_id = sub.build_request(job_argv).submission_id
    assert submission_id.startswith(f"speclabel-label-{ensemble.model_id}-")
    assert str(_jobs(ray_head.address)[submission_id].status) == "SUCCEEDED"

    dataset = Dataset.open(str(catalogue))
    entry = dataset.release_entry("DR3")
    assert entry["model_id"] == ensemble.model_id and entry["rows"] == 10
    live = pads.dataset(str(catalogue), partitioning="hive").to_table()
    assert sorted(live.column("spectrum_id").to_pylist()) == sorted(spectra.column("spectrum_id").to_pylist())
    assert dataset.manifest("DR3", entry["run_id"])["counts"]["labelled"] == 10

    index = dataset.index()
    assert main(argv) == 0  # the same work again: not run again
    assert f"{submission_id} already succeeded" in capsys.readouterr().out
    assert Dataset.open(str(catalogue)).index() == index
