"""The label job: spectra through the ensemble (labels, ensemble std, saliency) into the catalogue.

:mod:`.batch` holds the per-batch steps (pure functions over Arrow tables), :mod:`.inputs` the
driver's pre-pass over the input and the Ray read stage, :mod:`.labeller` the actor that holds the
ensemble, :mod:`.outputs` the driver's staging of every output, and :mod:`.job` the Ray Data job
that ties them together and publishes a release::

    import ray
    from speclabel.pipeline.labelling import LabelOptions, label_spectra
    ray.init()
    result = label_spectra("survey.parquet", "models/ges-v1", "labels/", LabelOptions(release="DR5"))
    print(result.summary())
"""

from .batch import FlagThresholds
from .job import LabelOptions, LabelResult, label_spectra
from .outputs import read_population_saliency

__all__ = ["FlagThresholds", "LabelOptions", "LabelResult", "label_spectra", "read_population_saliency"]
