import numpy as np
import pytest

from speclabel.core.errors import ConfigError
from speclabel.core.setups import Setup, available_setups, get_setup


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
