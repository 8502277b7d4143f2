"""The built-in survey: determinism, shapes, noise model, line physics and chunked writing."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from speclabel.core import contract
from speclabel.core.arrays import spectra_arrays
from speclabel.core.labels import LABEL_NAMES, LABELS
from speclabel.jobs.cli import main
from speclabel.pipeline.simulate import (
    SurveyConfig,
    draw_labels,
    iter_survey,
    load_label_prior,
    simulate_chunk,
    synthesize,
)


def _star(**overrides):
    base = dict(
        teff=4700.0, logg=2.5, feh=-0.2, mgfe=0.1, alfe=0.05, alpha=0.08, vmic=1.4, vbroad=5.0, rv=0.0
    )
    base.update(overrides)
    return {k: np.array([v]) for k, v in base.items()}


def _depth_at(setup, flux, wavelength):
    return 1.0 - flux[np.argmin(np.abs(setup.wave - wavelength))]


def _width_near(setup, flux, wavelength, half_width=2.0):
    """Equivalent width (Angstrom) of the flux within ``half_width`` of a line."""
    near = np.abs(setup.wave - wavelength) <= half_width
    return float(np.sum((1.0 - flux[near]) * np.gradient(setup.wave)[near]))


def test_same_seed_same_rows_however_parallelised(setup):
    config = SurveyConfig(n=30, seed=5, chunk_size=10)
    serial = list(iter_survey(setup, config, workers=1))
    parallel = list(iter_survey(setup, config, workers=2))
    assert [t.num_rows for t in serial] == [10, 10, 10]
    for a, b in zip(serial, parallel, strict=True):
        assert a.equals(b)
    assert not simulate_chunk(setup, SurveyConfig(n=10, seed=6, chunk_size=10), 0).equals(serial[0])


def test_rows_follow_the_labelled_contract(setup, small_survey):
    assert small_survey.schema.equals(contract.spectra_schema(setup, labelled=True), check_metadata=False)
    assert list(contract.validate(small_survey, setup, labelled=True)) == [None] * 40
    arrays = spectra_arrays(small_survey, setup)
    for arm in setup.arms:
        assert arrays.flux[arm.name].shape == (40, arm.n_pixels)
        ivar = arrays.ivar[arm.name]
        assert (ivar >= 0).all()
        masked = (ivar == 0).mean()
        assert 0.0005 < masked < 0.01  # a few masked pixels, ~0.3 %
    ra, dec = small_survey.column("ra").to_numpy(), small_survey.column("dec").to_numpy()
    assert ((ra >= 0) & (ra < 360)).all() and ((dec > -90) & (dec < 90)).all()
    assert len(set(small_survey.column("spectrum_id").to_pylist())) == 40
    assert set(small_survey.column("release").to_pylist()) == {"SIM"}


def test_ivar_matches_the_noise_actually_added(setup):
    config = SurveyConfig(
        n=20, seed=2, chunk_size=20, snr_range=(40.0, 40.0), continuum_error=0.0, rv_residual_kms=0.0
    )
    table = simulate_chunk(setup, config, 0)
    rng = np.random.default_rng([2, 0])
    labels = draw_labels(rng, 20)
    labels["rv"] = np.zeros(20)
    clean = synthesize(setup, labels)
    arrays = spectra_arrays(table, setup)
    flux, ivar = arrays.concatenated(setup)
    good = ivar > 0
    pulls = ((flux - clean) * np.sqrt(ivar))[good]
    assert abs(pulls.std() - 1.0) < 0.02
    assert abs(pulls.mean()) < 0.01
    # The catalogued S/N is the continuum S/N of the first arm.
    assert np.allclose(table.column("snr").to_numpy(), 40.0)


def test_noise_free_stars_are_the_same_stars_without_noise(setup, tmp_path, capsys):
    noisy, clean = (tmp_path / "noisy.parquet", tmp_path / "clean.parquet")
    argv = ["simulate", "--n", "12", "--seed", "4", "--workers", "1"]
    assert main([*argv, "--out", str(noisy)]) == 0
    assert main([*argv, "--out", str(clean), "--noise-free"]) == 0
    observed, reference = pq.read_table(noisy), pq.read_table(clean)
    assert not any(name.startswith("ivar_") for name in reference.column_names)
    for name in ("spectrum_id", "ra", "dec", "snr", *LABEL_NAMES):
        assert reference.column(name).equals(observed.column(name)), name
    # The flux is the synthesis at the stars' labels, at rest, with nothing added.
    rng = np.random.default_rng([4, 0])
    labels = draw_labels(rng, 12)
    labels["rv"] = np.zeros(12)
    flux, _ = spectra_arrays(reference, setup).concatenated(setup)
    assert np.array_equal(flux, synthesize(setup, labels).astype(np.float32))
    assert main([*argv, "--out", str(tmp_path / "x"), "--noise-free", "--format", "fits"]) == 2
    assert "--noise-free writes reference spectra" in capsys.readouterr().err


def test_mg_and_al_lines_deepen_with_their_abundance_and_only_there(setup):
    base = synthesize(setup, _star())[0]
    more_mg = synthesize(setup, _star(mgfe=0.4))[0]
    more_al = synthesize(setup, _star(alfe=0.35))[0]
    for line in (5528.40, 8717.83, 8736.02, 8806.76):
        assert _depth_at(setup, more_mg, line) > _depth_at(setup, base, line) + 0.005, line
    for line in (8772.87, 8773.90):
        assert _depth_at(setup, more_al, line) > _depth_at(setup, base, line) + 0.01, line
    fe_only = 5383.37  # Fe I, far from Mg and Al lines
    assert _depth_at(setup, more_mg, fe_only) == pytest.approx(_depth_at(setup, base, fe_only), abs=1e-6)
    changed_by_al = np.abs(more_al - base) > 1e-4
    near_al = np.min(np.abs(setup.wave[:, None] - np.array([5557.06, 8772.87, 8773.90])), axis=1) < 2.0
    assert changed_by_al.any() and not (changed_by_al & ~near_al).any()


def test_lines_respond_to_teff_logg_and_metallicity(setup):
    cool, hot = synthesize(setup, _star(teff=4300.0))[0], synthesize(setup, _star(teff=6300.0, logg=4.2))[0]
    paschen = 8750.47
    assert _depth_at(setup, hot, paschen) > _depth_at(setup, cool, paschen) + 0.05  # H lines need heat
    low_exc_fe = 5371.49
    assert _depth_at(setup, cool, low_exc_fe) > _depth_at(setup, hot, low_exc_fe)  # excitation
    poor = synthesize(setup, _star(feh=-1.5))[0]
    base = synthesize(setup, _star())[0]
    assert (1 - poor).sum() < 0.6 * (1 - base).sum()  # metal-poor spectra have weaker lines
    giant, dwarf = synthesize(setup, _star(logg=1.5))[0], synthesize(setup, _star(logg=4.5))[0]
    fe2 = 5534.85  # ion lines are gravity sensitive through the electron pressure
    assert _depth_at(setup, giant, fe2) > _depth_at(setup, dwarf, fe2) + 0.02
    assert np.all(base > 0) and np.all(base <= 1.0)


def test_prior_has_giants_dwarfs_and_two_alpha_sequences():
    labels = draw_labels(np.random.default_rng(0), 20000)
    giants, dwarfs = labels["logg"] < 3.5, labels["logg"] > 4.0
    assert 0.4 < giants.mean() < 0.75 and 0.2 < dwarfs.mean() < 0.5
    metal_poor = (labels["feh"] > -1.0) & (labels["feh"] < -0.6)
    assert np.median(labels["mgfe"][metal_poor]) > np.median(labels["mgfe"][labels["feh"] > 0.0]) + 0.1
    for name, label in zip(LABEL_NAMES, LABELS, strict=True):
        lo, hi = label.physical_range
        assert ((labels[name] > lo) & (labels[name] < hi)).all()


def test_label_prior_table(tmp_path, setup):
    path = tmp_path / "prior.csv"
    path.write_text("Teff,logg,FeH,MgFe,AlFe\n4800,2.5,-0.3,0.2,0.1\n5800,4.4,0.0,0.0,0.0\n")
    prior = load_label_prior(str(path))
    assert prior["teff"].tolist() == [4800.0, 5800.0]
    table = simulate_chunk(setup, SurveyConfig(n=50, seed=1, chunk_size=50), 0, prior)
    teff = table.column("teff").to_numpy()
    assert np.all((np.abs(teff - 4800) < 250) | (np.abs(teff - 5800) < 250))


def test_cli_writes_one_row_group_per_chunk(tmp_path, setup):
    out = tmp_path / "survey.parquet"
    assert (
        main(
            [
                "simulate",
                "--n",
                "25",
                "--out",
                str(out),
                "--seed",
                "4",
                "--chunk-size",
                "10",
                "--workers",
                "1",
                "--snr-range",
                "20",
                "30",
            ]
        )
        == 0
    )
    meta = pq.ParquetFile(out).metadata
    assert (meta.num_rows, meta.num_row_groups) == (25, 3)
    assert [meta.row_group(i).num_rows for i in range(3)] == [10, 10, 5]
    snr = pq.read_table(out, columns=["snr"]).column("snr").to_numpy()
    assert snr.min() >= 20 and snr.max() <= 30
    assert not list(tmp_path.glob(".tmp-*"))  # published atomically, no leftovers


def test_cli_refuses_an_existing_output_without_overwrite(tmp_path, capsys):
    out = tmp_path / "survey.parquet"
    argv = ["simulate", "--n", "3", "--out", str(out), "--workers", "1"]
    assert main(argv) == 0
    written = out.read_bytes()
    assert main([*argv, "--seed", "5"]) == 2
    assert f"{out} exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == written
    assert main([*argv, "--seed", "5", "--overwrite"]) == 0
    assert out.read_bytes() != written


def test_cli_fits_overwrite_leaves_no_star_of_the_old_survey(tmp_path, capsys):
    out = tmp_path / "fits"
    argv = ["simulate", "--n", "4", "--format", "fits", "--out", str(out), "--workers", "1"]
    assert main(argv) == 0
    old = {p.name for p in (out / "spectra").rglob("*.fits")}
    assert main([*argv[:2], "2", *argv[3:], "--seed", "9"]) == 2
    assert "labels.parquet exists" in capsys.readouterr().err
    (out / "labels.parquet").unlink()  # a half-removed output is still refused: spectra/ is there
    assert main([*argv[:2], "2", *argv[3:], "--seed", "9"]) == 2
    assert "spectra exists" in capsys.readouterr().err
    assert main([*argv[:2], "2", *argv[3:], "--seed", "9", "--overwrite"]) == 0
    new = {p.name for p in (out / "spectra").rglob("*.fits")}
    assert len(old) == 4 * 2 and len(new) == 2 * 2 and new < old  # stars 2 and 3 of the old one are gone
    assert pq.read_table(out / "labels.parquet").num_rows == 2


# (setup, Al I lines, Mg I lines, a Balmer line) of the new setups; HR15N has no Mg I line.
NEW_SETUP_LINES = [
    ("giraffe-hr15n", (6696.02, 6698.67), (), 6562.80),
    (
        "4most-hrs",
        (3944.01, 3961.52, 5557.06, 6696.02, 6698.67),
        (4167.27, 5172.68, 5183.60, 5711.09),
        4340.46,
    ),
]


@pytest.mark.parametrize(("name", "al_lines", "mg_lines", "balmer"), NEW_SETUP_LINES)
def test_new_setups_have_their_lines_and_they_respond_to_the_labels(name, al_lines, mg_lines, balmer):
    from speclabel.core.setups import get_setup

    setup = get_setup(name)
    base = synthesize(setup, _star())[0]
    assert np.all(base > 0) and np.all(base <= 1.0)
    for arm, part in setup.arm_slices.items():
        assert (1 - base[part]).mean() > 0.01, arm  # every arm has absorption lines
    more_al = synthesize(setup, _star(alfe=0.35))[0]
    # Equivalent widths within 2 A: saturated resonance lines (Al I 3944, 3961) grow in the wings.
    for line in al_lines:
        assert _width_near(setup, more_al, line) > _width_near(setup, base, line) + 0.005, line
    near_al = np.min(np.abs(setup.wave[:, None] - np.array(al_lines)), axis=1) < 40.0
    assert not ((np.abs(more_al - base) > 1e-4) & ~near_al).any()  # Al changes only Al lines
    more_mg = synthesize(setup, _star(mgfe=0.4))[0]
    for line in mg_lines:
        assert _width_near(setup, more_mg, line) > _width_near(setup, base, line) + 0.005, line
    cool, hot = synthesize(setup, _star(teff=4300.0))[0], synthesize(setup, _star(teff=6300.0, logg=4.2))[0]
    assert _depth_at(setup, hot, balmer) > _depth_at(setup, cool, balmer) + 0.05
    poor = synthesize(setup, _star(feh=-1.5))[0]
    assert (1 - poor).sum() < 0.6 * (1 - base).sum()
