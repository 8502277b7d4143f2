"""Tiny models and spectra files shared by the label job tests."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tiny import TINY_ARCH

from speclabel.model.arch import build_network
from speclabel.model.ensemble import Ensemble
from speclabel.model.io import save_model
from speclabel.model.scaling import LabelScaler
from speclabel.pipeline.simulate import SurveyConfig, simulate_chunk

ARCH = TINY_ARCH.replace(dropout=0.1)


def tiny_ensemble(setup, *, seed: int = 0, members: int = 3, labels: np.ndarray | None = None) -> Ensemble:
    """Random small networks (no training: these tests need labels, not accurate ones) with a label
    scaling fitted on ``labels`` (default: the simulator's labels of 40 spectra)."""
    if labels is None:
        survey = simulate_chunk(setup, SurveyConfig(n=40, seed=99, chunk_size=40), 0)
        labels = np.stack(
            [survey.column(c).to_numpy() for c in ("teff", "logg", "feh", "mgfe", "alfe")], axis=1
        )
    torch.manual_seed(seed)
    networks = [build_network(ARCH, setup) for _ in range(members)]
    return Ensemble(
        setup, ARCH, LabelScaler.fit(labels), networks, member_info=[{"seed": i} for i in range(members)]
    )


def saved_model(setup, folder, **kwargs) -> tuple[str, Ensemble]:
    ensemble = tiny_ensemble(setup, **kwargs)
    save_model(ensemble, str(folder))
    return str(folder), ensemble


def spectra_file(setup, path, *, n: int, seed: int, release: str = "DR1", row_group: int = 16) -> pa.Table:
    """``n`` simulated spectra in a Parquet file with row groups of ``row_group`` rows."""
    table = simulate_chunk(setup, SurveyConfig(n=n, seed=seed, chunk_size=n, release=release), 0)
    pq.write_table(table, path, row_group_size=row_group)
    return table
