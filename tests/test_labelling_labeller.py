"""labelling/labeller.py: the actor's call, in process: labels equal the ensemble's, bad rows go to
quarantine, one summary row per batch, the label.batch fault, a model changed under the run."""

import numpy as np
import pytest
from labeller_batches import labeller, prepared_batch

from speclabel.core.errors import ConfigError
from speclabel.core.faults import Fault, InjectedFault
from speclabel.pipeline.labelling import batch as B
from speclabel.pipeline.labelling.labeller import EnsembleLabeller, LabellerSettings


def test_a_batch_becomes_catalogue_quarantine_and_summary_rows(tiny_setup, tmp_path):
    batch = prepared_batch(tiny_setup)
    ids = batch.column("spectrum_id").to_pylist()
    actor, ensemble = labeller(tiny_setup, tmp_path / "model", map_ids=frozenset({ids[3], ids[1]}))
    out = actor(batch)
    catalogue, quarantine, maps, summaries = B.split_output(out, actor.settings.spec)
    assert sorted(quarantine.column("reason").to_pylist()) == ["duplicate_id", "nonfinite_flux"]
    good = [i for i in range(batch.num_rows) if i not in (1, 2)]
    assert catalogue.column("spectrum_id").to_pylist() == [ids[i] for i in good]
    _, flux, mask = B.model_batch(batch)
    expected = ensemble.predict(flux, mask, saliency="full")
    np.testing.assert_allclose(catalogue.column("teff").to_numpy(), expected.mean[:, 0], rtol=1e-5, atol=1e-4)
    assert set(catalogue.column("run_id").to_pylist()) == {"run-1"}
    assert maps.column("spectrum_id").to_pylist() == [ids[3]]  # ids[1] was quarantined
    assert summaries.num_rows == 1 and summaries.column(B.BATCH_ROWS).to_pylist() == [batch.num_rows]
    population = B.summary_accumulator(summaries, len(ensemble.label_names), tiny_setup.n_pixels)
    assert population.count == len(good)
    np.testing.assert_allclose(
        population.mean, expected.saliency_maps.astype(np.float64).mean(axis=0), rtol=1e-4, atol=1e-9
    )


def test_the_label_batch_fault_fails_the_actor_after_its_batches(tiny_setup, tmp_path):
    actor, _ = labeller(
        tiny_setup, tmp_path / "model", saliency=None, fault=Fault("label.batch", {"batches": "1"})
    )
    batch = prepared_batch(tiny_setup, n=4)
    actor(batch)
    with pytest.raises(InjectedFault, match=r"label\.batch"):
        actor(batch)


def test_a_model_changed_during_the_run_is_refused(tiny_setup, tmp_path):
    actor, _ = labeller(tiny_setup, tmp_path / "model", saliency=None)
    changed = LabellerSettings(**{**actor.settings.__dict__, "model_id": "0" * 16})
    with pytest.raises(ConfigError, match="changed during the run"):
        EnsembleLabeller(changed)
    with pytest.raises(ConfigError, match="precision"):
        LabellerSettings(**{**actor.settings.__dict__, "precision": "fp8"})
