"""The name scripts written against speclabel 0.1 import: the contract moved to ``speclabel.core``.

New code imports :mod:`speclabel.core.contract` (schemas, validation, quarantine reasons) and
:mod:`speclabel.core.arrays` (tables to network arrays) directly.
"""

from speclabel.core.arrays import SpectraArrays, model_inputs, spectra_arrays
from speclabel.core.contract import QUARANTINE_SCHEMA, spectra_schema, validate
from speclabel.core.labels import LABEL_NAMES, LABELS

__all__ = [
    "LABELS",
    "LABEL_NAMES",
    "QUARANTINE_SCHEMA",
    "SpectraArrays",
    "model_inputs",
    "spectra_arrays",
    "spectra_schema",
    "validate",
]
