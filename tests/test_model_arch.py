"""Architectures: presets, configuration round trips, shapes, FLOP counts and masked pixels."""

import numpy as np
import pytest
import torch
from tiny import TINY_ARCH
from torch.utils.flop_counter import FlopCounterMode

from speclabel.core.arrays import SpectraArrays, model_inputs
from speclabel.core.errors import ConfigError
from speclabel.model.arch import (
    PAPER,
    PRESETS,
    ArchConfig,
    build_network,
    count_parameters,
    forward_flops,
    get_arch,
)


def test_paper_preset_is_the_published_network(setup):
    assert PRESETS["paper"] == PAPER
    assert (PAPER.conv_channels, PAPER.kernel_size, PAPER.pool_size) == ((8, 4, 2), 10, 2)
    assert (PAPER.dense_units, PAPER.dropout, PAPER.arms) == ((32,), 0.2, "joined")
    net = build_network(PAPER, setup)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [
        (1, 8, 10),
        (8, 4, 10),
        (4, 2, 10),
    ]
    pools = [m for m in net.modules() if isinstance(m, torch.nn.MaxPool1d)]
    assert [p.kernel_size for p in pools] == [2, 2, 2]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    # 15942 -> 15933 -> 7966 -> 7957 -> 3978 -> 3969 -> 1984 pixels x 2 channels
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(2 * 1984, 32), (32, 5)]
    assert all(
        isinstance(m, torch.nn.LeakyReLU) and m.negative_slope == 0.3
        for m in net.modules()
        if isinstance(m, torch.nn.LeakyReLU)
    )
    assert count_parameters(net) == sum(p.numel() for p in net.parameters()) > 0


def test_default_preset_is_the_measured_best_and_runs_on_the_real_grid(setup):
    default = get_arch()
    assert default is PRESETS["default"] and default.arms == "per_arm" and default.center_input
    net = build_network(default, setup).eval()
    assert net.branch_slices == [(0, 5601), (5601, 15942)]
    assert net(torch.ones(2, setup.n_pixels)).shape == (2, 5)


@pytest.mark.parametrize("arms", ["joined", "per_arm"])
@pytest.mark.parametrize("mask_channel", [False, True])
def test_output_shape_and_branches(tiny_setup, arms, mask_channel):
    arch = TINY_ARCH.replace(arms=arms, mask_channel=mask_channel)
    net = build_network(arch, tiny_setup)
    flux = torch.rand(4, tiny_setup.n_pixels)
    out = net(flux, torch.ones_like(flux, dtype=torch.bool))
    assert out.shape == (4, 5)
    assert len(net.branches) == (1 if arms == "joined" else 2)
    assert net.branches[0][0].in_channels == (2 if mask_channel else 1)
    with pytest.raises(ValueError, match="expected 160 pixels"):
        net(torch.rand(2, 100))


def test_flop_count_matches_torch_counter(tiny_setup, setup):
    for arch, s in (
        (TINY_ARCH, tiny_setup),
        (TINY_ARCH.replace(arms="per_arm", mask_channel=True), tiny_setup),
        (PAPER, setup),
    ):
        net = build_network(arch, s).eval()
        with FlopCounterMode(display=False) as counter:
            net(torch.rand(1, s.n_pixels))
        assert forward_flops(arch, s) == counter.get_total_flops()


def test_config_round_trips_and_toml(tmp_path):
    arch = TINY_ARCH.replace(arms="per_arm", mask_channel=True, notes="x")
    assert ArchConfig.from_dict(arch.to_dict()) == arch
    path = tmp_path / "wide.toml"
    path.write_text('[arch]\npreset = "paper"\nconv_channels = [16, 8, 4]\ndense_units = [64]\n')
    wide = get_arch(str(path))
    assert wide.name == "wide" and wide.conv_channels == (16, 8, 4) and wide.dense_units == (64,)
    assert (wide.kernel_size, wide.dropout) == (PAPER.kernel_size, PAPER.dropout)
    assert get_arch("paper", dropout=0.1).dropout == 0.1
    with pytest.raises(ConfigError, match="unknown architecture 'nope'"):
        get_arch("nope")
    with pytest.raises(ConfigError, match="unknown architecture option"):
        ArchConfig.from_dict({"conv_chanels": [1]})
    with pytest.raises(ConfigError, match="arms must be one of"):
        TINY_ARCH.replace(arms="both")


def test_too_deep_for_the_grid_is_a_config_error(tiny_setup):
    with pytest.raises(ConfigError, match="reduces an input"):
        build_network(TINY_ARCH.replace(conv_channels=(2,) * 7), tiny_setup)


def test_masked_pixels_never_reach_the_network_as_garbage(tiny_setup):
    """Whatever a masked pixel holds (NaN, 1e30, 0), model_inputs turns it into continuum and the
    prediction is that of the spectrum with continuum there; the mask channel sees the mask."""
    rng = np.random.default_rng(0)
    flux = rng.uniform(0.6, 1.0, (1, tiny_setup.n_pixels)).astype(np.float32)
    ivar = np.full_like(flux, 100.0)
    ivar[0, [5, 40, 120]] = 0.0
    predictions = []
    for arch in (TINY_ARCH, TINY_ARCH.replace(mask_channel=True)):
        torch.manual_seed(0)
        net = build_network(arch, tiny_setup).eval()
        outs = []
        for garbage in (np.nan, 1e30, 0.0):
            bad = flux.copy()
            bad[0, [5, 40, 120]] = garbage
            arrays = SpectraArrays(
                flux={"blue": bad[:, :96], "red": bad[:, 96:]},
                ivar={"blue": ivar[:, :96], "red": ivar[:, 96:]},
                status={},
                ivar_status={},
            )
            x, good = model_inputs(arrays, tiny_setup)
            assert np.isfinite(x).all() and not good[0, [5, 40, 120]].any()
            outs.append(net(torch.from_numpy(x), torch.from_numpy(good)).detach().numpy())
        assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
        continuum = flux.copy()
        continuum[0, [5, 40, 120]] = 1.0
        unmasked = net(torch.from_numpy(continuum), None).detach().numpy()
        # Without a mask channel a masked pixel is exactly continuum; with one, the mask changes the input.
        assert np.array_equal(outs[0], unmasked) == (not arch.mask_channel)
        predictions.append(outs[0])
