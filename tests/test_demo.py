"""`speclabel demo` end to end, at a tiny size, in its own process (it starts its own local Ray)."""

import json
import subprocess
import sys

import pyarrow.parquet as pq

from speclabel.core.labels import LABEL_NAMES
from speclabel.jobs.cli import main
from speclabel.pipeline.catalogue import Catalogue, Query


def test_demo_runs_every_stage_and_accounts_for_the_corrupt_file(tmp_path):
    out = tmp_path / "demo"
    argv = ["demo", "--n", "45", "--members", "2", "--epochs", "1", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "speclabel.jobs.cli", *argv], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for command in ("simulate", "ingest", "train", "label", "query", "evaluate"):
        assert f"$ speclabel {command}" in done.stdout
    # 15 delivered stars, one with a truncated FITS file: 14 stored, labelled and evaluated.
    truth = pq.read_table(out / "delivered" / "DEMO" / "labels.parquet")
    assert truth.num_rows == 15
    assert Catalogue.open(str(out / "catalogue")).count(Query()) == 14
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["rows"]["evaluated"] == 14
    assert "14 spectra in = 14 labelled + 0 quarantined" in done.stdout
    assert (out / "model" / "model.json").exists() and (out / "example_spectra.png").stat().st_size > 10_000
    # The model holds the training stars' noise-free spectra: the label step refined every label,
    # the abundances from their own line windows.
    config = json.loads((out / "model" / "model.json").read_text())["refine"]["config"]
    assert config["kept"] == list(LABEL_NAMES) and config["own_lines"] == ["mgfe", "alfe"]
    rows = Catalogue.open(str(out / "catalogue")).query(
        None, columns=["teff", "teff_cnn", "alfe", "alfe_cnn"]
    )
    for name in ("teff", "alfe"):
        assert rows.column(f"{name}_cnn").null_count == 0 and not rows.column(name).equals(
            rows.column(f"{name}_cnn")
        )
    assert metrics["refinement"]["labels"] == list(LABEL_NAMES)


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("not the demo's")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "precious.txt").exists()
