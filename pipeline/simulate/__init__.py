"""The built-in synthetic survey: stellar spectra on a setup's grids with true labels.

A curve-of-growth simulator (:mod:`.spectra`: lines from ``data/lines.csv``, Boltzmann-Saha line
strengths, Voigt curves of growth, the arm's resolving power, noise and masked pixels) over labels
from a parametric Milky Way prior or a user's table of label sets (:mod:`.labels`), written as
chunked Parquet (:mod:`.survey`: each chunk from its own random stream keyed by (seed, chunk index),
so the same seed gives the same rows however many processes do the work) or in the Gaia-ESO-like
FITS layout that ``speclabel ingest`` reads (:mod:`.fits`), optionally with a Gaia-ESO-style label
catalogue beside them (:mod:`.label_catalogue`: absolute abundances, errors, nulls, flags);
:mod:`.catalogue` makes catalogue-scale label rows for query benchmarks and tests.

It sits in ``pipeline/`` as a data source, beside ingest: nothing else in ``pipeline/`` imports it.
"""

from .fits import FITS_SPECTRA_DIR, FITS_TRUTH_FILE, fits_truth_schema, write_fits, write_fits_chunk
from .label_catalogue import (
    LABEL_COLUMNS,
    SOLAR_ABUNDANCES,
    TRUTH_COLUMNS,
    LabelCatalogueConfig,
    catalogue_format,
    label_catalogue,
    write_label_catalogue,
)
from .labels import draw_labels, load_label_prior, resample_labels
from .spectra import LineList, load_line_list, microturbulence, synthesize
from .survey import (
    DEFECT_COLUMN,
    SurveyConfig,
    iter_survey,
    simulate_chunk,
    survey_fields,
    survey_schema,
    write_parquet,
)

__all__ = [
    "DEFECT_COLUMN",
    "FITS_SPECTRA_DIR",
    "FITS_TRUTH_FILE",
    "LABEL_COLUMNS",
    "SOLAR_ABUNDANCES",
    "TRUTH_COLUMNS",
    "LabelCatalogueConfig",
    "LineList",
    "SurveyConfig",
    "catalogue_format",
    "draw_labels",
    "fits_truth_schema",
    "iter_survey",
    "label_catalogue",
    "load_label_prior",
    "load_line_list",
    "microturbulence",
    "resample_labels",
    "simulate_chunk",
    "survey_fields",
    "survey_schema",
    "synthesize",
    "write_fits",
    "write_fits_chunk",
    "write_label_catalogue",
    "write_parquet",
]
