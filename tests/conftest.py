"""Shared fixtures: the default setup, small simulated surveys, and one local Ray instance per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from speclabel.pipeline.setups import get_setup
from speclabel.pipeline.simulate import SurveyConfig, simulate_chunk

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def setup():
    return get_setup("giraffe-hr10-hr21")


@pytest.fixture(scope="session")
def small_survey(setup):
    """40 simulated spectra with labels (one chunk), as an Arrow table."""
    return simulate_chunk(setup, SurveyConfig(n=40, seed=11, chunk_size=40), 0)


@pytest.fixture(scope="session")
def shared_data():
    if not (SHARED_DATA / "giraffe_synth_train.parquet").exists():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (start-up costs seconds on 2 cores)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local tests only; clusters use tokens
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            object_store_memory=200 * 2**20,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_setup():
    """A two-arm setup of 96 + 64 pixels with line windows, small enough for fast model tests."""
    from speclabel.pipeline.setups import Setup

    return Setup.from_dict(
        {
            "name": "tiny-two-arm",
            "arms": [
                {
                    "name": "blue",
                    "wave_start": 5000.0,
                    "wave_step": 0.5,
                    "n_pixels": 96,
                    "resolution": 5000.0,
                },
                {"name": "red", "wave_start": 8500.0, "wave_step": 0.5, "n_pixels": 64, "resolution": 5000.0},
            ],
            "line_windows": {"Fe I": [[5010.0, 5012.0], [5030.0, 5031.0]], "Ca II": [[8510.0, 8515.0]]},
            "label_lines": {"feh": ["Fe I"]},
        }
    )
