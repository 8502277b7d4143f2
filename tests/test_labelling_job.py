"""`speclabel label` on the real local Ray instance: the catalogue, accounting, quarantine reasons,
labels and saliency against the in-process ensemble, idempotence, model replacement, a killed run."""

import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from label_data import saved_model, spectra_file

from speclabel.core.arrays import model_inputs, spectra_arrays
from speclabel.core.contract import spectra_schema
from speclabel.core.errors import InputError, IntegrityError, UsageError
from speclabel.core.faults import Fault, InjectedFault
from speclabel.core.fingerprints import spectrum_sha256
from speclabel.core.reporting import Reporter
from speclabel.core.setups import Setup
from speclabel.jobs.cli import main
from speclabel.model.io import load_model, save_model
from speclabel.model.refine import ReferenceLibrary, RefineConfig, Refinement, refine_labels
from speclabel.model.splits import hash_uniform
from speclabel.pipeline.catalogue import Catalogue
from speclabel.pipeline.catalogue.layout import saliency_column
from speclabel.pipeline.labelling import LabelOptions, label_spectra, read_population_saliency
from speclabel.pipeline.labelling.job import SAMPLE_SALT
from speclabel.pipeline.publish import Dataset
from speclabel.pipeline.simulate import SurveyConfig, simulate_chunk

pytestmark = pytest.mark.ray
LABELS = ("teff", "logg", "feh", "mgfe", "alfe")
OPTIONS = dict(batch_size=8, progress=False)


def _bad_file(setup, path, duplicate_of: str) -> pa.Table:
    """12 spectra: row 0 NaN flux at an unmasked pixel, row 1 one pixel short, row 2 the id of a
    spectrum in an earlier file, row 3 no id; flux of the first arm as variable-length lists."""
    table = simulate_chunk(setup, SurveyConfig(n=12, seed=2, chunk_size=12, release="DR1"), 0)
    table = table.set_column(0, "spectrum_id", pa.array([f"B-{i:02d}" for i in range(12)]))
    arm = setup.arms[0]
    flux = [list(v) for v in table.column(arm.flux_column).to_pylist()]
    ivar = table.column(arm.ivar_column).to_pylist()
    pixel = next(i for i, w in enumerate(ivar[0]) if w > 0)
    flux[0][pixel] = float("nan")
    flux[1] = flux[1][:-1]
    ids = table.column("spectrum_id").to_pylist()
    ids[2], ids[3] = duplicate_of, None
    index = table.schema.get_field_index(arm.flux_column)
    table = table.set_column(index, arm.flux_column, pa.array(flux, pa.list_(pa.float32())))
    table = table.set_column(0, "spectrum_id", pa.array(ids, pa.string()))
    pq.write_table(table, path, row_group_size=5)
    return table


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_setup, ray_session):
    """One published run over three files (one good, one with bad rows, one for another setup)."""
    root = tmp_path_factory.mktemp("label")
    model, ensemble = saved_model(tiny_setup, root / "model")
    inputs = root / "in"
    inputs.mkdir()
    good = spectra_file(tiny_setup, inputs / "a.parquet", n=40, seed=1, release="DR1")
    bad = _bad_file(tiny_setup, inputs / "b.parquet", good.column("spectrum_id")[0].as_py())
    other = Setup.from_dict({**tiny_setup.to_dict(), "name": "another-setup"})
    foreign = simulate_chunk(tiny_setup, SurveyConfig(n=6, seed=3, chunk_size=6, release="DR1"), 0)
    foreign = foreign.set_column(0, "spectrum_id", pa.array([f"C-{i}" for i in range(6)]))
    pq.write_table(foreign.cast(spectra_schema(other, labelled=True)), inputs / "c.parquet")
    catalogue = root / "cat"
    options = LabelOptions(saliency="full", saliency_sample=5, **OPTIONS)
    ticks = iter(range(0, 10**6, 11))  # a clock 11 s on at every look: every progress line is due
    lines = []
    reporter = Reporter(lines.append, every_s=10.0, clock=lambda: float(next(ticks)))
    result = label_spectra(str(inputs), model, str(catalogue), options, reporter=reporter)
    return {
        "root": root,
        "model": model,
        "ensemble": ensemble,
        "inputs": str(inputs),
        "catalogue": str(catalogue),
        "good": good,
        "bad": bad,
        "foreign": foreign,
        "result": result,
        "options": options,
        "progress": lines,
    }


def _failing_cli_run(label_args: list[str], *, after: int) -> subprocess.CompletedProcess:
    """``speclabel label`` with actors failing after ``after`` batches, in its own process and Ray.

    A killed run is a process that ends; in the session's Ray the actor that raised would also
    outlive the run (Ray keeps it for the lineage of its failed output until the driver exits) and
    hold its CPU share from the tests after it.
    """
    return subprocess.run(
        [sys.executable, "-m", "speclabel.jobs.cli", "label", *label_args, "--quiet", "--address", "local"],
        env={**os.environ, "SPECLABEL_FAULT": f"label.batch:batches={after}"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _live(catalogue: str) -> pa.Table:
    return pads.dataset(catalogue, partitioning="hive").to_table()


def test_catalogue_is_written_read_back_and_every_row_accounted_for(labelled):
    result = labelled["result"]
    assert result.status == "published" and result.release == "DR1"
    table = _live(labelled["catalogue"])
    ids = table.column("spectrum_id").to_pylist()
    expected = labelled["good"].column("spectrum_id").to_pylist() + [f"B-{i:02d}" for i in range(4, 12)]
    assert sorted(ids) == sorted(expected) and len(set(ids)) == len(ids)
    assert set(table.column("release").to_pylist()) == {"DR1"}
    assert table.schema.field("teff").type == pa.float32() and table.schema.field("flags").type == pa.int32()
    # Plain Arrow types only: no Ray tensor extension types in files other tools read.
    assert not any(isinstance(f.type, pa.ExtensionType) for f in table.schema)
    counts = result.manifest["counts"]
    assert counts["rows_in"] == 40 + 12 + 6 == counts["labelled"] + counts["quarantined"]
    assert counts["labelled"] == len(expected)
    assert counts["quarantined_by_reason"] == {
        "duplicate_id": 1,
        "missing_id": 1,
        "nonfinite_flux": 1,
        "wrong_length": 1,
        "wrong_setup": 6,
    }
    for path, entry in counts["per_file"].items():
        assert entry["rows"] == entry["labelled"] + entry["quarantined"], path
    assert labelled["result"].manifest["index"]["model_id"] == labelled["ensemble"].model_id


def test_injected_bad_rows_are_quarantined_with_the_right_reason(labelled):
    quarantine = Catalogue.open(labelled["catalogue"]).quarantine(["DR1"])
    by_source = {}
    for row in quarantine.to_pylist():
        by_source.setdefault(os.path.basename(row["source"]), []).append((row["spectrum_id"], row["reason"]))
    first_good_id = labelled["good"].column("spectrum_id")[0].as_py()
    assert sorted(by_source["b.parquet"], key=str) == sorted(
        [
            ("B-00", "nonfinite_flux"),
            ("B-01", "wrong_length"),
            (first_good_id, "duplicate_id"),
            (None, "missing_id"),
        ],
        key=str,
    )
    assert sorted(by_source["c.parquet"]) == [(f"C-{i}", "wrong_setup") for i in range(6)]
    assert "a.parquet" not in by_source


def _in_process(labelled, tiny_setup):
    """The in-process ensemble on the rows the catalogue should hold, keyed by spectrum_id."""
    ensemble = load_model(labelled["model"])
    good = labelled["good"]
    bad = labelled["bad"].slice(4)
    table = pa.concat_tables([good.select(bad.column_names), bad.cast(good.select(bad.column_names).schema)])
    arrays = spectra_arrays(table, tiny_setup)
    flux, mask = model_inputs(arrays, tiny_setup)
    prediction = ensemble.predict(flux, mask, saliency="full")
    return table, prediction, spectrum_sha256(arrays, tiny_setup)


def test_labels_and_saliency_equal_the_in_process_ensemble(labelled, tiny_setup):
    table, prediction, sha = _in_process(labelled, tiny_setup)
    ids = table.column("spectrum_id").to_pylist()
    live = _live(labelled["catalogue"])
    live = live.take(pc.index_in(pa.array(ids), value_set=live.column("spectrum_id")))
    for k, name in enumerate(LABELS):
        np.testing.assert_allclose(live.column(name).to_numpy(), prediction.mean[:, k], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            live.column(f"{name}_std").to_numpy(), prediction.std[:, k], rtol=1e-4, atol=1e-5
        )
        for g, group in enumerate(prediction.saliency.groups):
            np.testing.assert_allclose(
                live.column(saliency_column(name, group)).to_numpy(),
                prediction.saliency.shares[:, k, g],
                atol=1e-5,
            )
    assert live.column("input_sha256").to_pylist() == sha
    assert live.column("ra").to_pylist() == table.column("ra").to_pylist()

    population = read_population_saliency(labelled["catalogue"], "DR1")
    assert population.column("label").to_pylist() == list(LABELS)
    assert population.column("count").to_pylist() == [len(ids)] * 5
    mean = np.array(population.column("sum").to_pylist()) / len(ids)
    np.testing.assert_allclose(
        mean, prediction.saliency_maps.astype(np.float64).mean(axis=0), rtol=1e-4, atol=1e-9
    )

    maps = Catalogue.open(labelled["catalogue"]).saliency("DR1")
    u = hash_uniform(ids, SAMPLE_SALT)
    chosen = {ids[i] for i in np.argsort(u, kind="stable")[:5]}
    assert set(maps.column("spectrum_id").to_pylist()) == chosen
    for row in maps.to_pylist():
        i = ids.index(row["spectrum_id"])
        for k, name in enumerate(LABELS):
            np.testing.assert_allclose(
                row[f"saliency_{name}"], prediction.saliency_maps[i, k], rtol=1e-4, atol=1e-7
            )


def test_rerun_is_a_no_op_and_a_new_model_replaces_the_release(labelled, tiny_setup):
    catalogue = labelled["catalogue"]
    dataset = Dataset.open(catalogue)
    before = dataset.index()
    again = label_spectra(labelled["inputs"], labelled["model"], catalogue, labelled["options"])
    assert again.status == "up to date"
    assert dataset.index() == before

    old_run = before["releases"]["DR1"]["run_id"]
    new_model, new_ensemble = saved_model(tiny_setup, labelled["root"] / "model-2", seed=5)
    result = label_spectra(labelled["inputs"], new_model, catalogue, LabelOptions(**OPTIONS))
    assert result.status == "published"
    live = _live(catalogue)
    assert set(live.column("model_id").to_pylist()) == {new_ensemble.model_id}
    assert live.num_rows == labelled["result"].labelled
    assert os.path.isdir(dataset.version_dir("DR1", old_run))
    old = Catalogue.open(catalogue).query(model_id=labelled["ensemble"].model_id, columns=["spectrum_id"])
    assert old.num_rows == live.num_rows
    labelled["replaced_by"] = new_model


def test_killed_run_publishes_nothing_and_a_rerun_publishes_once(labelled, tiny_setup):
    catalogue = labelled["catalogue"]
    dataset = Dataset.open(catalogue)
    model, ensemble = saved_model(tiny_setup, labelled["root"] / "model-3", seed=9)
    before_index = dataset.index()
    before_rows = _live(catalogue).sort_by("spectrum_id")
    failed = _failing_cli_run(
        ["--spectra", labelled["inputs"], "--model", model, "--out", catalogue, "--batch-size", "8"], after=1
    )
    assert failed.returncode == 1
    assert re.search(r"nothing was published.*SPECLABEL_FAULT=label.batch", failed.stderr), failed.stderr[
        -2000:
    ]
    assert dataset.index() == before_index
    assert _live(catalogue).sort_by("spectrum_id").equals(before_rows)
    assert not os.path.exists(dataset.path("_lock"))
    staging = dataset.path("_staging")
    assert not os.path.exists(staging) or not os.listdir(staging)
    manifests = os.listdir(dataset.path("_manifests", "release=DR1"))

    result = label_spectra(labelled["inputs"], model, catalogue, LabelOptions(**OPTIONS))
    assert result.status == "published"
    assert len(os.listdir(dataset.path("_manifests", "release=DR1"))) == len(manifests) + 1
    assert set(_live(catalogue).column("model_id").to_pylist()) == {ensemble.model_id}
    runs = {run for run in (os.listdir(dataset.path("_quarantine", "release=DR1")))}
    assert f"run={result.run_id}" in runs and len(runs) == len(manifests) + 1


def test_cli_labels_reruns_and_fails_with_exit_codes(labelled, capsys, tmp_path):
    catalogue = str(tmp_path / "cli-cat")
    args = ["label", "--spectra", labelled["inputs"], "--model", labelled["model"], "--out", catalogue]
    args += ["--release", "DR7", "--saliency", "none", "--batch-size", "8", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "release DR7 published" in out and "labelled 48" in out and "wrong_setup 6" in out
    live = _live(catalogue)
    assert set(live.column("release").to_pylist()) == {"DR7"}
    assert not any(name.startswith("sal_") for name in live.column_names)
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out

    assert main([*args, "--saliency", "full"]) == 2
    assert "saliency-sample" in capsys.readouterr().err

    before = Dataset.open(catalogue).index()
    failed = _failing_cli_run([*args[1:], "--force"], after=0)
    assert failed.returncode == 1 and "nothing was published" in failed.stderr
    assert Dataset.open(catalogue).index() == before


def test_a_spectra_store_from_ingest_is_labelled_under_its_release(labelled, tiny_setup, tmp_path):
    """The production chain: contract Parquet -> `speclabel ingest` -> spectra store -> label. The
    store's files have no release column (it is the release=<R> folder) and extra columns."""
    from speclabel.pipeline.ingest import IngestOptions, run_ingest

    spectra_file(tiny_setup, tmp_path / "raw.parquet", n=10, seed=8, release="ignored")
    store = str(tmp_path / "store")
    run_ingest(str(tmp_path / "raw.parquet"), store, tiny_setup, IngestOptions(release="iDR3"))
    catalogue = str(tmp_path / "cat")
    result = label_spectra(store, labelled["model"], catalogue, LabelOptions(saliency="none", **OPTIONS))
    assert result.release == "iDR3" and result.labelled == 10
    stored = pads.dataset(store, partitioning="hive").to_table()
    live = _live(catalogue)
    assert set(live.column("release").to_pylist()) == {"iDR3"}
    by_id = dict(
        zip(stored.column("spectrum_id").to_pylist(), stored.column("input_sha256").to_pylist(), strict=True)
    )
    assert {i: by_id[i] for i in live.column("spectrum_id").to_pylist()} == dict(
        zip(live.column("spectrum_id").to_pylist(), live.column("input_sha256").to_pylist(), strict=True)
    )


def test_fits_input_points_to_ingest(labelled, tmp_path):
    (tmp_path / "fits").mkdir()
    (tmp_path / "fits" / "star.fits").write_bytes(b"SIMPLE  =                    T")
    with pytest.raises(InputError, match="speclabel ingest"):
        label_spectra(
            str(tmp_path / "fits"), labelled["model"], str(tmp_path / "cat"), LabelOptions(**OPTIONS)
        )


def test_a_catalogue_inside_the_input_is_refused(labelled):
    with pytest.raises(UsageError, match="lies inside the input"):
        label_spectra(
            labelled["inputs"], labelled["model"], labelled["inputs"] + "/labels", LabelOptions(**OPTIONS)
        )


def test_a_tampered_model_fails_before_any_work(labelled, tmp_path):
    import shutil

    model = tmp_path / "tampered"
    shutil.copytree(labelled["model"], model)
    member = model / "members" / "member-0.safetensors"
    member.write_bytes(member.read_bytes()[:-8] + bytes(8))
    with pytest.raises(IntegrityError, match="weight sha256"):
        label_spectra(labelled["inputs"], str(model), str(tmp_path / "cat"), LabelOptions(**OPTIONS))
    assert not (tmp_path / "cat").exists()


def test_progress_goes_to_the_reporter_in_the_label_line_shape(labelled):
    lines = labelled["progress"]
    # 40 + 12 + 6 rows in; the 6 of the refused file are quarantined before the stream starts.
    pattern = re.compile(
        r"^label DR1: (\d+)/58 rows \((\d+) quarantined\), \d+\.\d\d rows/s(, ETA \d+\.\d min)?$"
    )
    assert len(lines) >= 2 and all(pattern.match(line) for line in lines), lines
    done = [int(pattern.match(line).group(1)) for line in lines]
    assert done == sorted(done) and done[-1] == 58
    assert lines[-1].endswith("rows/s") and pattern.match(lines[-1]).group(2) == "10"
    assert "ETA" in lines[0]  # not done yet: the line says when it will be


def test_a_fault_just_before_publishing_publishes_nothing(labelled, tmp_path):
    catalogue = str(tmp_path / "cat")
    options = LabelOptions(saliency="none", fault=Fault("label.publish", {"release": "DR1"}), **OPTIONS)
    with pytest.raises(InjectedFault, match=r"label\.publish"):
        label_spectra(labelled["inputs"], labelled["model"], catalogue, options)
    dataset = Dataset.open(catalogue)
    assert dataset.release_entry("DR1") is None
    assert not os.path.exists(dataset.path("_lock"))
    staging = dataset.path("_staging")
    assert not os.path.exists(staging) or not os.listdir(staging)
    other = LabelOptions(saliency="none", fault=Fault("label.publish", {"release": "DR2"}), **OPTIONS)
    assert label_spectra(labelled["inputs"], labelled["model"], catalogue, other).status == "published"


def test_quiet_cli_prints_the_summary_and_no_ray_chatter(labelled, tiny_setup, tmp_path):
    """A file of one row group (pyarrow's default): quiet shows no Ray INFO line, no core_worker
    error about actor arguments, no warning that the actor pool got too few inputs."""
    table = spectra_file(tiny_setup, tmp_path / "one.parquet", n=40, seed=12, release="DR1", row_group=40)
    catalogue = str(tmp_path / "cat")
    run = subprocess.run(
        [
            *(
                sys.executable,
                "-m",
                "speclabel.jobs.cli",
                "label",
                "--spectra",
                str(tmp_path / "one.parquet"),
            ),
            *("--model", labelled["model"], "--out", catalogue, "--batch-size", "8", "--saliency", "none"),
            *("--quiet", "--address", "local"),
        ],
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "release DR1 published" in run.stdout and "labelled 40" in run.stdout
    for noise in (" INFO ", "core_worker.cc", "UserWarning", "Warning:", "Progress bars", "label DR1:"):
        assert noise not in run.stderr, run.stderr[-3000:]
    assert sorted(_live(catalogue).column("spectrum_id").to_pylist()) == sorted(
        table.column("spectrum_id").to_pylist()
    )


def test_a_model_with_reference_spectra_is_refined_by_the_job_unless_told_not_to(
    labelled, tiny_setup, tmp_path, capsys
):
    ensemble = load_model(labelled["model"])
    reference = simulate_chunk(tiny_setup, SurveyConfig(n=80, seed=11, chunk_size=80, noise_free=True), 0)
    flux, _ = spectra_arrays(reference, tiny_setup).concatenated(tiny_setup)
    labels = np.stack([reference.column(n).to_numpy() for n in LABELS], 1)
    library = ReferenceLibrary(labels, flux, np.ones(flux.shape, bool), tiny_setup)
    config = RefineConfig(prior_width=(300.0, 0.6, 0.3, 0.1, 0.15), neighbours=40, kept=("teff", "logg"))
    ensemble.refinement = Refinement(library, config)
    save_model(ensemble, str(tmp_path / "model"))
    spectra = str(tmp_path / "a.parquet")
    pq.write_table(labelled["good"], spectra)
    args = ["label", "--spectra", spectra, "--model", str(tmp_path / "model"), "--saliency", "none"]
    args += ["--batch-size", "8", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "refined")]) == 0
    assert main([*args, "--out", str(tmp_path / "network"), "--no-refine"]) == 0
    assert "labelled 40" in capsys.readouterr().out
    refined, network = (_live(str(tmp_path / name)).sort_by("spectrum_id") for name in ("refined", "network"))
    assert "teff_cnn" not in network.column_names and "feh_cnn" not in refined.column_names
    # The network's labels are kept beside the refined ones, and are what --no-refine writes.
    for name in ("teff", "logg"):
        assert refined.column(f"{name}_cnn").equals(network.column(name))
        assert not refined.column(name).equals(network.column(name))
    for name in ("feh", "mgfe", "alfe"):
        assert refined.column(name).equals(network.column(name))
    # The refined labels are those of the fit in process.
    table = labelled["good"].sort_by("spectrum_id")
    arrays = spectra_arrays(table, tiny_setup)
    inputs, good = model_inputs(arrays, tiny_setup)
    _, ivar = arrays.concatenated(tiny_setup)
    start = np.stack([network.column(n).to_numpy() for n in LABELS], 1).astype(np.float64)
    fitted, _ = refine_labels(library, config, inputs, np.where(good, ivar, 0), good, start)
    np.testing.assert_allclose(refined.column("teff").to_numpy(), fitted[:, 0], rtol=1e-5)
