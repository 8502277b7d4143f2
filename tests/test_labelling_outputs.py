"""labelling/outputs.py: staging the actors' output, counting every row per source, moving the side
outputs to their run-keyed folders, the population table, and abort leaving nothing behind."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from labeller_batches import labeller, prepared_batch

from speclabel.core.contract import quarantine_table
from speclabel.core.errors import InputError
from speclabel.pipeline.labelling import batch as B
from speclabel.pipeline.labelling.outputs import RunOutputs, read_population_saliency
from speclabel.pipeline.publish import Dataset


@pytest.fixture(scope="module")
def output_batches(tiny_setup, tmp_path_factory):
    batches = [prepared_batch(tiny_setup, n=8, seed=s) for s in (1, 2)]
    # The simulator numbers the ids of each chunk from 0: row 0's id is in both batches, one map each.
    first = batches[0].column("spectrum_id")[0].as_py()
    actor, ensemble = labeller(tiny_setup, tmp_path_factory.mktemp("model"), map_ids=frozenset({first}))
    return [actor(b) for b in batches], actor.settings.spec, ensemble


def test_rows_are_staged_counted_and_published_to_run_keyed_folders(tiny_setup, output_batches, tmp_path):
    batches, spec, ensemble = output_batches
    dataset = Dataset.open(str(tmp_path / "cat"))
    outputs = RunOutputs(dataset, "DR1", "run-1", spec, tiny_setup.wave)
    for batch in batches:
        outputs.add(batch)
    outputs.quarantine(quarantine_table(["x", "y"], ["wrong_setup: another"] * 2, "other.parquet"))
    assert outputs.labelled == {"in.parquet": 12}  # 2 x (8 rows - a NaN row - a duplicate)
    assert outputs.quarantined == {"in.parquet": 4, "other.parquet": 2}
    assert outputs.reasons == {"duplicate_id": 2, "nonfinite_flux": 2, "wrong_setup": 2}
    assert outputs.rows_to_actors == 16 and len(outputs.actors) == 1
    written = outputs.close()
    assert written["catalogue"]["rows"] == 12 and written["quarantine_rows"] == 6
    assert written["saliency_maps"] == 2 and written["population_saliency_spectra"] == 12

    moved = outputs.publish_side_outputs()
    assert set(moved) == {"_quarantine", "_saliency", "_population_saliency"}
    quarantine = pq.read_table(dataset.path(moved["_quarantine"][0]))
    assert sorted(quarantine.column("source").to_pylist()).count("other.parquet") == 2
    population = pq.read_table(dataset.path(moved["_population_saliency"][0]))
    assert population.column("label").to_pylist() == list(ensemble.label_names)
    sums = np.array(population.column("sum").to_pylist())
    np.testing.assert_allclose(np.array(population.column("mean").to_pylist()), sums / 12, rtol=1e-6)
    np.testing.assert_allclose(np.array(population.column("wave").to_pylist()[0]), tiny_setup.wave)


def test_abort_removes_what_the_run_staged_and_moved(tiny_setup, output_batches, tmp_path):
    batches, spec, _ = output_batches
    dataset = Dataset.open(str(tmp_path / "cat"))
    outputs = RunOutputs(dataset, "DR1", "run-2", spec, tiny_setup.wave)
    outputs.add(batches[0])
    outputs.close()
    moved = outputs.publish_side_outputs()
    outputs.abort()
    assert not os.path.exists(dataset.staging_dir("run-2"))
    assert not any(os.path.exists(dataset.path(paths[0])) for paths in moved.values())
    with pytest.raises(InputError, match="no release"):
        read_population_saliency(str(tmp_path / "cat"), "DR1")


def test_batches_without_saliency_write_no_maps_or_population(tiny_setup, tmp_path):
    actor, _ = labeller(tiny_setup, tmp_path / "model", saliency=None)
    dataset = Dataset.open(str(tmp_path / "cat"))
    outputs = RunOutputs(dataset, "DR1", "run-3", actor.settings.spec, tiny_setup.wave)
    outputs.add(actor(prepared_batch(tiny_setup, n=5)))
    written = outputs.close()
    assert written["saliency_maps"] == 0 and written["population_saliency_spectra"] == 0
    assert set(outputs.publish_side_outputs()) == {"_quarantine"}
    assert B.MAP_PREFIX + "teff" not in actor.settings.spec.summary_columns
