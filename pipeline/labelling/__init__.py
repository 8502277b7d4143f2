"""The label job: spectra through the ensemble (labels, ensemble std, saliency) into the catalogue.

:mod:`.batch` holds the per-batch steps (pure functions over Arrow tables), :mod:`.inputs` the
driver's pre-pass over the input and the Ray read stage, :mod:`.labeller` the actor that holds the
ensemble, :mod:`.outputs` the driver's staging of every output, :mod:`.options` what a run is asked to do,
:mod:`.resources` how it spreads over the cluster, :mod:`.reuse` whether it has work to do and what
it may keep, and :mod:`.job` the Ray Data job that ties them together and publishes a release::

    import ray
    from speclabel.pipeline.labelling import LabelOptions, label_spectra
    ray.init()
    result = label_spectra("survey.parquet", "models/ges-v1", "labels/", LabelOptions(release="DR5"))
    print(result.summary())
"""

from speclabel.core.lazy import lazy_exports

# Exports load on first use (PEP 562): the read/prepare tasks import this package to unpickle
# `batch.prepare`, and must not pay for torch, which only the driver and the actors need.
_EXPORTS = {
    "FlagThresholds": "batch",
    "LabelOptions": "options",
    "LabelResult": "options",
    "label_spectra": "job",
    "read_population_saliency": "outputs",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
