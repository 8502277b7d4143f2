"""Submit a speclabel job to a Ray cluster through the Ray Jobs API.

    speclabel submit label --spectra s3://survey/store --model s3://survey/models/v3 \\
        --out s3://survey/catalogue --release DR7 --follow

Everything after the job's name is that subcommand's own command line, checked here exactly as the
cluster will parse it; submit's own options (--address, --follow, --submission-id) may stand
anywhere. The job runs `python -m speclabel.jobs COMMAND OPTIONS` with the speclabel installed on
the cluster: nothing is uploaded from here, so give input and output locations as URIs or absolute
paths the cluster can see.

The submission id is deterministic: speclabel-COMMAND[-RELEASE][-MODEL_ID]-DIGEST, the digest taken
over the command line, the release, the model's model_id and a fingerprint of every input (a
published store's _index.json; otherwise the paths, sizes and modification times of the input
files). If a job with that id already succeeded, submit says so and exits 0 without running it
again; if it is still pending or running, submit does not start a second one; if it failed or was
stopped, submit resubmits it as ID-retryN.

Without --follow, submit exits 0 once the job is accepted. With --follow it streams the job's logs
and exits 0 exactly when the job succeeded, 1 otherwise.

Authentication: with Ray token auth, export RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (a file holding
the token, as printed by `ray get-auth-token`), optionally with RAY_AUTH_MODE=token.
"""

from __future__ import annotations

import argparse

HELP = "submit train / ingest / label / reprocess to a Ray cluster, once per distinct piece of work"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..submit import add_submit_options

    add_submit_options(parser)
    parser.add_argument(
        "job",
        nargs=argparse.REMAINDER,
        metavar="COMMAND [OPTIONS]",
        help="the subcommand to run on the cluster and its own options",
    )


def run(args: argparse.Namespace) -> int:
    from ..submit import (
        SUCCEEDED,
        JobFailedError,
        build_request,
        connect,
        follow,
        job_message,
        split_submit_options,
        submit,
    )

    own, job_argv = split_submit_options(args.job)
    address = own.address or args.address
    follow_logs = own.follow or args.follow
    submission_id = own.submission_id or args.submission_id
    request = build_request(job_argv, identify=submission_id is None)
    client = connect(address)
    decision = submit(client, request, submission_id)
    job = decision.submission_id
    if decision.action == "succeeded":
        print(f"submit: {job} already succeeded; not running it again")
        return 0
    if decision.action == "running":
        print(f"submit: {job} is already pending or running; not starting another")
    else:
        print(f"submit: submitted {job}: {request.entrypoint}")
    if not follow_logs:
        print(f"submit: follow it with `ray job logs --follow {job}` or list jobs with `speclabel jobs`")
        return 0
    status = follow(client, job)
    if status != SUCCEEDED:
        raise JobFailedError(f"job {job} ended {status}: {job_message(client, job)}")
    print(f"submit: {job} succeeded")
    return 0
