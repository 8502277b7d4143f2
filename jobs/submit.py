"""Submit speclabel jobs to a Ray cluster through the Ray Jobs API, once per distinct piece of work.

A submitted job runs ``python -m speclabel.jobs <command> <options>`` on the cluster, with the
interpreter and the speclabel installed there (``cluster.yaml`` installs it on every node). Nothing
is uploaded from the submitting machine: its working directory may be huge, and the cluster must run
the speclabel it was set up with.

The submission id is deterministic::

    speclabel-<command>[-<release>][-<model_id>]-<digest>

where ``digest`` is a sha256 over the command line, the release, the model id (``model_id`` in
``MODEL_DIR/model.json``) and a fingerprint of each input (:func:`input_fingerprint`). The same work
submitted twice gets the same id: if a job with that id already succeeded the submission is a no-op;
if it failed or was stopped, the work is resubmitted as ``<id>-retry<N>``.

Ray keeps the job table in the head node's GCS, so it lasts as long as the cluster: on a new cluster
a job runs again, which is safe because every job publishes atomically and idempotently.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import getpass
import hashlib
import json
import logging
import os
import re
import shlex
import socket
import sys
import time
from collections.abc import Iterator, Mapping

import pyarrow.fs as pafs

from speclabel.core.errors import ConfigError, InputError, SpeclabelError, UsageError
from speclabel.core.fingerprints import files_fingerprint
from speclabel.core.storage import filesystem_and_path, is_local, join, read_json, resolve_files
from speclabel.pipeline.publish import INDEX

logger = logging.getLogger(__name__)

ID_PREFIX = "speclabel"

# What each submittable subcommand reads and writes, by argparse dest (``--spectra`` -> spectra).
# Read locations are fingerprinted into the submission id, so a job whose inputs changed runs again
# although its command line did not; ``model`` enters through its model_id. Every listed location must
# be a URI or an absolute path, because the job resolves it on the cluster, not in this folder.
# Anything else on the command line (batch sizes, epochs, ...) enters the id verbatim.
JOB_LOCATIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {"reads": ("data", "config", "reference_spectra"), "writes": ("out", "storage")},
    "ingest": {"reads": ("input",), "writes": ("out",)},
    "label": {"reads": ("spectra", "model"), "writes": ("out",)},
    "reprocess": {"reads": ("releases", "model"), "writes": ("store", "catalogue")},
    "simulate": {"reads": ("label_prior",), "writes": ("out",)},
}

# Ray's JobStatus values, as plain strings so that the retry logic is testable without a cluster.
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
STOPPED = "STOPPED"
TERMINAL = frozenset({SUCCEEDED, FAILED, STOPPED})


class ClusterError(SpeclabelError):
    """The Ray Jobs API could not be reached or refused a request."""


class JobFailedError(SpeclabelError):
    """A followed job ended in a state other than SUCCEEDED."""


# -- what to submit -------------------------------------------------------------------------------


def add_submit_options(parser: argparse.ArgumentParser) -> None:
    """submit's own options; also used to pick them out from anywhere in the job's command line."""
    parser.add_argument(
        "--address",
        help="Ray dashboard / Jobs API address, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)",
    )
    parser.add_argument(
        "--follow",
        action="store_true",
        help="stream the job's logs until it ends; exit 0 exactly when it succeeded",
    )
    parser.add_argument(
        "--submission-id",
        metavar="ID",
        type=submission_id_type,
        help="use ID instead of the deterministic id (for inputs this machine cannot read)",
    )


def submission_id_type(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,120}", text):
        raise argparse.ArgumentTypeError(f"use letters, digits, '_', '.' and '-' only, got {text!r}")
    return text


def split_submit_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Separate submit's own options, wherever they stand, from the job's command line (kept in order)."""
    own = argparse.ArgumentParser(prog="speclabel submit", add_help=False, allow_abbrev=False)
    add_submit_options(own)
    return own.parse_known_args(argv)


@dataclasses.dataclass(frozen=True)
class JobRequest:
    """One unit of work to run on the cluster."""

    command: str
    argv: tuple[str, ...]  # the job's command line after ``speclabel``, starting with the command
    release: str | None
    model_id: str | None
    inputs: Mapping[str, str]  # dest -> fingerprint

    @property
    def entrypoint(self) -> str:
        """The shell command the cluster runs: the cluster's own interpreter and speclabel."""
        return shlex.join(["python", "-m", "speclabel.jobs", *self.argv])

    @property
    def submission_id(self) -> str:
        key = {
            "command": self.command,
            "argv": list(self.argv),
            "release": self.release,
            "model_id": self.model_id,
            "inputs": dict(self.inputs),
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        readable = [self.command, self.release, self.model_id]
        return "-".join([ID_PREFIX, *(_id_safe(part) for part in readable if part), digest])

    def metadata(self) -> dict[str, str]:
        """Stored with the job on the cluster; ``speclabel jobs`` lists jobs that carry it."""
        from importlib.metadata import version

        fields = {
            "speclabel_command": self.command,
            "speclabel_version": version("speclabel"),
            "release": self.release or "",
            "model_id": self.model_id or "",
            "inputs": json.dumps(dict(self.inputs), sort_keys=True),
            "submitted_by": f"{getpass.getuser()}@{socket.gethostname()}",
        }
        return {key: value for key, value in fields.items() if value}


def _id_safe(text: str) -> str:
    # Ray uses the submission id in log file names and URLs.
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_")[:40] or "_"


def build_request(job_argv: list[str], identify: bool = True) -> JobRequest:
    """Check the job's command line as the cluster will parse it and derive its identity.

    Usage errors surface here, before anything reaches the cluster (argparse exits 2). With
    ``identify=False`` (an id given by the user) the inputs and the model are not read.
    """
    from .cli import build_parser

    if not job_argv:
        raise UsageError(f"name the job to submit, one of: {', '.join(submittable_commands())}")
    command = job_argv[0]
    if command not in submittable_commands():
        raise UsageError(
            f"'{command}' cannot be submitted; submittable commands: {', '.join(submittable_commands())}"
        )
    args = build_parser().parse_args(job_argv)
    locations = JOB_LOCATIONS[command]
    missing = [dest for dest in (*locations["reads"], *locations["writes"]) if not hasattr(args, dest)]
    if missing:  # JOB_LOCATIONS and the subcommand's options disagree: a speclabel bug, not the user's
        raise ConfigError(f"speclabel {command} has no option for {missing}; update JOB_LOCATIONS")
    for dest in (*locations["reads"], *locations["writes"]):
        for value in _values(getattr(args, dest)):
            if is_local(value) and not os.path.isabs(value.removeprefix("file://")):
                raise UsageError(
                    f"--{dest.replace('_', '-')} {value}: give a URI or an absolute path; the job "
                    "runs on the cluster, not in this folder"
                )
    inputs = {}
    model_id = None
    for dest in locations["reads"] if identify else ():
        values = _values(getattr(args, dest))
        if dest == "model" and values:
            model_id = read_model_id(values[0])
        elif values:
            inputs[dest] = ",".join(input_fingerprint(value) for value in values)
    release = getattr(args, "release", None)
    return JobRequest(command, tuple(job_argv), release, model_id, inputs)


def submittable_commands() -> list[str]:
    from .cli import COMMANDS

    return [name for name in COMMANDS if name in JOB_LOCATIONS]


def _values(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def read_model_id(model_dir: str) -> str:
    """The ``model_id`` string of ``MODEL_DIR/model.json``."""
    fs, root = filesystem_and_path(model_dir)
    path = join(root, "model.json")
    try:
        model_id = read_json(fs, path).get("model_id")
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(
            f"cannot read the model id from {model_dir}/model.json on this machine ({exc}); the "
            "submission id needs it (or pass --submission-id)"
        ) from exc
    if not isinstance(model_id, str) or not model_id:
        raise InputError(f"{model_dir}/model.json has no 'model_id' string")
    return model_id


def input_fingerprint(location: str) -> str:
    """A sha256 that changes when what a job would read at ``location`` changes.

    A published dataset (a folder with ``_index.json``, e.g. a spectra store) changes only through its
    index, so the index's bytes are the fingerprint. Anything else (a file, a folder of FITS or
    Parquet files, a glob) is fingerprinted by the sorted paths, sizes and modification times of the
    files a job would read (names starting with ``_`` or ``.`` are skipped, as the readers skip them).
    Contents are not read: hashing terabytes of spectra on every submission would cost more than
    the job.
    """
    fs, path = filesystem_and_path(location)
    try:
        info = fs.get_file_info(path)
        if (
            info.type == pafs.FileType.Directory
            and fs.get_file_info(join(path, INDEX)).type == pafs.FileType.File
        ):
            with fs.open_input_stream(join(path, INDEX)) as fh:
                return hashlib.sha256(b"index\0" + fh.read()).hexdigest()
        fs, files = resolve_files(location, ())
        infos = fs.get_file_info(files)
    except InputError as exc:
        raise InputError(
            f"{exc}; the submission id fingerprints every input, so it must be readable from this "
            "machine (or pass --submission-id)"
        ) from exc
    except OSError as exc:
        raise InputError(f"cannot read input {location!r} from this machine: {exc}") from exc
    return files_fingerprint((entry.path, entry.size, entry.mtime_ns) for entry in infos)


# -- talking to the cluster -----------------------------------------------------------------------


def cluster_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UsageError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    return address


@contextlib.contextmanager
def _address_from_argument_only() -> Iterator[None]:
    # JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its address argument;
    # an explicit --address must win over a stale variable in a cron environment.
    saved = {
        name: os.environ.pop(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if name in os.environ
    }
    try:
        yield
    finally:
        os.environ.update(saved)


# Where `ray start` (with token auth) and `ray get-auth-token --generate` keep the token; Ray's own
# client reads it only under RAY_AUTH_MODE=token.
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"


def auth_token() -> tuple[str, str]:
    """``(token, where it came from)``, in Ray's order: ``RAY_AUTH_TOKEN``, else the file
    ``RAY_AUTH_TOKEN_PATH`` names, else :data:`DEFAULT_TOKEN_FILE` when it exists; ``("", "")``
    when none is configured."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token_path:
        try:
            with open(os.path.expanduser(token_path)) as fh:
                return fh.read().strip(), f"RAY_AUTH_TOKEN_PATH={token_path}"
        except OSError as exc:
            raise UsageError(f"RAY_AUTH_TOKEN_PATH={token_path} cannot be read: {exc}") from exc
    default = os.path.expanduser(DEFAULT_TOKEN_FILE)
    if os.path.isfile(default):
        with open(default) as fh:
            token = fh.read().strip()
        if token:
            return (
                token,
                f"{DEFAULT_TOKEN_FILE} (Ray's default token file; RAY_AUTH_TOKEN_PATH names another)",
            )
    return "", ""


def auth_headers() -> dict[str, str]:
    """A bearer token header when a token is configured but ``RAY_AUTH_MODE`` is not set.

    Ray's client sends its token only under ``RAY_AUTH_MODE=token``; a scheduler given just
    ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``, or a user whose ``ray start`` left the token in
    :data:`DEFAULT_TOKEN_FILE`, would otherwise get a bare 401. When ``RAY_AUTH_MODE`` is set,
    Ray's own handling applies unchanged.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return {}
    token, source = auth_token()
    if token and source.startswith(DEFAULT_TOKEN_FILE):
        logger.info("using the Ray auth token in %s", source)
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextlib.contextmanager
def cluster_errors(what: str) -> Iterator[None]:
    """Turn the Jobs API client's failures into :class:`ClusterError`: exit 1 with a message."""
    from ray.exceptions import AuthenticationError, RayError

    try:
        yield
    except AuthenticationError as exc:
        reason = str(exc).strip().splitlines()[0]
        token, source = "", ""
        with contextlib.suppress(UsageError):  # an unreadable RAY_AUTH_TOKEN_PATH failed before this
            token, source = auth_token()
        sent = (
            f"the token sent came from {source}"
            if token
            else f"no token was found in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or {DEFAULT_TOKEN_FILE}"
        )
        raise ClusterError(
            f"{what}: {reason}; {sent}; give the cluster's token (`ray get-auth-token` on the head) in "
            "the file named by RAY_AUTH_TOKEN_PATH, or in RAY_AUTH_TOKEN"
        ) from exc
    except (ConnectionError, RuntimeError, ValueError, RayError) as exc:
        raise ClusterError(f"{what}: {exc}") from exc


def connect(address: str | None):
    """A JobSubmissionClient for ``address`` (default ``$RAY_ADDRESS``), with token auth."""
    from ray.job_submission import JobSubmissionClient

    address = cluster_address(address)
    headers = auth_headers()
    with _address_from_argument_only(), cluster_errors(f"cannot use the Ray Jobs API at {address}"):
        return JobSubmissionClient(address, headers=headers or None)


def list_jobs(client) -> list:
    """Every job the cluster knows (Ray's JobDetails)."""
    with cluster_errors("listing jobs failed"):
        return client.list_jobs()


def job_statuses(client) -> dict[str, str]:
    """submission id -> status of every job the cluster knows."""
    return {job.submission_id: str(job.status) for job in list_jobs(client) if job.submission_id}


# -- the once-per-work logic ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do about a submission: ``submit`` it under ``submission_id``, or nothing because an
    attempt ``succeeded`` or is ``running`` (pending or running) under ``submission_id``."""

    action: str
    submission_id: str


def attempts(base_id: str, statuses: Mapping[str, str]) -> list[tuple[int, str, str]]:
    """(attempt number, submission id, status) of ``base_id`` (attempt 0) and its ``-retry<N>``."""
    pattern = re.compile(re.escape(base_id) + r"(?:-retry(\d+))?")
    found = []
    for submission_id, status in statuses.items():
        match = pattern.fullmatch(submission_id)
        if match:
            found.append((int(match.group(1) or 0), submission_id, status))
    return sorted(found)


def decide(base_id: str, statuses: Mapping[str, str]) -> Decision:
    tries = attempts(base_id, statuses)
    for _, submission_id, status in tries:
        if status == SUCCEEDED:
            return Decision("succeeded", submission_id)
    for _, submission_id, status in tries:
        if status not in TERMINAL:
            return Decision("running", submission_id)
    if not tries:
        return Decision("submit", base_id)
    return Decision("submit", f"{base_id}-retry{tries[-1][0] + 1}")


def submit(client, request: JobRequest, submission_id: str | None = None) -> Decision:
    """Submit ``request`` unless an attempt of it succeeded or is under way; returns what happened."""
    base_id = submission_id or request.submission_id
    for _ in range(2):
        decision = decide(base_id, job_statuses(client))
        if decision.action != "submit":
            return decision
        try:
            with cluster_errors(f"submitting {decision.submission_id} failed"):
                client.submit_job(
                    entrypoint=request.entrypoint,
                    submission_id=decision.submission_id,
                    metadata={**request.metadata(), "speclabel_id": base_id},
                    # The driver only orchestrates: one CPU, never a GPU slot a labeller could use.
                    entrypoint_num_cpus=1,
                )
            return decision
        except ClusterError as exc:
            if "already exists" not in str(exc):
                raise
            # Another submitter took this id between our listing and our submission: look again.
    raise ClusterError(f"{base_id}: concurrent submissions keep taking the next attempt id")


def follow(client, submission_id: str, out=None, poll_s: float = 1.0) -> str:
    """Stream the job's logs to ``out`` (default stdout) until it ends; returns its final status."""
    out = out or sys.stdout

    async def stream() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(stream())
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (ray job stop {submission_id})", file=sys.stderr)
        raise
    except Exception as exc:  # the log stream is a convenience: the job's status is what counts
        logger.warning("log stream of %s ended early (%s); waiting for the job to finish", submission_id, exc)
    while (status := job_status(client, submission_id)) not in TERMINAL:
        time.sleep(poll_s)
    return status


def job_status(client, submission_id: str) -> str:
    with cluster_errors(f"status of {submission_id}"):
        return str(client.get_job_status(submission_id))


def job_message(client, submission_id: str) -> str:
    """Ray's account of how the job ended, e.g. the driver's exit code and last log lines."""
    with cluster_errors(f"details of {submission_id}"):
        return client.get_job_info(submission_id).message or "no message"


# -- listing --------------------------------------------------------------------------------------


def job_table(jobs, include_all: bool = False) -> list[dict[str, str]]:
    """Rows for ``speclabel jobs``: speclabel's jobs (or all), oldest first."""
    rows = []
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        metadata = job.metadata or {}
        if not include_all and "speclabel_command" not in metadata:
            continue
        status = str(job.status)
        rows.append(
            {
                "submission_id": job.submission_id or job.job_id or "",
                "status": status,
                "started": _utc(job.start_time),
                "duration": _duration(job.start_time, job.end_time),
                "command": job.entrypoint.removeprefix("python -m speclabel.jobs "),
                "message": (job.message or "") if status in (FAILED, STOPPED) else "",
            }
        )
    return rows


def _utc(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _duration(start_ms: int | None, end_ms: int | None) -> str:
    if not start_ms:
        return "-"
    seconds = int(((end_ms or time.time() * 1000) - start_ms) / 1000)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
