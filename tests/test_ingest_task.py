"""Ingest's tasks (pipeline/ingest/task.py) without Ray: a file damaged after the scan, and the shared
training spectra through scan, plan and task, and back through FITS files."""

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from speclabel.core import contract
from speclabel.core.arrays import spectra_arrays
from speclabel.core.setups import SPEED_OF_LIGHT_KMS
from speclabel.pipeline.ingest import (
    TASK_SCHEMA,
    IngestOptions,
    TaskContext,
    assemble_star,
    ingest_task,
    make_plan,
)

OPTIONS = IngestOptions(release="T")


def test_a_parquet_file_damaged_after_the_scan_is_quarantined_not_fatal(tmp_path, setup, small_survey):
    path = tmp_path / "survey.parquet"
    pq.write_table(small_survey.slice(0, 3), path)
    units = pa.Table.from_pylist(
        [{"task": 0, "kind": "parquet", "paths": [str(path)], "row_group": 0, "row_offset": 0, "n_rows": 3}],
        schema=TASK_SCHEMA,
    )
    path.write_bytes(b"PAR1 overwritten by a half-finished copy")
    fs = pafs.LocalFileSystem()
    ctx = TaskContext(fs, fs, setup, OPTIONS, "run", str(tmp_path / "stage"), str(tmp_path / "q"))
    output = ingest_task(units, ctx)
    assert output.store_rows.num_rows == 0 and output.spectra_quarantined == 3
    assert output.quarantine_rows.column("reason").to_pylist() == [contract.CORRUPT_FILE]
    assert output.files == [
        {"path": str(path), "sha256": None, "outcome": "quarantined", "reason": "corrupt_file"}
    ]


@pytest.mark.shared_data
def test_shared_training_spectra_pass_through_and_survive_a_fits_round_trip(shared_data, setup, tmp_path):
    from speclabel.pipeline.fits_formats import write_wcs1d
    from speclabel.pipeline.ingest import scan_block

    path = str(shared_data / "giraffe_synth_train.parquet")
    fs = pafs.LocalFileSystem()
    plan = make_plan(scan_block(pa.table({"path": [path]}), fs=fs, setup=setup), OPTIONS)
    ctx = TaskContext(fs, fs, setup, OPTIONS, "run", str(tmp_path / "stage"), str(tmp_path / "q"))
    outputs = [ingest_task(task, ctx) for task in plan.tasks]
    stored = pa.concat_tables([o.store_rows for o in outputs])
    # The shared set grows between releases of it: compare with the file, never a fixed count.
    n_rows = pq.read_metadata(path).num_rows
    assert stored.num_rows + sum(o.spectra_quarantined for o in outputs) == plan.spectra_in == n_rows
    assert stored.num_rows == n_rows
    original = pq.read_table(path).slice(0, 4)
    arrays = spectra_arrays(original, setup)
    np.testing.assert_array_equal(spectra_arrays(stored.slice(0, 4), setup).flux["hr21"], arrays.flux["hr21"])

    # The same spectra as Gaia-ESO-like FITS files (observed at -80 km/s) come back on the same grid.
    for k, sid in enumerate(original.column("spectrum_id").to_pylist()):
        files = []
        for arm in setup.arms:
            ivar = arrays.ivar[arm.name][k]
            sigma = np.where(ivar > 0, 1 / np.sqrt(np.where(ivar > 0, ivar, 1)), 0)
            scale = 1 - 80.0 / SPEED_OF_LIGHT_KMS
            cards = {"CNAME": sid, "SETUP": arm.name.upper(), "VRAD": -80.0}
            data = write_wcs1d(
                arrays.flux[arm.name][k],
                sigma,
                wave_start=arm.wave_start * scale,
                wave_step=arm.wave_step * scale,
                medium="air",
                cards=cards,
            )
            files.append((f"{sid}_{arm.name}.fits", data))
        star = assemble_star(sid, files, setup, OPTIONS)
        assert star.stored, star.quarantine
        for arm in setup.arms:
            good = arrays.ivar[arm.name][k] > 0
            np.testing.assert_array_equal(star.arms[arm.name].ivar > 0, good)
            np.testing.assert_allclose(
                star.arms[arm.name].flux[good], arrays.flux[arm.name][k][good], rtol=1e-5, atol=1e-6
            )
