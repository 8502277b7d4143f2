"""The report's map of the evaluated spectra: a 2-D t-SNE of their penultimate-layer embeddings (the
screening map of Ambrosch et al. 2023), one panel per label coloured by it, flagged rows marked.

t-SNE from scikit-learn (Barnes-Hut, PCA initialisation, ``random_state`` fixed: the same rows give
the same map). Its input is the bounded sample of rows that :mod:`.inputs` kept (``MAP_ROWS``) in the
model's reference space (standardised, principal components; ``model/ood.py``) where the model has
one, else the standardised raw embeddings. A catalogue carries no embeddings, so it gets no map.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from speclabel.core.flags import Flag

from .inputs import Evaluation

RANDOM_STATE = 0
MARKED = Flag.EXTRAPOLATED | Flag.OUT_OF_DISTRIBUTION  # flags the map marks (model-level trust flags)


def map_section(ev: Evaluation) -> dict | None:
    """The map's numbers for metrics.json: rows mapped, flagged rows among them; None without embeddings."""
    if ev.embedding is None or ev.embedding_rows is None or len(ev.embedding_rows) < 5:
        return None
    flags = (
        ev.flags[ev.embedding_rows] if ev.flags is not None else np.zeros(len(ev.embedding_rows), np.int32)
    )
    return {
        "method": "t-SNE (scikit-learn), PCA initialisation, random_state 0",
        "rows": len(ev.embedding_rows),
        "of_rows": ev.n,
        "perplexity": perplexity(len(ev.embedding_rows)),
        "flagged": {flag.name.lower(): int(((flags & flag) != 0).sum()) for flag in Flag if flag & MARKED},
    }


def perplexity(n: int) -> float:
    return float(min(30.0, max(2.0, (n - 1) / 3.0)))


def coordinates(embedding: np.ndarray) -> np.ndarray:
    """The 2-D t-SNE of ``embedding [n, D]`` (standardised first)."""
    from sklearn.manifold import TSNE

    x = np.asarray(embedding, dtype=np.float64)
    std = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    tsne = TSNE(n_components=2, perplexity=perplexity(len(x)), init="pca", random_state=RANDOM_STATE)
    return tsne.fit_transform(x)


def embedding_map(ev: Evaluation, png, axis_label) -> bytes | None:
    """One panel per label (predicted value as colour) plus ood_score where known; flagged rows ringed."""
    if map_section(ev) is None:
        return None
    rows = ev.embedding_rows
    xy = coordinates(ev.embedding)
    flags = ev.flags[rows] if ev.flags is not None else np.zeros(len(rows), np.int32)
    marked = (flags & int(MARKED)) != 0
    panels = [(axis_label(name), ev.predicted[rows, k], "viridis") for k, name in enumerate(ev.labels)]
    if ev.ood_score is not None and np.isfinite(ev.ood_score[rows]).any():
        panels.append(("ood_score", ev.ood_score[rows], "magma"))
    columns = min(3, len(panels))
    n_rows = -(-len(panels) // columns)
    fig = Figure(figsize=(4.2 * columns, 3.8 * n_rows))
    size = 10 if len(rows) < 500 else 4
    for i, (title, colour, cmap) in enumerate(panels):
        ax = fig.add_subplot(n_rows, columns, i + 1)
        points = ax.scatter(xy[:, 0], xy[:, 1], c=colour, s=size, cmap=cmap, lw=0)
        fig.colorbar(points, ax=ax, shrink=0.85)
        if marked.any():
            ax.scatter(
                xy[marked, 0],
                xy[marked, 1],
                s=size * 5,
                facecolors="none",
                edgecolors="red",
                lw=0.8,
                label=f"flagged ({int(marked.sum())})",
            )
            ax.legend(loc="best", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"t-SNE of the penultimate-layer embeddings ({len(rows)} of {ev.n} spectra)", fontsize=10)
    fig.tight_layout()
    return png(fig)
