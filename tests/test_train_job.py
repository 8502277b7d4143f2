"""speclabel train: configuration, the parallel fit against the in-process reference, kill-and-resume,
streaming with quarantined rows."""

import dataclasses
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from train_inputs import BAD_ROWS, faulty_survey, tiny_model_toml, write_in_two_files

from speclabel.core.errors import ConfigError
from speclabel.core.faults import FAULT_ENV
from speclabel.jobs.cli import build_parser, main
from speclabel.jobs.commands.train import build_job
from speclabel.jobs.train import QUARANTINE_FILE, read_model_config
from speclabel.model import io
from speclabel.model.arch import PAPER
from speclabel.model.fit import fit_ensemble, prepare_arrays


def _job(argv):
    return build_job(build_parser().parse_args(["train", *argv]))


def test_config_file_sections_and_command_line_overrides(tmp_path):
    config = tiny_model_toml(tmp_path / "model.toml", epochs=7, members=3)
    job = _job(["--data", "d.parquet", "--out", str(tmp_path / "m"), "--config", str(config)])
    assert job.arch.conv_channels == (2, 2) and job.arch.pool_size == 8
    assert job.train.epochs == 7 and job.train.batch_size == 8
    assert job.ensemble.n_members == 3 and job.ensemble.split.test_fraction == 0.2
    assert job.run_name == "m" and job.storage_path == str(tmp_path / ".speclabel-train")
    job = _job(["--data", "d", "--out", "m", "--config", str(config), "--epochs", "2", "--members", "5"])
    assert (job.train.epochs, job.ensemble.n_members, job.train.batch_size) == (2, 5, 8)
    assert _job(["--data", "d", "--out", "m", "--arch", "paper"]).arch == PAPER
    tilted = _job(["--data", "d", "--out", "m", "--config", str(config), "--continuum-tilt", "0.01"]).train
    assert tilted.augment.continuum_tilt == 0.01 and tilted.epochs == 7  # the file's other settings stay
    assert tilted.augment.noise == job.train.augment.noise
    weighted = _job(
        ["--data", "d", "--out", "m", "--config", str(config), "--density-weighting", "0.5"]
    ).train
    assert weighted.density_weighting == 0.5 and weighted.epochs == 7
    assert weighted.augment == job.train.augment and job.train.density_weighting == 0.0
    balanced = _job(
        [
            "--data",
            "d",
            "--out",
            "m",
            "--config",
            str(config),
            "--density-weighting",
            "0.5",
            "--label-balance",
            "0.5",
        ]
    ).train
    assert (balanced.label_balance, balanced.density_weighting, balanced.epochs) == (0.5, 0.5, 7)
    assert job.train.label_balance == 0.0
    (tmp_path / "preset.toml").write_text('arch = "paper"\n[train.augment]\nnoise = true\n')
    settings = read_model_config(tmp_path / "preset.toml")
    assert settings["arch"] == PAPER and settings["train"].augment.noise
    (tmp_path / "bad.toml").write_text("[ensemble]\nmembers = 3\n")
    with pytest.raises(ConfigError, match=r"unknown \[ensemble\] in .*bad.toml option\(s\) \['members'\]"):
        read_model_config(tmp_path / "bad.toml")
    (tmp_path / "bad-split.toml").write_text("[ensemble.split]\ntest_fraction = 0.1\nsalt = 1\n")
    with pytest.raises(ConfigError, match=r"unknown \[ensemble.split\].*\['salt'\]"):
        read_model_config(tmp_path / "bad-split.toml")


EPOCH_LINE = re.compile(r"^member (\d+)  epoch +(\d+)/", re.M)


def _epochs_trained(printed):
    """(member, epoch) of every member epoch line a run printed."""
    return [(int(m.group(1)), int(m.group(2))) for m in EPOCH_LINE.finditer(printed)]


@pytest.mark.ray
def test_killed_member_resumes_and_the_model_matches_the_in_process_fit(
    ray_session, small_survey, setup, tmp_path, monkeypatch, capsys
):
    data = tmp_path / "survey.parquet"
    pq.write_table(small_survey, data, row_group_size=10)
    config = tiny_model_toml(tmp_path / "model.toml", epochs=3, members=2)
    out = tmp_path / "models" / "tiny"
    argv = ["train", "--data", str(data), "--out", str(out), "--config", str(config), "--streaming", "off"]

    monkeypatch.setenv(FAULT_ENV, "train.epoch:member=1,epoch=2")
    assert main([*argv, "--max-failures", "0"]) == 1
    captured = capsys.readouterr()
    assert "member 1: FAILED after epoch 2" in captured.out
    assert "1 of 2 members did not finish" in captured.err and "--resume" in captured.err
    assert not out.exists()  # no half-done model
    first = _epochs_trained(captured.out)

    monkeypatch.delenv(FAULT_ENV)
    assert main([*argv, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "member 1: resumed from its checkpoint at epoch 2" in printed
    assert "member 0: finished in an earlier run; not trained again" in printed
    # Every epoch of every member was trained exactly once over the two runs: the finished member
    # was not retrained, the failed one continued from its epoch-2 checkpoint.
    assert sorted(first) == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]
    assert _epochs_trained(printed) == [(1, 3)]

    model = io.load_model(str(out), setup=setup)
    document = json.loads((out / "model.json").read_text())
    assert model.n_members == 2 and sorted(m["seed"] for m in document["members"]) == [0, 1]
    assert [m["epochs_run"] for m in document["members"]] == [3, 3]
    data_info = document["training"]["data"]
    assert (data_info["n_input"], data_info["n_rows"], data_info["quarantined"]) == (40, 40, {})
    assert data_info["mode"] == "memory" and set(document["metrics"]["test"]["all"]) == set(model.label_names)
    # Nothing but what model.json lists: the members and the post-training fits it names.
    listed = {"members", "model.json"} | {
        document[k]["file"].split("/")[0] for k in ("forward", "ood") if k in document
    }
    assert {p.name for p in out.iterdir()} == listed

    # The same members as model.fit.fit_ensemble trains one after another in this process: the
    # parallel job is the reference computation, and the resumed member resumed exactly.
    settings = read_model_config(config)
    arrays = prepare_arrays(small_survey, setup)
    reference = fit_ensemble(
        arrays, setup, settings["arch"], settings["train"], settings["ensemble"], data={}
    )
    assert data_info["fingerprint"] == arrays["fingerprint"]
    assert [m["seed"] for m in document["members"]] == [m["seed"] for m in reference.member_info]
    flux, mask = arrays["flux"][:12], arrays["mask"][:12]
    ours = model.predict(flux, mask, members=True).members
    theirs = reference.predict(flux, mask, members=True).members
    difference = np.abs(ours - theirs) / model.scaler.scale  # in units of each label's spread
    assert difference.max() < 1e-4
    test_metrics = document["metrics"]["test"]["all"]["feh"]
    assert test_metrics["bias"] == pytest.approx(
        reference.info["metrics"]["test"]["all"]["feh"]["bias"], rel=1e-3
    )

    # 32 training rows are too few for a forward model: the model has none, and says so.
    assert model.forward is None and "no forward model" in printed
    # The same command again: every member kept, the model written again (how an existing model
    # gains the post-training fits); another run's model at --out is never overwritten.
    # With reference spectra (the survey's noise-free twins) the rerun adds the label refinement.
    reference = tmp_path / "reference.parquet"
    assert main(["simulate", "--n", "40", "--seed", "11", "--out", str(reference), "--noise-free"]) == 0
    assert main([*argv, "--reference-spectra", str(reference)]) == 0
    printed = capsys.readouterr().out
    assert _epochs_trained(printed) == []
    again = io.load_model(str(out), setup=setup)
    assert np.array_equal(again.predict(flux, mask, members=True).members, ours)
    test = settings["ensemble"].split.is_test(arrays["spectrum_id"])
    assert len(again.refinement.library.labels) == (~test).sum()
    assert np.array_equal(again.refinement.library.labels, arrays["labels"][~test].astype(np.float32))
    # Eight test rows are too few for a calibration of the refined labels: the model says so.
    assert again.refinement.calibration is None and "no calibration of the refined labels" in printed
    # The giraffe setup names Mg I and Al I windows: the abundances are refined from their own lines.
    assert "label refinement of teff, logg, feh, mgfe, alfe against reference spectra" in printed
    assert again.refinement.config.own_lines == ("mgfe", "alfe")
    assert main([*argv, "--name", "another-run"]) == 1
    assert "a model already exists" in capsys.readouterr().err


@pytest.mark.ray
def test_streamed_training_leaves_bad_rows_out_and_accounts_for_them(
    ray_session, small_survey, setup, tmp_path, capsys
):
    faulty = faulty_survey(small_survey)
    folder = write_in_two_files(faulty, tmp_path / "survey", row_group_size=20)
    config = tiny_model_toml(tmp_path / "model.toml", epochs=1, members=2)
    out = tmp_path / "model"
    storage = tmp_path / "runs"
    argv = ["train", "--data", str(folder), "--out", str(out), "--config", str(config)]
    assert main([*argv, "--streaming", "on", "--storage", str(storage), "--name", "streamed"]) == 0
    printed = capsys.readouterr().out
    assert f"40 in = {40 - len(BAD_ROWS)} used + {len(BAD_ROWS)} quarantined" in printed
    assert "member 0  epoch    1/1" in printed and "val bias" in printed

    document = json.loads((out / "model.json").read_text())
    data_info = document["training"]["data"]
    assert data_info["mode"] == "streaming" and data_info["n_input"] == 40
    assert data_info["n_rows"] == 40 - len(BAD_ROWS)
    assert data_info["quarantined"] == {"duplicate_id": 4, "missing_label": 1, "nonfinite_flux": 1}
    quarantine = pq.read_table(storage / "streamed" / QUARANTINE_FILE)
    assert quarantine.num_rows == len(BAD_ROWS)
    good = faulty.filter([i not in BAD_ROWS for i in range(40)])
    assert data_info["fingerprint"] == prepare_arrays(good, setup)["fingerprint"]
    n_train = sum(m["split"]["n_train"] + m["split"]["n_val"] for m in document["members"])
    n_test = document["metrics"]["test"]["all"]["teff"]["n"]
    assert n_train + 2 * n_test == 2 * (40 - len(BAD_ROWS))  # every used row in one split per member

    # A rerun with other settings under the same run name is refused, not mixed into the run.
    other = tiny_model_toml(tmp_path / "other.toml", epochs=2, members=2)
    rerun = ["train", "--data", str(folder), "--out", str(tmp_path / "again"), "--config", str(other)]
    assert main([*rerun, "--storage", str(storage), "--name", "streamed"]) == 1
    error = capsys.readouterr().err
    assert "was started with other" in error and "train" in error and "--name" in error


def test_a_run_recorded_before_a_training_field_existed_is_the_same_run():
    """job.json of a run trained before density weighting existed (no density_* keys): read back
    through TrainConfig it equals today's identity of the same settings, so rerunning the command
    refits the post-training fits instead of refusing; a setting that differs still differs."""
    from speclabel.jobs.train.run import recorded_identity
    from speclabel.model.arch import PRESETS
    from speclabel.model.training import TrainConfig

    today = {"train": TrainConfig().to_dict(), "arch": PRESETS["default"].to_dict(), "n_used": 5}
    old_train = {k: v for k, v in today["train"].items() if not k.startswith("density_")}
    recorded = recorded_identity(json.loads(json.dumps({**today, "train": old_train})))
    assert recorded == json.loads(json.dumps(today))
    other = recorded_identity({**today, "train": {**old_train, "epochs": 7}})
    assert other["train"] != today["train"] and other["train"]["epochs"] == 7
    broken = {**today, "train": {"no_such_setting": 1}}
    assert recorded_identity(broken)["train"] == {"no_such_setting": 1}  # kept as it is: it differs


def test_the_documented_example_configuration_is_valid():
    from pathlib import Path

    settings = read_model_config(Path(__file__).resolve().parents[1] / "examples" / "model.toml")
    assert settings["arch"] == PAPER and settings["ensemble"].n_candidates == 10
    assert settings["train"].augment.noise and settings["ensemble"].split.val_fraction == 0.1
    assert settings["ood"].threshold == 99.0 and settings["ood"].components == 32


def test_ood_settings_are_read_but_stay_out_of_the_run_identity(tmp_path):
    """[ood] only refits the post-training reference: it must not make a finished run a different run."""
    from speclabel.jobs.train.run import job_identity

    (tmp_path / "ood.toml").write_text("[ood]\nk = 4\nthreshold = 99.5\n")
    assert read_model_config(tmp_path / "ood.toml")["ood"].k == 4
    (tmp_path / "bad-ood.toml").write_text("[ood]\nneighbours = 4\n")
    with pytest.raises(ConfigError, match=r"unknown \[ood\]"):
        read_model_config(tmp_path / "bad-ood.toml")
    from types import SimpleNamespace

    from speclabel.model.ood import OODConfig

    part = SimpleNamespace(to_dict=lambda: {"x": 1})
    spec = SimpleNamespace(setup=part, arch=part, train=part, scaler=part)
    data = SimpleNamespace(fingerprint=lambda: "f", n_used=3)
    plain = _job(["--data", "d", "--out", "m"])
    refitted = dataclasses.replace(plain, ood=OODConfig(k=4, threshold=99.5))
    assert job_identity(spec, plain, data) == job_identity(spec, refitted, data)
    # [refine] and --reference-spectra likewise.
    (tmp_path / "refine.toml").write_text('[refine]\nneighbours = 60\nkept = ["teff"]\n')
    refine = read_model_config(tmp_path / "refine.toml")["refine"]
    assert (refine.neighbours, refine.kept, refine.prior_width) == (60, ("teff",), ())
    refined = _job(["--data", "d", "--out", "m", "--reference-spectra", "ref.parquet"])
    assert refined.reference_spectra == "ref.parquet"
    refined = dataclasses.replace(refined, refine=refine)
    assert job_identity(spec, plain, data) == job_identity(spec, refined, data)


def test_test_split_metrics_in_batches_equal_the_one_shot_reference(small_survey, setup):
    from speclabel.jobs.train import test_metrics
    from speclabel.model.arch import build_network
    from speclabel.model.ensemble import Ensemble
    from speclabel.model.metrics import metrics_by_snr
    from speclabel.model.scaling import LabelScaler
    from speclabel.model.splits import SplitRule
    from speclabel.pipeline.training_data import InMemoryRows

    settings_arch = PAPER.replace(conv_channels=(2,), pool_size=16, dense_units=(4,))
    arrays = prepare_arrays(small_survey, setup)
    scaler = LabelScaler.fit(arrays["labels"])
    split = SplitRule(test_fraction=0.3)
    test = split.is_test(arrays["spectrum_id"])
    networks = [build_network(settings_arch, setup) for _ in range(2)]
    for members in (2, 1):
        ensemble = Ensemble(setup, settings_arch, scaler, networks[:members])
        batched = test_metrics(ensemble, InMemoryRows(arrays), split, batch_size=3)
        prediction = ensemble.predict(arrays["flux"][test], arrays["mask"][test])
        reference = metrics_by_snr(
            prediction.mean,
            arrays["labels"][test],
            scaler.names,
            arrays["snr"][test],
            std=prediction.std if members > 1 else None,
        )
        assert batched.keys() == reference.keys()
        for cut, per_label in reference.items():
            for label, values in per_label.items():
                assert batched[cut][label] == pytest.approx(values, nan_ok=True, rel=1e-6)  # float32 batches
        assert ("std_ratio" in batched["all"]["teff"]) == (members > 1)  # one member: no spread
