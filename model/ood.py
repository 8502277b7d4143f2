"""How far a spectrum lies from the training set, in the network's own representation.

The embedding of a spectrum is the members' penultimate-layer activations side by side
(``Prediction.embedding``, ``[M * U]``): what each member's output layer reads, so two spectra the
members treat alike lie close together whatever their pixels. :class:`EmbeddingReference` holds the
training set in that space, and :meth:`EmbeddingReference.score` says how unusual a spectrum is:

1. standardise every embedding feature with the training mean and standard deviation (features of
   different members and layers have very different scales);
2. project onto the leading principal components of the standardised training embeddings
   (``OODConfig.components``, a few dozen of the M * U): distances in a few dozen dimensions are
   cheap and not dominated by the many directions that are mostly noise;
3. the distance of a spectrum to the training set is the mean Euclidean distance to its ``k``
   nearest reference spectra;
4. its score is that distance as a percentile (0-100) of the reference spectra's own leave-one-out
   distances (each to its ``k`` nearest *other* reference spectra). A spectrum drawn like the
   training spectra scores uniformly between 0 and 100; one unlike any of them scores 100.

The reference is a bounded sample of the training rows (``OODConfig.rows``), chosen by a hash of
``spectrum_id`` (the same rows whatever order the data come in, in bounded memory), so scoring costs
the same for a training set of a thousand or of millions of spectra: one ``[b, C] x [C, rows]``
product and a partial sort per batch. A row whose score is above ``threshold`` (a percentile, 99 by
default: about 1 % of spectra like the training set) gets the OUT_OF_DISTRIBUTION flag.

Stored in the model directory as a safetensors file (``model/io.py`` lists it in ``model.json`` with
its sha256 and the settings of :meth:`EmbeddingReference.describe`); arrays in, arrays out, no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from speclabel.core.config import dataclass_from_dict
from speclabel.core.errors import ConfigError, InputError, IntegrityError

from .splits import hash_uniform

METHOD = "knn-percentile-v1"
SAMPLE_SALT = "speclabel-ood-sample-v1"
TENSORS = ("mean", "scale", "components", "points", "loo")
SCORE_CHUNK = 1024  # spectra scored at a time: a [chunk, rows] float32 distance matrix


@dataclass(frozen=True)
class OODConfig:
    """How the embedding reference is fitted (``[ood]`` in model.toml; not part of the members'
    configuration, so changing it refits the reference without retraining a member)."""

    k: int = 10  # nearest reference spectra averaged into a distance
    components: int = 32  # principal components kept
    rows: int = 5000  # reference spectra kept (the sample the standardisation and PCA are fitted on)
    threshold: float = 99.0  # percentile above which a row is OUT_OF_DISTRIBUTION

    def __post_init__(self) -> None:
        problems = []
        if self.k < 1:
            problems.append(f"k must be >= 1, got {self.k}")
        if self.components < 1:
            problems.append(f"components must be >= 1, got {self.components}")
        if self.rows < self.k + 1:
            problems.append(f"rows must be > k ({self.k}), got {self.rows}")
        if not 0 < self.threshold < 100:
            problems.append(f"threshold must be a percentile in (0, 100), got {self.threshold}")
        if problems:
            raise ConfigError("[ood]: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> OODConfig:
        return dataclass_from_dict(cls, data, what="[ood]")


@dataclass(frozen=True, eq=False)  # numpy fields
class EmbeddingReference:
    """The training set in the penultimate layer (see the module docstring)."""

    mean: np.ndarray  # [D] float64: training mean of each embedding feature
    scale: np.ndarray  # [D] float64: its standard deviation (1 where it is constant)
    components: np.ndarray  # [C, D] float64: principal axes of the standardised embeddings
    points: np.ndarray  # [R, C] float32: the reference spectra, projected
    loo: np.ndarray  # [R] float64, sorted: their leave-one-out kNN distances
    k: int
    threshold: float
    n_fitted: int  # training rows offered to the fit (the reference is a sample of them)

    def __post_init__(self) -> None:
        d, (c, r) = self.mean.shape[0], (self.components.shape[0], self.points.shape[0])
        shapes = {
            "mean": (self.mean.shape, (d,)),
            "scale": (self.scale.shape, (d,)),
            "components": (self.components.shape, (c, d)),
            "points": (self.points.shape, (r, c)),
            "loo": (self.loo.shape, (r,)),
        }
        wrong = {name: got for name, (got, want) in shapes.items() if got != want}
        if wrong or r <= self.k:
            raise IntegrityError(
                f"check 'ood reference': inconsistent embedding reference (shapes {wrong or 'fine'}, "
                f"{r} reference spectra for k = {self.k})"
            )

    @property
    def width(self) -> int:
        """Embedding features it expects (members x penultimate units)."""
        return self.mean.shape[0]

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """Embeddings ``[B, D]`` in the reference's principal-component space ``[B, C]`` (float32)."""
        embeddings = np.asarray(embeddings, dtype=np.float64)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.width:
            raise InputError(f"expected embeddings [n, {self.width}], got {embeddings.shape}")
        return (((embeddings - self.mean) / self.scale) @ self.components.T).astype(np.float32)

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """Mean distance ``[B]`` of each embedding to its ``k`` nearest reference spectra."""
        return knn_distances(self.project(embeddings), self.points, self.k)

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """Percentile ``[B]`` (0-100, float64) of each embedding's kNN distance among the reference
        spectra's leave-one-out kNN distances; NaN for a non-finite embedding."""
        return self.score_of_distance(self.distances(embeddings))

    def score_of_distance(self, distance: np.ndarray) -> np.ndarray:
        """:meth:`score` of kNN distances ``[B]`` (:meth:`distances`) already computed."""
        distance = np.asarray(distance, dtype=np.float64)
        score = 100.0 * np.searchsorted(self.loo, distance, side="left") / self.loo.shape[0]
        return np.where(np.isfinite(distance), score, np.nan)

    @property
    def typical_distance(self) -> float:
        """The median of the reference spectra's own leave-one-out kNN distances: the unit of
        :meth:`relative_distance`."""
        return float(np.median(self.loo))

    def relative_distance(self, distance: np.ndarray) -> np.ndarray:
        """kNN distances ``[B]`` (:meth:`distances`) in units of :attr:`typical_distance`: ~1 for a
        spectrum like the training spectra, growing without bound for one unlike any of them (the
        percentile :meth:`score` stops at 100). What the error calibration scales the ensemble
        std by (``model/calibration.py``): the members' disagreement understates the error more
        the further a spectrum lies from what they learnt from."""
        return np.asarray(distance, dtype=np.float64) / self.typical_distance

    def beyond_threshold(self, score: np.ndarray) -> np.ndarray:
        """Boolean ``[B]``: the OUT_OF_DISTRIBUTION flag (False for a NaN score)."""
        with np.errstate(invalid="ignore"):
            return np.asarray(score) > self.threshold

    def tensors(self) -> dict[str, np.ndarray]:
        """The arrays stored in the model directory's safetensors file."""
        return {name: np.ascontiguousarray(getattr(self, name)) for name in TENSORS}

    def describe(self) -> dict:
        """What model.json says about the reference (with the file and its sha256, from io.py)."""
        return {
            "method": METHOD,
            "k": self.k,
            "components": int(self.components.shape[0]),
            "reference_rows": int(self.points.shape[0]),
            "fitted_rows": self.n_fitted,
            "embedding_width": self.width,
            "threshold": self.threshold,
            "fitted_on": "training rows (train + validation of every member; no test-split row)",
            "score": "percentile of the mean distance to the k nearest reference spectra among the "
            "reference spectra's own leave-one-out distances, after standardising each feature and "
            "projecting onto the leading principal components",
        }

    @classmethod
    def from_stored(cls, tensors: dict[str, np.ndarray], description: dict) -> EmbeddingReference:
        """The reference from its stored arrays and its model.json section."""
        if description.get("method") != METHOD:
            raise IntegrityError(
                f"check 'ood reference': method {description.get('method')!r} is not {METHOD!r}, "
                "the one this speclabel reads"
            )
        missing = sorted(set(TENSORS) - set(tensors))
        if missing:
            raise IntegrityError(f"check 'ood reference': the stored reference lacks {missing}")
        try:
            return cls(
                mean=tensors["mean"].astype(np.float64),
                scale=tensors["scale"].astype(np.float64),
                components=tensors["components"].astype(np.float64),
                points=tensors["points"].astype(np.float32),
                loo=tensors["loo"].astype(np.float64),
                k=int(description["k"]),
                threshold=float(description["threshold"]),
                n_fitted=int(description["fitted_rows"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(
                f"check 'ood reference': invalid description {description!r}: {exc}"
            ) from exc


def knn_distances(
    queries: np.ndarray, points: np.ndarray, k: int, *, leave_one_out: bool = False
) -> np.ndarray:
    """Mean Euclidean distance ``[B]`` of each query ``[B, C]`` to its ``k`` nearest ``points [R, C]``.

    ``leave_one_out``: the queries are the points themselves, and each one's own zero distance is
    left out. In chunks of :data:`SCORE_CHUNK` queries, so memory stays at ``chunk x R`` floats.
    """
    points = np.asarray(points, dtype=np.float32)
    queries = np.asarray(queries, dtype=np.float32)
    point_norms = np.einsum("ij,ij->i", points, points)
    out = np.empty(queries.shape[0], dtype=np.float64)
    for start in range(0, queries.shape[0], SCORE_CHUNK):
        chunk = queries[start : start + SCORE_CHUNK]
        squared = (
            np.einsum("ij,ij->i", chunk, chunk)[:, None] + point_norms[None, :] - 2.0 * (chunk @ points.T)
        )
        np.maximum(squared, 0.0, out=squared)  # rounding can take a tiny distance below zero
        if leave_one_out:
            rows = np.arange(chunk.shape[0])
            squared[rows, start + rows] = np.inf
        nearest = np.partition(squared, k - 1, axis=1)[:, :k]
        out[start : start + chunk.shape[0]] = np.sqrt(nearest.astype(np.float64)).mean(axis=1)
    return out


class ReferenceSample:
    """The ``rows`` embeddings with the smallest hash of their ``spectrum_id``, gathered batch by
    batch in bounded memory (the same sample whatever the order of the batches). ``index``: each
    kept row's position among all rows offered; ``offered``: rows offered with a finite embedding."""

    def __init__(self, rows: int):
        self.rows = rows
        self.keys = np.empty(0, dtype=np.float64)
        self.index = np.empty(0, dtype=np.int64)
        self.embeddings: np.ndarray | None = None
        self.offered = 0
        self._seen = 0

    def add(self, spectrum_ids: Sequence[str], embeddings: np.ndarray) -> None:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(spectrum_ids):
            raise InputError(f"{len(spectrum_ids)} spectrum ids for embeddings of shape {embeddings.shape}")
        finite = np.isfinite(embeddings).all(axis=1)
        self.offered += int(finite.sum())
        index = np.flatnonzero(finite) + self._seen
        self._seen += embeddings.shape[0]
        keys = hash_uniform(list(spectrum_ids), SAMPLE_SALT)[finite]
        embeddings = embeddings[finite]
        if self.embeddings is None:
            self.embeddings = np.empty((0, embeddings.shape[1]), dtype=np.float32)
        keys = np.concatenate([self.keys, keys])
        index = np.concatenate([self.index, index])
        embeddings = np.concatenate([self.embeddings, embeddings])
        if keys.shape[0] > self.rows:
            keep = np.argpartition(keys, self.rows - 1)[: self.rows]
            keys, index, embeddings = keys[keep], index[keep], embeddings[keep]
        self.keys, self.index, self.embeddings = keys, index, embeddings

    def in_order(self) -> tuple[np.ndarray, np.ndarray]:
        """``(index, embeddings)`` of the kept rows in the order they were offered."""
        order = np.argsort(self.index, kind="stable")
        width = 0 if self.embeddings is None else self.embeddings.shape[1]
        embeddings = self.embeddings if self.embeddings is not None else np.empty((0, width), np.float32)
        return self.index[order], embeddings[order]


def fit_embedding_reference(
    batches: Iterable[tuple[Sequence[str], np.ndarray]], config: OODConfig = OODConfig()
) -> EmbeddingReference:
    """The reference of the training rows' embeddings: ``batches`` of ``(spectrum_ids, embeddings
    [b, D])``, e.g. ``Ensemble.predict(..., embedding=True).embedding`` over the training rows."""
    sample = ReferenceSample(config.rows)
    for ids, embeddings in batches:
        sample.add(ids, embeddings)
    if sample.embeddings is None or sample.embeddings.shape[0] <= config.k:
        n = 0 if sample.embeddings is None else sample.embeddings.shape[0]
        raise InputError(
            f"the embedding reference needs more than k = {config.k} training spectra with finite "
            f"embeddings, got {n}"
        )
    order = np.argsort(sample.keys, kind="stable")  # a reproducible row order
    embeddings = sample.embeddings[order].astype(np.float64)
    mean = embeddings.mean(axis=0)
    std = embeddings.std(axis=0)
    # A feature constant over the training set keeps its raw unit: dividing by ~0 would make any
    # rounding-level change in it dominate every distance.
    scale = np.where(std > 1e-6 * max(float(std.max()), np.finfo(np.float64).tiny), std, 1.0)
    standardised = (embeddings - mean) / scale
    _, _, axes = np.linalg.svd(standardised, full_matrices=False)
    components = axes[: min(config.components, axes.shape[0])]
    # Fix each axis's sign (SVD leaves it free): the same data give the same stored reference.
    signs = np.sign(components[np.arange(components.shape[0]), np.abs(components).argmax(axis=1)])
    components = components * signs[:, None]
    points = (standardised @ components.T).astype(np.float32)
    loo = np.sort(knn_distances(points, points, config.k, leave_one_out=True))
    return EmbeddingReference(
        mean=mean,
        scale=scale,
        components=components,
        points=points,
        loo=loo,
        k=config.k,
        threshold=config.threshold,
        n_fitted=sample.offered,
    )
