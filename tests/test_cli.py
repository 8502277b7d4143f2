"""The command line: every subcommand is listed and documented; usage errors exit 2."""

import argparse
import re
import subprocess
import sys

import pyarrow.parquet as pq
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


def test_label_checks_its_inputs_before_ray_starts(tmp_path, small_survey):
    from speclabel.core.errors import InputError
    from speclabel.pipeline.labelling.inputs import check_inputs

    spectra, model = tmp_path / "survey.parquet", tmp_path / "model"
    pq.write_table(small_survey, spectra)
    model.mkdir()
    (model / "model.json").write_text("{}")
    check_inputs(str(spectra), str(model))  # what is there passes (the model's integrity comes later)
    for bad_spectra, bad_model, message in (
        (tmp_path / "no-such-file.parquet", model, "does not exist"),
        (spectra, tmp_path / "no-such-model", "does not exist"),
        (spectra, tmp_path, "no model.json"),
    ):
        with pytest.raises(InputError, match=message):
            check_inputs(str(bad_spectra), str(bad_model))
    # The command calls it before Ray: a mistyped model path fails without ray.init.
    argv = [
        "label",
        "--spectra",
        str(spectra),
        "--model",
        str(tmp_path / "modle"),
        "--out",
        str(tmp_path / "c"),
    ]
    result = subprocess.run([sys.executable, "-c", _NO_RAY, *argv], capture_output=True, text=True)
    assert "ray.init was called" not in result.stderr
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("speclabel label: error: --model ") and "does not exist" in result.stderr


# -- the defaults --help states are the code's ------------------------------------------------------

STATED = re.compile(r"(?:\(|; )default:? ([^)]*)\)")  # "(default 8)", "(repeatable; default: all)"
DESCRIPTIONS = ("all",)  # one-word defaults that describe rather than name a value


def format_default(value) -> str:
    if isinstance(value, list | tuple):
        return " ".join(format_default(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def served_host(monkeypatch) -> str:
    """The address `speclabel serve` binds to without --host (the server is never started)."""
    from speclabel.pipeline.catalogue import flight

    bound = {}
    monkeypatch.setattr(flight.Catalogue, "open", classmethod(lambda cls, location: None))
    monkeypatch.setattr(
        flight, "CatalogueFlightServer", lambda catalogue, host, **kw: bound.update(host=host)
    )
    flight.serve("catalogue", port=0, token="t")
    return bound["host"]


def code_defaults(monkeypatch) -> dict[tuple[str, str], str]:
    """(command, option) -> the value the code uses when an option whose argparse default is None
    is not given, computed from the code that uses it."""
    from speclabel.jobs.commands.train import build_job
    from speclabel.pipeline.labelling.batch import FlagThresholds

    job = build_job(build_parser().parse_args(["train", "--data", "d", "--out", "o"]))
    return {
        ("train", "members"): str(job.ensemble.n_members),
        ("train", "epochs"): str(job.train.epochs),
        ("train", "arch"): job.arch.name,
        ("train", "continuum_tilt"): str(job.train.augment.continuum_tilt),
        ("train", "density_weighting"): str(job.train.density_weighting),
        ("train", "label_balance"): str(job.train.label_balance),
        ("label", "high_std"): " ".join(f"{k}={v:g}" for k, v in FlagThresholds().high_std.items()),
        ("serve", "host"): served_host(monkeypatch),
    }


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_help_states_the_defaults_the_code_uses(monkeypatch):
    from_code = code_defaults(monkeypatch)
    checked = set()
    for name, command in subcommands().items():
        printed = "".join(command.format_help().split())  # --help as printed, wrapping undone
        for action in command._actions:
            if not action.help or action.help == argparse.SUPPRESS:
                continue
            text = command._get_formatter()._expand_help(action)
            assert "".join(text.split()) in printed, (name, action.dest)
            where = f"speclabel {name} {action.option_strings or action.dest}: {text!r}"
            for value in STATED.findall(text) if action.nargs != 0 else ():  # a flag states its off state
                first = re.split(r"[,;:]", value, maxsplit=1)[0].strip()
                if (name, action.dest) in from_code:
                    expected = from_code[name, action.dest]
                    assert first == expected or value.endswith(f": {expected}"), where
                    checked.add((name, action.dest))
                elif action.default is not None:
                    assert first == format_default(action.default), where
                else:
                    assert not first[0].isdigit(), f"{where}: say it with %(default)s or in code_defaults"
                    assert " " in first or first in DESCRIPTIONS or first.startswith("$"), where
            if "(default)" in text:  # "summary: ... (default); full: ..."
                clause = text.split("(default)")[0].rsplit(";", 1)[-1]
                words = set(re.findall(r"[\w-]+", clause))
                assert str(action.default) in words, where
                assert not words & (set(map(str, action.choices or ())) - {str(action.default)}), where
    assert checked == set(from_code)  # every option the table knows still states its default


def test_a_stated_default_that_is_not_the_code_s_fails(monkeypatch):
    """The check above is not vacuous: the help this issue found (`--epochs`: default 200) fails it."""
    from speclabel.jobs.commands import train

    real = train.add_arguments

    def old_help(parser):
        real(parser)
        epochs = next(a for a in parser._actions if a.dest == "epochs")
        epochs.help = "maximum epochs per member (default 200)"

    monkeypatch.setattr(train, "add_arguments", old_help)
    with pytest.raises(AssertionError, match="epochs"):
        test_help_states_the_defaults_the_code_uses(monkeypatch)
