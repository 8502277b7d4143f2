"""A prepared batch with bad rows and an EnsembleLabeller over a tiny saved model, shared by the tests
of labelling/labeller.py and labelling/outputs.py."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from label_data import saved_model

from speclabel.pipeline.labelling import batch as B
from speclabel.pipeline.labelling.labeller import EnsembleLabeller, LabellerSettings
from speclabel.pipeline.simulate import SurveyConfig, simulate_chunk


def prepared_batch(setup, n: int = 10, seed: int = 3) -> pa.Table:
    """``n`` simulated spectra from ``in.parquet`` through ``batch.prepare``; row 1 has a NaN flux at
    an unmasked pixel, row 2 is a duplicate."""
    table = simulate_chunk(setup, SurveyConfig(n=n, seed=seed, chunk_size=n), 0)
    arm = setup.arms[0]
    flux = [list(v) for v in table.column(arm.flux_column).to_pylist()]
    ivar = table.column(arm.ivar_column).to_pylist()
    flux[1][next(i for i, w in enumerate(ivar[1]) if w > 0)] = float("nan")
    index = table.schema.get_field_index(arm.flux_column)
    table = table.set_column(index, arm.flux_column, pa.array(flux, pa.list_(pa.float32())))
    table = table.append_column(B.SOURCE, pa.array(["in.parquet"] * n))
    duplicate = np.zeros(n, dtype=bool)
    duplicate[2] = True
    return B.prepare(table.append_column(B.DUPLICATE, pa.array(duplicate)), setup)


def spec_of(ensemble, saliency: str | None = "full") -> B.OutputSpec:
    return B.OutputSpec(
        label_names=tuple(ensemble.label_names),
        saliency_groups=tuple(ensemble.setup.line_windows),
        saliency=saliency,
        members=False,
        n_pixels=ensemble.setup.n_pixels,
    )


def labeller(setup, folder, *, saliency: str | None = "full", **settings) -> tuple[EnsembleLabeller, object]:
    model, ensemble = saved_model(setup, folder)
    spec = spec_of(ensemble, saliency)
    return (
        EnsembleLabeller(
            LabellerSettings(
                model_location=model,
                setup=setup,
                spec=spec,
                thresholds=B.FlagThresholds(),
                run_id="run-1",
                model_id=ensemble.model_id,
                **settings,
            )
        ),
        ensemble,
    )
