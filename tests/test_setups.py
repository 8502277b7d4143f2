import tomllib
from pathlib import Path

import numpy as np
import pytest

from speclabel.core.errors import ConfigError
from speclabel.core.setups import Setup, available_setups, get_setup
from speclabel.pipeline.simulate import load_line_list


def test_default_setup_grids_match_the_data_contract(setup):
    hr10, hr21 = setup.arm("hr10"), setup.arm("hr21")
    assert (hr10.wave_start, hr10.wave_end, hr10.n_pixels, hr10.resolution) == (5339.0, 5619.0, 5601, 19800.0)
    assert (hr21.wave_start, hr21.wave_end, hr21.n_pixels, hr21.resolution) == (
        8484.0,
        9001.0,
        10341,
        16200.0,
    )
    assert setup.n_pixels == 15942
    assert np.allclose(np.diff(setup.wave[:5601]), 0.05)
    assert setup.medium == "air"
    assert "giraffe-hr10-hr21" in available_setups()


def test_line_windows_cover_the_named_lines(setup):
    masks = setup.window_masks()
    wave = setup.wave
    for group, line in [
        ("Mg I", 5528.40),
        ("Mg I", 8806.76),
        ("Al I", 8773.0),
        ("Ca II", 8542.09),
        ("H I", 8750.47),
    ]:
        assert masks[group][np.argmin(np.abs(wave - line))], (group, line)
    assert not masks["Al I"][np.argmin(np.abs(wave - 5528.40))]
    assert set(setup.label_lines["mgfe"]) == {"Mg I"}
    # A label's own windows: the union of its groups (log g is read from Ca II and Mg I).
    np.testing.assert_array_equal(setup.label_line_mask("logg"), masks["Ca II"] | masks["Mg I"])
    assert not setup.label_line_mask("vmic").any()


def test_setup_round_trips_through_a_dict(setup):
    again = Setup.from_dict(setup.to_dict())
    assert again == setup
    assert again.same_grid(setup)


def test_custom_setup_file_and_errors(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        'name = "mine"\n[[arms]]\nname = "b"\nwave_start = 5000.0\nwave_step = 0.1\n'
        "n_pixels = 11\nresolution = 5000.0\n"
    )
    mine = get_setup(str(path))
    assert mine.arm("b").wave_end == pytest.approx(5001.0)
    with pytest.raises(ConfigError, match="unknown setup"):
        get_setup("no-such-setup")
    with pytest.raises(ConfigError, match="no arm"):
        mine.arm("hr10")
    with pytest.raises(ConfigError, match="unknown window group"):
        Setup.from_dict({**mine.to_dict(), "label_lines": {"teff": ["X I"]}})


SHIPPED = Path(__file__).resolve().parents[1] / "core" / "setups"
# The nominal ranges (Angstrom) each arm of a shipped setup must stay inside, from the TOML comments'
# sources: Gaia-ESO HR15N, the ESO 4MOST HRS specification.
NOMINAL = {
    ("giraffe-hr15n", "hr15n"): (6444.0, 6816.0),
    ("4most-hrs", "blue"): (3926.0, 4355.0),
    ("4most-hrs", "green"): (5160.0, 5730.0),
    ("4most-hrs", "red"): (6100.0, 6790.0),
}


@pytest.mark.parametrize("name", ["giraffe-hr10-hr21", "giraffe-hr15n", "4most-hrs"])
def test_shipped_setup_is_its_toml_file(name):
    raw = tomllib.loads((SHIPPED / f"{name}.toml").read_text())
    loaded = get_setup(name)
    assert name in available_setups() and loaded.name == raw["name"] == name
    assert [(a.name, a.wave_start, a.wave_step, a.n_pixels, a.resolution) for a in loaded.arms] == [
        (a["name"], a["wave_start"], a["wave_step"], a["n_pixels"], a["resolution"]) for a in raw["arms"]
    ]
    assert loaded.n_pixels == sum(a["n_pixels"] for a in raw["arms"]) == loaded.wave.size
    for arm in loaded.arms:
        assert np.allclose(np.diff(arm.wave), arm.wave_step)
        lo, hi = NOMINAL.get((name, arm.name), (arm.wave_start, arm.wave_end))
        assert lo <= arm.wave_start and arm.wave_end <= hi + 1e-9
        assert hi - arm.wave_end < arm.wave_step  # and fills it
        # At least Nyquist-sampled: two pixels or more per resolution element (lambda / R).
        assert arm.wave_start / arm.resolution / arm.wave_step >= 2.0


@pytest.mark.parametrize("name", ["giraffe-hr10-hr21", "giraffe-hr15n", "4most-hrs"])
def test_every_line_window_holds_a_line_of_its_species_inside_an_arm(name):
    setup = get_setup(name)
    lines = load_line_list()
    for group, windows in setup.line_windows.items():
        own = lines.wave[lines.species == group]
        for lo, hi in windows:
            assert any(arm.wave_start <= lo and hi <= arm.wave_end for arm in setup.arms), (group, lo, hi)
            assert ((own >= lo) & (own <= hi)).any(), (name, group, lo, hi)


@pytest.mark.parametrize("name", ["giraffe-hr10-hr21", "giraffe-hr15n", "4most-hrs"])
def test_the_own_groups_of_a_label_share_no_pixel(name):
    """The evaluation report adds the shares of a label's own groups: they must not overlap."""
    setup = get_setup(name)
    masks = setup.window_masks()
    for label, groups in setup.label_lines.items():
        counts = np.sum([masks[g] for g in groups], axis=0)
        assert counts.max() <= 1, (name, label)


def test_new_setups_read_the_lines_their_labels_need():
    hr15n, hrs = get_setup("giraffe-hr15n"), get_setup("4most-hrs")
    cases = [
        (hr15n, "H I", 6562.80),
        (hr15n, "Al I", 6696.02),
        (hr15n, "Al I", 6698.67),
        (hr15n, "Ca I", 6717.68),
        (hr15n, "Fe II", 6516.08),
        (hrs, "Mg I", 5183.60),
        (hrs, "Mg I", 5172.68),
        (hrs, "Al I", 3961.52),
        (hrs, "Ca II", 3933.66),
        (hrs, "H I", 4340.46),
        (hrs, "H I", 6562.80),
        (hrs, "Ca I", 6162.17),
    ]
    for setup, group, line in cases:
        assert setup.window_masks()[group][np.argmin(np.abs(setup.wave - line))], (setup.name, group, line)
    assert hrs.label_lines["mgfe"] == ("Mg I",) and hrs.label_lines["alfe"] == ("Al I",)
    assert "mgfe" not in hr15n.label_lines  # no clean Mg I line in HR15N
    assert "Mg I" not in hr15n.line_windows
