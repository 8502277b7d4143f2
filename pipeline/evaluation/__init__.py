"""Evaluation: how accurate, how precise and how physically grounded a model's labels are.

    from speclabel.pipeline.evaluation import from_model, from_catalogue, write_report
    write_report(from_model("models/ges-idr6"), "reports/ges-idr6")

:mod:`.inputs` gathers predicted and true labels (a model on its test split, or a catalogue joined
with a truth table), :mod:`.report` computes every number into ``metrics.json`` and writes
``report.md``, :mod:`.plots` draws its figures and :mod:`.population` reads the population saliency
sums a labelling run stored beside its release (``_population_saliency/``).
"""

from .inputs import Evaluation, from_catalogue, from_model
from .report import ReportOptions, evaluation_document, render_markdown, write_report

__all__ = [
    "Evaluation",
    "ReportOptions",
    "evaluation_document",
    "from_catalogue",
    "from_model",
    "render_markdown",
    "write_report",
]
