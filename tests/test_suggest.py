"""`speclabel suggest`: the score, k-center, the flag and N checks, the bounded pools, one CLI run."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pytest
from catalogue_data import build_catalogue
from label_data import saved_model

from speclabel.core.errors import InputError
from speclabel.core.flags import Flag
from speclabel.jobs.cli import main
from speclabel.model.io import save_model
from speclabel.model.refine import ReferenceLibrary, RefineConfig, Refinement
from speclabel.pipeline.catalogue import Catalogue
from speclabel.pipeline.suggest import (
    MEDIAN_CLIENTS,
    CandidatePools,
    covered_points,
    k_center,
    k_median,
    nearest_distance,
    score_parts,
    select,
)
from speclabel.pipeline.suggest_job import scored_candidates

LABELS = ("a", "b")
WIDTHS = np.array([2.0, 0.5])


def candidates(labels, std, *, ood=None, flags=None, sky=None) -> pa.Table:
    """Catalogue-like rows: labels and stds [N, 2], optional ood_score, flags and sky cells."""
    labels, std = np.asarray(labels, float), np.asarray(std, float)
    n = len(labels)
    columns = {
        "spectrum_id": [f"s{i:04d}" for i in range(n)],
        "flags": flags if flags is not None else [0] * n,
    }
    for k, name in enumerate(LABELS):
        columns[name], columns[f"{name}_std"] = labels[:, k], std[:, k]
    if ood is not None:
        columns["ood_score"] = ood
    columns["sky"] = pa.array(sky if sky is not None else [0] * n, pa.int32())
    return scored_candidates(pa.table(columns), LABELS, WIDTHS, frozenset())


def test_score_by_hand_err_first_then_std():
    std = np.array([[0.2, 0.1], [0.2, 0.1], [np.nan, np.nan]])
    err = np.array([[0.4, np.nan], [np.nan, np.nan], [np.nan, np.nan]])
    parts = score_parts(std, err, np.array([50.0, np.nan, 100.0]), WIDTHS)
    first = np.sqrt(((0.4 / 2.0) ** 2 + (0.1 / 0.5) ** 2) / 2)  # err where known, else std
    second = np.sqrt(((0.2 / 2.0) ** 2 + (0.1 / 0.5) ** 2) / 2)
    np.testing.assert_allclose(parts["score_uncertainty"][:2], [first, second])
    np.testing.assert_allclose(parts["score_novelty"], [0.5, 0.0, 1.0])
    # No uncertainty at all counts as 1: the novelty alone ranks such rows.
    np.testing.assert_allclose(parts["score"], [first * 1.5, second, 2.0])
    assert np.isnan(parts["score_uncertainty"][2])


def test_prefers_rows_far_from_the_training_set():
    # Same labels region, same ensemble std: only the distance to the training set differs.
    rng = np.random.default_rng(0)
    labels = rng.normal(0, 1, (40, 2))
    ood = np.full(40, 20.0)
    ood[[7, 23]] = [99.0, 97.0]
    table = candidates(labels, np.full((40, 2), 0.1), ood=ood)
    pools = CandidatePools(per_partition=40)
    pools.add(table)
    picks = select(pools, 2, LABELS, WIDTHS)
    assert picks.column("spectrum_id").to_pylist()[0] == "s0007"
    assert picks.column("rank").to_pylist() == [1, 2]
    top = np.argsort(-table.column("score").to_numpy())[:2]
    assert sorted(top) == [7, 23]


def test_k_center_covers_clusters_instead_of_twins():
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = np.concatenate([c + 0.1 * rng.standard_normal((20, 2)) for c in centres])
    weights = np.ones(60)
    weights[:20] = 5.0  # the first cluster scores best: without diversity all picks would sit there
    picks = k_center(points, 3, weights)
    assert sorted(picks // 20) == [0, 1, 2]
    # Unweighted: the cover radius is within twice the best possible one (the three centres' ~0.3).
    plain = k_center(points, 3)
    radius = np.sqrt(((points[:, None] - points[plain][None]) ** 2).sum(-1)).min(1).max()
    assert radius < 1.0


def test_k_median_follows_the_weight_and_gives_an_outlier_one_pick():
    """A dense cluster of 300 uncertain rows, a sparse one of 20, a lone outlier: k-center spends
    its picks on covering (half of them outside the dense cluster); k-median places them where
    the weight is, still one on each other group, never two on the outlier."""
    rng = np.random.default_rng(2)
    dense, sparse = rng.normal(0.0, 0.3, (300, 2)), rng.normal(5.0, 0.3, (20, 2))
    points = np.concatenate([dense, sparse, [[20.0, 20.0]]])
    weights = np.ones(len(points))
    groups = {"dense": slice(0, 300), "sparse": slice(300, 320), "outlier": slice(320, 321)}

    def counts(picks):
        return {g: int(((picks >= r.start) & (picks < r.stop)).sum()) for g, r in groups.items()}

    assert counts(k_center(points, 10, weights))["dense"] <= 5
    median = k_median(points, 10, weights)
    assert counts(median) == {"dense": 8, "sparse": 1, "outlier": 1}
    assert len(set(median.tolist())) == 10
    # Independent check of the first pick: the weighted medoid, the row of least sum of distances.
    distance_sums = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1)).sum(1)
    assert median[0] == np.argmin(distance_sums)
    # Beyond MEDIAN_CLIENTS rows the sum is measured on a spread sample: still valid, distinct picks.
    many = rng.normal(0.0, 1.0, (MEDIAN_CLIENTS + 500, 3))
    picks = k_median(many, 20, rng.uniform(0.1, 1.0, len(many)))
    assert len(set(picks.tolist())) == 20
    with pytest.raises(InputError, match="cannot pick"):
        k_median(points, len(points) + 1)


def test_covered_selection_fills_the_gaps_the_reference_stars_leave():
    """Three clusters of candidates, the first scoring best; reference stars already sit on the
    first two. Uncovered, both selections start in the best-scored cluster; covered, both start in
    the third, and k-center takes one pick there before it returns to the covered clusters."""
    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = np.concatenate([c + 0.3 * rng.standard_normal((20, 2)) for c in centres])
    weights = np.ones(60)
    weights[:20] = 5.0
    reference = np.concatenate([c + 0.3 * rng.standard_normal((30, 2)) for c in centres[:2]])
    for method in (k_center, k_median):
        assert method(points, 1, weights)[0] // 20 == 0
        assert method(points, 1, weights, covered=reference)[0] // 20 == 2
    assert sorted(k_center(points, 3, weights, covered=reference) // 20)[-1] == 2
    # Covered, k-center's first pick is the candidate of largest weight times distance to the
    # nearest reference star (brute force).
    brute = np.sqrt(((points[:, None] - reference[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(
        nearest_distance(points, reference, cells=7 * len(reference)), brute, rtol=1e-9, atol=1e-9
    )
    assert k_center(points, 1, weights, covered=reference)[0] == np.argmax(weights * brute)
    assert np.isinf(nearest_distance(points, None)).all()
    # The reference stars' labels in the selection's space: reordered by name, divided by the widths.
    stars = np.array([[0.5, 4.0], [1.0, 2.0]])  # columns b, a
    np.testing.assert_allclose(covered_points(stars, ("b", "a"), LABELS, WIDTHS), [[2.0, 1.0], [1.0, 2.0]])
    with pytest.raises(InputError, match="no label"):
        covered_points(stars, ("b", "c"), LABELS, WIDTHS)


def test_select_runs_either_diversity_and_refuses_an_unknown_one():
    rng = np.random.default_rng(3)
    table = candidates(rng.normal(0.0, 1.0, (60, 2)), np.full((60, 2), 0.1))
    pools = CandidatePools(per_partition=60)
    pools.add(table)
    for diversity in ("k-center", "k-median"):
        picks = select(pools, 5, LABELS, WIDTHS, diversity=diversity)
        assert picks.num_rows == 5 and picks.column("rank").to_pylist() == [1, 2, 3, 4, 5]
    with pytest.raises(InputError, match="diversity must be one of"):
        select(pools, 5, LABELS, WIDTHS, diversity="random")


def test_flagged_rows_are_never_suggested_but_ood_ones_are():
    n = 12
    flags = [0] * n
    flags[0], flags[1], flags[2] = Flag.ANOMALOUS_SPECTRUM, Flag.LOW_SNR, Flag.HEAVILY_MASKED | Flag.HIGH_STD
    flags[3], flags[4] = Flag.OUT_OF_DISTRIBUTION, Flag.EXTRAPOLATED | Flag.HIGH_STD
    std = np.full((n, 2), 0.05)
    std[:5] = 1.0  # the flagged rows are the most uncertain
    table = candidates(np.arange(2 * n, dtype=float).reshape(n, 2), std, flags=flags)
    assert table.column("spectrum_id").to_pylist()[:2] == ["s0003", "s0004"]
    pools = CandidatePools(per_partition=n)
    pools.add(table)
    ids = select(pools, n - 3, LABELS, WIDTHS).column("spectrum_id").to_pylist()
    assert not {"s0000", "s0001", "s0002"} & set(ids) and len(ids) == n - 3


def test_more_suggestions_than_candidates_is_a_clear_error():
    pools = CandidatePools(per_partition=10)
    pools.add(candidates(np.zeros((5, 2)), np.ones((5, 2)), flags=[0, 0, 0, 0, Flag.ANOMALOUS_SPECTRUM]))
    with pytest.raises(InputError, match="asked for 5 suggestions but only 4 rows qualify"):
        select(pools, 5, LABELS, WIDTHS)
    with pytest.raises(InputError, match="per-partition bound"):
        select(pools, 11, LABELS, WIDTHS)


def test_pools_stay_within_their_bound_and_keep_the_right_rows():
    # 4 partitions x 500 rows, streamed in batches of 100; each partition has one row far more
    # uncertain than the rest, at its own corner of label space: those four are the answer.
    rng = np.random.default_rng(2)
    pools, m = CandidatePools(per_partition=10), 10
    special = {}
    for batch in range(20):
        sky = np.repeat(np.arange(4), 25)
        labels, std = rng.normal(0, 0.3, (100, 2)), np.full((100, 2), 0.01) * rng.uniform(1, 2, (100, 1))
        for cell in range(4):
            if batch == 3 * cell + 1:
                row = cell * 25
                labels[row], std[row] = [(-1) ** cell * 5.0, (-1) ** (cell // 2) * 2.0], [0.5, 0.5]
        table = candidates(labels, std, sky=sky)
        ids = [f"b{batch:02d}-{i:03d}" for i in range(100)]
        table = table.set_column(0, "spectrum_id", pa.array(ids))
        special.update({ids[cell * 25]: cell for cell in range(4) if batch == 3 * cell + 1})
        pools.add(table)
        assert pools.rows <= m * 4
    assert pools.seen == 2000 and pools.peak_rows == m * 4
    assert {ids for ids in pools.pools} == {0, 1, 2, 3}
    picks = select(pools, 4, LABELS, WIDTHS)
    assert sorted(picks.column("spectrum_id").to_pylist()) == sorted(special)


@pytest.mark.ray
def test_cli_end_to_end_on_a_small_catalogue(ray_session, setup, tmp_path, capsys):
    root = tmp_path / "cat"
    rows = build_catalogue(root, {"DR1": 600})["DR1"]
    model, ensemble = saved_model(setup, tmp_path / "model", members=2)
    excluded = tmp_path / "observed.csv"
    pyarrow.csv.write_csv(pa.table({"spectrum_id": rows.column("spectrum_id")[:100]}), excluded)
    out = tmp_path / "targets.csv"
    argv = ["suggest", "--catalogue", str(root), "--model", model, "--n", "5", "--where", "snr > 8"]
    argv += ["--exclude", str(excluded), "--max-per-partition", "10", "--out", str(out)]
    assert main(argv) == 0
    picks = pyarrow.csv.read_csv(out)
    assert picks.column("rank").to_pylist() == list(range(1, 6))
    assert {"spectrum_id", "ra", "dec", "snr", "teff", "score", "score_uncertainty", "score_novelty"} <= set(
        picks.column_names
    )
    # Independently: the eligible rows and their scores, straight from the catalogue's files.
    table = Catalogue.open(str(root)).arrow_dataset().to_table()
    flags = table.column("flags").to_numpy()
    ids = np.array(table.column("spectrum_id").to_pylist())
    ok = ((flags & int(Flag.ANOMALOUS_SPECTRUM | Flag.LOW_SNR | Flag.HEAVILY_MASKED)) == 0) & (
        table.column("snr").to_numpy() > 8
    )
    ok &= ~np.isin(ids, rows.column("spectrum_id")[:100].to_pylist())
    names = ensemble.label_names
    std = np.stack([table.column(f"{n}_std").to_numpy() for n in names], 1) / ensemble.scaler.scale
    score = np.sqrt((std**2).mean(1))
    assert set(picks.column("spectrum_id").to_pylist()) <= set(ids[ok])
    assert picks.column("spectrum_id")[0].as_py() == ids[ok][np.argmax(score[ok])]
    np.testing.assert_allclose(picks.column("score")[0].as_py(), score[ok].max(), rtol=1e-5)
    # The bound held on a catalogue larger than it: at most 10 candidates per sky partition.
    cells = len(set(table.column("sky").to_pylist()))
    peak = int(re.search(r"at most (\d+) held", capsys.readouterr().out).group(1))
    assert 5 <= peak <= 10 * cells < table.num_rows
    # --diversity k-median: as many eligible picks from the same candidates; an unknown one is refused.
    assert main([*argv, "--diversity", "k-median", "--overwrite"]) == 0
    median = pyarrow.csv.read_csv(out)
    assert median.num_rows == 5 and set(median.column("spectrum_id").to_pylist()) <= set(ids[ok])
    capsys.readouterr()
    assert main([*argv, "--diversity", "nearest", "--overwrite"]) != 0
    assert "diversity must be one of ['k-center', 'k-median']" in capsys.readouterr().err
    # A model with reference spectra: its reference stars count as picks made. Here they sit on the
    # eligible rows of largest score, so the first pick is the largest score times the distance to
    # the nearest reference star (computed here by brute force) and no reference star is picked.
    labels = np.stack([table.column(n).to_numpy() for n in names], 1)
    stars = np.argsort(-np.where(ok, score, -np.inf))[:10]
    flux = np.ones((len(stars), setup.n_pixels), np.float32)
    ensemble.refinement = Refinement(
        ReferenceLibrary(labels[stars], flux, np.ones(flux.shape, bool), setup),
        RefineConfig(prior_width=tuple(float(w) for w in ensemble.scaler.scale)),
    )
    save_model(ensemble, str(tmp_path / "refined-model"))
    argv[argv.index(model)] = str(tmp_path / "refined-model")
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 0
    assert "away from the model's 10 reference stars" in capsys.readouterr().out
    covered = pyarrow.csv.read_csv(out).column("spectrum_id").to_pylist()
    points = labels / ensemble.scaler.scale
    nearest = np.sqrt(((points[:, None] - points[stars][None]) ** 2).sum(-1)).min(1)
    assert covered[0] == ids[ok][np.argmax((score * nearest)[ok])]
    assert not set(covered) & set(ids[stars])
    assert main([*argv, "--overwrite", "--ignore-reference-stars"]) == 0
    assert pyarrow.csv.read_csv(out).column("spectrum_id")[0].as_py() == ids[ok][np.argmax(score[ok])]
