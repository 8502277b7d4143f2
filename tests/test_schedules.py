"""The scheduler examples in jobs/schedules parse, and the speclabel command lines in them are ones
speclabel accepts (checked with its own parsers once the subcommand is installed)."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

import pytest
import yaml

from speclabel.jobs import submit as sub
from speclabel.jobs.cli import COMMANDS

SCHEDULES = Path(__file__).resolve().parents[1] / "jobs" / "schedules"
CRON_FIELD = re.compile(r"(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*")
CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


def check_cron_schedule(fields: list[str]) -> None:
    assert len(fields) == 5, fields
    for field, (low, high) in zip(fields, CRON_RANGES, strict=True):
        assert CRON_FIELD.fullmatch(field), field
        assert all(low <= int(n) <= high for n in re.findall(r"(?<![/\d])\d+", field)), field


def check_speclabel_command(argv: list[str]) -> str:
    """``argv`` after the speclabel executable: a job speclabel can run, directly or submitted."""
    submitted = argv[0] == "submit"
    job = sub.split_submit_options(argv[1:])[1] if submitted else argv
    assert job[0] in sub.JOB_LOCATIONS, job
    if job[0] in COMMANDS:  # checked like `speclabel submit` checks it, without reading the inputs
        sub.build_request(job, identify=False)
    return job[0]


def test_check_speclabel_command_rejects_what_speclabel_rejects():
    with pytest.raises(AssertionError):
        check_speclabel_command(["submit", "frobnicate", "--n", "1"])
    with pytest.raises(SystemExit):
        check_speclabel_command(["simulate", "--n", "-1", "--out", "/x.parquet"])
    with pytest.raises(AssertionError):
        check_cron_schedule(["61", "*", "*", "*", "*"])
    assert check_speclabel_command(["submit", "simulate", "--follow", "--n", "1", "--out", "s3://b/x"])


def test_crontab_lines():
    entries = []
    for line in (SCHEDULES / "crontab").read_text().splitlines():
        line = line.strip()
        if re.match(r"#?[\d*]", line):  # a schedule, also the commented alternative
            entries.append(shlex.split(line.lstrip("#")))
        elif line and not line.startswith("#"):
            assert re.fullmatch(r"[A-Z_]+=\S+", line), line  # cron's environment assignments
    assert len(entries) == 2
    for entry in entries:
        check_cron_schedule(entry[:5])
        executable = entry[5]
        assert executable.endswith("/bin/speclabel")
        argv = entry[6 : entry.index(">>")]
        assert check_speclabel_command(argv) == "reprocess"


def _unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string((SCHEDULES / "systemd" / name).read_text())
    return unit


def test_systemd_service_and_timer():
    service = _unit("speclabel-reprocess.service")
    timer = _unit("speclabel-reprocess.timer")
    assert service["Service"]["Type"] == "oneshot"
    exec_start = shlex.split(service["Service"]["ExecStart"])
    assert exec_start[0].endswith("/bin/speclabel") and "--follow" in exec_start  # unit fails with the job
    assert check_speclabel_command(exec_start[1:]) == "reprocess"
    assert service["Service"]["EnvironmentFile"].startswith("/")
    assert timer["Timer"]["Unit"] == "speclabel-reprocess.service"
    assert timer["Timer"]["OnCalendar"] == "hourly" and timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_kubernetes_cronjob_creates_a_kuberay_rayjob_running_reprocess():
    documents = list(yaml.safe_load_all((SCHEDULES / "kubernetes" / "reprocess-cronjob.yaml").read_text()))
    by_kind = {doc["kind"]: doc for doc in documents}
    assert set(by_kind) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}

    cronjob = by_kind["CronJob"]
    assert cronjob["apiVersion"] == "batch/v1"
    check_cron_schedule(cronjob["spec"]["schedule"].split())
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == by_kind["ServiceAccount"]["metadata"]["name"]
    (container,) = pod["containers"]
    script = container["args"][0]
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert volume["name"] == mount["name"]
    assert volume["configMap"]["name"] == by_kind["ConfigMap"]["metadata"]["name"]
    assert f"kubectl create -f {mount['mountPath']}/rayjob.yaml" in script

    # The scheduler may do exactly what its script does to RayJobs.
    (rule,) = by_kind["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert set(re.findall(r"kubectl (\w+) rayjob", script)) | {"create"} == set(rule["verbs"])
    binding = by_kind["RoleBinding"]
    assert binding["roleRef"]["name"] == by_kind["Role"]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]

    rayjob = yaml.safe_load(by_kind["ConfigMap"]["data"]["rayjob.yaml"])
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert f"rayjob {rayjob['metadata']['name']}" in script
    entrypoint = shlex.split(rayjob["spec"]["entrypoint"])
    assert entrypoint[:3] == ["python", "-m", "speclabel.jobs"]
    assert check_speclabel_command(entrypoint[3:]) == "reprocess"
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["authOptions"]["mode"] == "token"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    (workers,) = cluster["workerGroupSpecs"]
    (worker,) = workers["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1 and workers["minReplicas"] == 0


def test_the_kubernetes_image_is_the_pinned_ray_image_plus_speclabel():
    dockerfile = (SCHEDULES / "kubernetes" / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if line and not line.startswith("#")]
    assert re.fullmatch(r"FROM rayproject/ray:2\.60\.0-py311-(gpu|cu\d+)", instructions[0])
    assert any(
        re.search(r"--index-url https://download.pytorch.org/whl/cu\d+ torch==2\.13\.0", i)
        for i in instructions
    )
    copies = [i.split()[-2] for i in instructions if i.startswith("COPY")]
    assert "." not in copies  # never the whole checkout (virtual environments, data)
    assert {"model", "pipeline", "jobs"} <= set(copies)
