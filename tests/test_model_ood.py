"""The embedding reference: kNN distances against brute force, percentile scores uniform for rows drawn
like the training rows and 100 for foreign ones, a bounded order-free sample, storage in the model
directory (sha256, model_id, a model without one)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import LABELS, TINY_ARCH

from speclabel.core.errors import ConfigError, IntegrityError
from speclabel.model.arch import build_network
from speclabel.model.ensemble import Ensemble
from speclabel.model.io import MODEL_JSON, OOD_FILE, load_model, read_model_document, save_model
from speclabel.model.ood import (
    SAMPLE_SALT,
    EmbeddingReference,
    OODConfig,
    ReferenceSample,
    fit_embedding_reference,
    knn_distances,
)
from speclabel.model.scaling import LabelScaler
from speclabel.model.splits import hash_uniform

WIDTH = 24


def correlated_gaussian(n: int, seed: int) -> np.ndarray:
    """Embeddings with features of very different scales and correlations (as members' units have)."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(0).normal(size=(6, WIDTH)) * np.geomspace(0.01, 30, WIDTH)
    return rng.normal(size=(n, 6)) @ mixing + 5.0 + 0.05 * rng.normal(size=(n, WIDTH))


def ids(n: int, prefix: str = "star") -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


@pytest.fixture(scope="module")
def reference() -> EmbeddingReference:
    return fit_embedding_reference([(ids(3000), correlated_gaussian(3000, 1))], OODConfig(k=8, components=6))


def test_knn_distances_match_brute_force():
    rng = np.random.default_rng(2)
    points, queries = rng.normal(size=(300, 5)), rng.normal(size=(40, 5))
    full = np.linalg.norm(queries[:, None] - points[None], axis=2)
    want = np.sort(full, axis=1)[:, :4].mean(axis=1)
    assert np.allclose(knn_distances(queries, points, 4), want, rtol=1e-4)
    own = np.linalg.norm(points[:, None] - points[None], axis=2)
    np.fill_diagonal(own, np.inf)
    loo = np.sort(own, axis=1)[:, :4].mean(axis=1)
    assert np.allclose(knn_distances(points, points, 4, leave_one_out=True), loo, rtol=1e-4)


def test_rows_like_the_training_rows_score_uniformly(reference):
    scores = reference.score(correlated_gaussian(4000, 9))
    assert scores.min() >= 0 and scores.max() <= 100
    # Uniform on [0, 100]: every decile holds ~10 % (binomial sd 0.5 %), ~1 % beyond the 99th.
    deciles = np.histogram(scores, bins=10, range=(0, 100))[0] / scores.size
    assert np.all(np.abs(deciles - 0.1) < 0.025), deciles
    flagged = reference.beyond_threshold(scores).mean()
    assert 0.003 <= flagged <= 0.022, flagged


def test_foreign_rows_score_100_and_are_flagged(reference):
    rng = np.random.default_rng(4)
    like = correlated_gaussian(5, 5)
    shifted = like + 20 * correlated_gaussian(5, 6).std(axis=0)  # far along every feature
    noise = rng.normal(5.0, 1.0, (5, WIDTH))  # the right mean, none of the correlations
    scores = reference.score(np.concatenate([shifted, noise]))
    assert np.all(scores >= 99.9), scores
    assert reference.beyond_threshold(scores).all()
    # The percentile stops at 100; the relative distance keeps saying how far (the like rows ~1).
    far = reference.relative_distance(reference.distances(shifted))
    assert np.all(far > 5) and np.median(reference.relative_distance(reference.distances(like))) < 2
    nan = reference.score(np.full((1, WIDTH), np.nan))
    assert np.isnan(nan).all() and not reference.beyond_threshold(nan).any()


def test_the_reference_is_bounded_and_the_same_in_any_order():
    embeddings, names = correlated_gaussian(1000, 3), ids(1000)
    config = OODConfig(k=5, components=4, rows=200)
    whole = fit_embedding_reference([(names, embeddings)], config)
    order = np.random.default_rng(1).permutation(1000)
    batches = [
        ([names[i] for i in order[s : s + 64]], embeddings[order[s : s + 64]]) for s in range(0, 1000, 64)
    ]
    pieces = fit_embedding_reference(batches, config)
    assert whole.points.shape == (200, 4) and whole.n_fitted == 1000
    assert np.array_equal(whole.points, pieces.points) and np.array_equal(whole.loo, pieces.loo)
    # The sample is the rows with the smallest hashes: the first 200 of a sorted hash order.
    sample = ReferenceSample(200)
    sample.add(names, embeddings)
    assert np.array_equal(sample.embeddings, embeddings[sample.index].astype(np.float32))
    index, in_order = sample.in_order()
    assert np.all(np.diff(index) > 0) and np.array_equal(in_order, embeddings[index].astype(np.float32))
    every_key = hash_uniform(names, SAMPLE_SALT)
    assert np.array_equal(np.sort(sample.keys), np.sort(every_key)[:200])
    assert np.array_equal(
        sample.embeddings[np.argsort(sample.keys)], embeddings[np.argsort(every_key)[:200]].astype(np.float32)
    )


def test_config_is_checked():
    for bad in ({"k": 0}, {"components": 0}, {"rows": 5, "k": 5}, {"threshold": 100}):
        with pytest.raises(ConfigError):
            OODConfig(**bad)
    with pytest.raises(ConfigError, match="unknown"):
        OODConfig.from_dict({"neighbours": 3})


def tiny_ensemble(setup, n_members=2) -> Ensemble:
    torch.manual_seed(3)
    networks = [build_network(TINY_ARCH, setup) for _ in range(n_members)]
    return Ensemble(setup, TINY_ARCH, LabelScaler.fit(LABELS), networks)


def spectra(setup, n, seed):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.6, 1.0, (n, setup.n_pixels)).astype(np.float32), np.ones((n, setup.n_pixels), bool)


def test_the_reference_round_trips_through_the_model_directory(tiny_setup, tmp_path):
    ensemble = tiny_ensemble(tiny_setup)
    flux, mask = spectra(tiny_setup, 60, 1)
    embedding = ensemble.predict(flux, mask, embedding=True).embedding
    ensemble.ood = fit_embedding_reference([(ids(60), embedding)], OODConfig(k=3, components=5))
    without = tiny_ensemble(tiny_setup)
    model_id = save_model(ensemble, str(tmp_path / "with"))
    other_id = save_model(without, str(tmp_path / "without"))
    document = read_model_document(str(tmp_path / "with"))
    assert document["ood"]["file"] == OOD_FILE and document["ood"]["threshold"] == 99.0
    assert model_id != other_id  # the reference is part of what model_id covers

    loaded = load_model(str(tmp_path / "with"))
    for name, value in ensemble.ood.tensors().items():
        assert np.array_equal(loaded.ood.tensors()[name], value)
    test_flux, test_mask = spectra(tiny_setup, 7, 2)
    got = loaded.predict(test_flux, test_mask, ood=True)
    want = ensemble.ood.score(ensemble.predict(test_flux, test_mask, embedding=True).embedding)
    assert np.array_equal(got.ood_score, want) and got.embedding is None
    assert np.array_equal(got.out_of_distribution, want > 99.0)
    # The same distance relative to the reference's median leave-one-out one (a term of <label>_err).
    embedding = ensemble.predict(test_flux, test_mask, embedding=True).embedding
    median_own = np.median(ensemble.ood.loo)
    np.testing.assert_allclose(got.ood_distance, ensemble.ood.distances(embedding) / median_own, rtol=1e-12)

    # A model without a reference still loads and labels; its rows get no score and no flag.
    plain = load_model(str(tmp_path / "without"))
    assert plain.ood is None
    result = plain.predict(test_flux, test_mask, ood=True)
    assert result.ood_score is None and result.out_of_distribution is None and result.ood_distance is None


def test_a_changed_reference_file_is_refused(tiny_setup, tmp_path):
    ensemble = tiny_ensemble(tiny_setup)
    flux, mask = spectra(tiny_setup, 30, 1)
    embedding = ensemble.predict(flux, mask, embedding=True).embedding
    ensemble.ood = fit_embedding_reference([(ids(30), embedding)], OODConfig(k=3, components=4))
    save_model(ensemble, str(tmp_path / "m"))
    path = tmp_path / "m" / OOD_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="ood reference sha256"):
        load_model(str(tmp_path / "m"))
    path.unlink()
    with pytest.raises(IntegrityError, match="absent"):
        load_model(str(tmp_path / "m"))


def test_a_reference_of_other_members_is_refused(tiny_setup, tmp_path):
    """A reference fitted on a 2-member ensemble cannot score a 3-member one's embeddings."""
    two, three = tiny_ensemble(tiny_setup, 2), tiny_ensemble(tiny_setup, 3)
    flux, mask = spectra(tiny_setup, 30, 1)
    embedding = two.predict(flux, mask, embedding=True).embedding
    three.ood = fit_embedding_reference([(ids(30), embedding)], OODConfig(k=3, components=4))
    save_model(three, str(tmp_path / "m"))
    document = json.loads((tmp_path / "m" / MODEL_JSON).read_text())
    assert document["ood"]["embedding_width"] == 2 * TINY_ARCH.dense_units[-1]
    with pytest.raises(IntegrityError, match="the members give 24"):
        load_model(str(tmp_path / "m"))
