"""The command line: every subcommand is listed and documented; usage errors exit 2."""

import subprocess
import sys

import pytest

from speclabel.jobs.cli import COMMANDS, build_parser, main


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", COMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"speclabel {name}" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--n", "-4", "--out", "x.parquet"])
    assert exit_info.value.code == 2
    assert "--n" in capsys.readouterr().err


def test_job_errors_exit_1_with_the_reason(tmp_path, capsys):
    assert main(["simulate", "--n", "2", "--out", str(tmp_path / "x.parquet"), "--setup", "nope"]) == 1
    assert "unknown setup 'nope'" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "speclabel.jobs", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("speclabel ")
    assert build_parser().prog == "speclabel"


# The command line with ray.init replaced by a tripwire: a command that checks its paths first
# must fail before ever calling it.
_NO_RAY = """
import os, sys
import ray

def tripwire(*args, **kwargs):
    sys.stderr.write("ray.init was called\\n")
    os._exit(97)

ray.init = tripwire
from speclabel.jobs.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("where", "message"),
    [("missing-input", "does not exist"), ("store-is-a-file", "is a file, not a folder")],
)
def test_ingest_checks_its_paths_before_ray_starts(tmp_path, where, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.fits").write_bytes(b"")
    (tmp_path / "a_file").write_text("x")
    inputs, store = tmp_path / "in", tmp_path / "store"
    if where == "missing-input":
        inputs = tmp_path / "no-such-folder"
    else:
        store = tmp_path / "a_file"
    argv = ["ingest", str(inputs), "--out", str(store), "--release", "DR1"]
    result = subprocess.run([sys.executable, "-c", _NO_RAY, *argv], capture_output=True, text=True)
    assert "ray.init was called" not in result.stderr
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("speclabel ingest: error: ") and message in result.stderr
