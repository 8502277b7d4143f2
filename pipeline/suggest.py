"""Which labelled rows to get reference labels for next: a score per row and N diverse picks.

``speclabel suggest`` (and ``bench/suggest.py``) rank catalogue rows by how much a reference label
for them would teach the model. Per row, with ``w_l`` the training labels' standard deviation of
label ``l`` (``model.calibration.prior_widths``: labels in comparable units):

* ``score_uncertainty = sqrt(mean_l (u_l / w_l)^2)`` with ``u_l`` the calibrated ``<label>_err``
  where it is not null, else the ensemble disagreement ``<label>_std`` (labels lacking both are left
  out of the mean; null when every label lacks both);
* ``score_novelty = ood_score / 100``: how far the spectrum lies from the training set in the
  members' embedding space, as a percentile of the training spectra's own distances (0 .. 1; 0
  where ``ood_score`` is null: a model without an embedding reference);
* ``score = score_uncertainty * (1 + score_novelty)``: the uncertainty, up to doubled for a
  spectrum unlike every training spectrum (a null uncertainty counts as 1, so the novelty alone
  ranks the rows of a one-member model without calibration).

Rows with a flag of :data:`DISQUALIFYING` are never suggested (a binary, emission, a cosmic ray or a
bad continuum is a bad reference star; so is a spectrum too noisy or too masked to train on); the
out-of-distribution, extrapolation and high-std flags are what the score looks for and do not
disqualify.

Diversity, in standardised predicted-label space (``labels / w``), so N picks are not N twins of
one odd star (:data:`DIVERSITY`): greedy k-center (farthest-point; the default), each step taking
the row with the largest ``score * distance to the rows taken`` (:func:`k_center`: covers the
edges of the candidates first), or greedy weighted k-median, each step taking the row that most
lowers the score-weighted sum of the candidates' distances to their nearest pick
(:func:`k_median`: picks where the uncertain rows are, an outlier at most once). In bounded memory
(:class:`CandidatePools`): at most ``per_partition`` best-scored rows are held per sky partition,
the selection picks up to N within each partition, then once more over the partitions' winners
(:func:`select`); ``rank`` is the merge's pick order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from speclabel.core.errors import InputError
from speclabel.core.flags import Flag
from speclabel.model.calibration import errors_or_std

DISQUALIFYING = Flag.ANOMALOUS_SPECTRUM | Flag.HEAVILY_MASKED | Flag.LOW_SNR
SCORE_COLUMNS = ("score", "score_uncertainty", "score_novelty")
# k_median measures its distance sum on at most this many candidate rows ([N, 2000] float32).
MEDIAN_CLIENTS = 2000
PARTITION = "sky"  # the catalogue's sky partition (pipeline.catalogue.layout.SKY)


def score_parts(
    std: np.ndarray, err: np.ndarray | None, ood_score: np.ndarray | None, widths: np.ndarray
) -> dict[str, np.ndarray]:
    """``score``, ``score_uncertainty`` and ``score_novelty`` ``[N]`` (float64, see the module
    docstring) from ``std`` and ``err`` ``[N, L]`` (NaN = null; ``err`` None: no calibration) and
    ``ood_score`` ``[N]`` (None or NaN: no reference)."""
    scaled = (errors_or_std(err, std) / np.asarray(widths, dtype=np.float64)) ** 2
    known = np.isfinite(scaled)
    counts = known.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        uncertainty = np.sqrt(np.where(known, scaled, 0.0).sum(axis=1) / counts)
    uncertainty[counts == 0] = np.nan
    novelty = np.zeros(len(scaled)) if ood_score is None else np.asarray(ood_score, dtype=np.float64) / 100.0
    novelty = np.where(np.isfinite(novelty), novelty, 0.0)
    score = np.where(np.isfinite(uncertainty), uncertainty, 1.0) * (1.0 + novelty)
    return {"score": score, "score_uncertainty": uncertainty, "score_novelty": novelty}


def pairwise_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The Euclidean distances ``[N, M]`` between the rows of ``a [N, D]`` and ``b [M, D]`` (through
    the squared norms: one matrix product, no ``[N, M, D]`` difference array)."""
    squared = (a**2).sum(axis=1)[:, None] + (b**2).sum(axis=1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))


def nearest_distance(points: np.ndarray, covered: np.ndarray | None, cells: int = 1 << 22) -> np.ndarray:
    """The distance of each row of ``points [N, D]`` to its nearest row of ``covered [S, D]`` (inf
    without any), in chunks of candidate rows of at most ``cells`` distances each (32 MB of
    float64 by default, whatever the size of a survey's reference set)."""
    nearest = np.full(len(points), np.inf)
    if covered is None or len(covered) == 0:
        return nearest
    covered = np.asarray(covered, dtype=np.float64)
    chunk = max(1, cells // len(covered))
    for begin in range(0, len(points), chunk):
        nearest[begin : begin + chunk] = pairwise_distance(points[begin : begin + chunk], covered).min(axis=1)
    return nearest


def k_center(
    points: np.ndarray, n: int, weights: np.ndarray | None = None, covered: np.ndarray | None = None
) -> np.ndarray:
    """Indices of ``n`` rows of ``points [N, D]`` in pick order: each time the row with the largest
    ``weight * (distance to the nearest row taken or covered)``; with nothing ``covered`` the first
    pick is the largest weight. ``covered [S, D]``: points already held (the model's reference
    stars), so the picks fill the gaps they leave rather than cover the candidates afresh (the
    core-set selection of Sener & Savarese 2018). Without ``weights`` or ``covered`` this is plain
    farthest-point k-center (a 2-approximation of the best cover)."""
    points = np.asarray(points, dtype=np.float64)
    if n > len(points):
        raise InputError(f"cannot pick {n} of {len(points)} rows")
    weights = np.ones(len(points)) if weights is None else np.asarray(weights, dtype=np.float64)
    nearest = nearest_distance(points, covered)
    taken = np.zeros(len(points), dtype=bool)
    picks = np.empty(n, dtype=np.int64)
    for i in range(n):
        gain = weights if np.isinf(nearest).all() else weights * nearest
        pick = int(np.argmax(np.where(taken, -np.inf, gain)))
        picks[i], taken[pick] = pick, True
        nearest = np.minimum(nearest, np.sqrt(((points - points[pick]) ** 2).sum(axis=1)))
    return picks


def k_median(
    points: np.ndarray, n: int, weights: np.ndarray | None = None, covered: np.ndarray | None = None
) -> np.ndarray:
    """Indices of ``n`` rows of ``points [N, D]`` in pick order by greedy weighted k-median (facility
    location): each time the row whose taking most lowers ``sum_i w_i * d_i``, ``d_i`` the distance
    of row ``i`` to its nearest row taken or ``covered`` (before the first pick, with nothing
    covered: the largest distance of any row to the weighted centre). Where k-center covers the
    edges of the candidates, this places picks where the weight lies: many uncertain rows in one
    region get several picks, a lone outlier at most one. The rows ``i`` measured are at most
    :data:`MEDIAN_CLIENTS` of them, spread evenly over the candidates' weight order, so memory is
    ``N x MEDIAN_CLIENTS`` floats whatever ``N``."""
    points = np.asarray(points, dtype=np.float64)
    if n > len(points):
        raise InputError(f"cannot pick {n} of {len(points)} rows")
    weights = np.ones(len(points)) if weights is None else np.asarray(weights, dtype=np.float64)
    clients = np.arange(len(points))
    if len(points) > MEDIAN_CLIENTS:
        clients = np.argsort(-weights, kind="stable")[
            np.linspace(0, len(points) - 1, MEDIAN_CLIENTS).astype(int)
        ]
    # [N, C] distances of every candidate to the measured rows, in float32 to halve the memory.
    distance = pairwise_distance(points, points[clients]).astype(np.float32)
    centre = np.average(points, axis=0, weights=weights if weights.sum() > 0 else None)
    farthest = float(np.sqrt(((points - centre) ** 2).sum(axis=1)).max())
    current = np.minimum(nearest_distance(points[clients], covered), farthest).astype(np.float32)
    client_weight = weights[clients].astype(np.float32)
    taken = np.zeros(len(points), dtype=bool)
    picks = np.empty(n, dtype=np.int64)
    for i in range(n):
        gain = (np.maximum(current[None, :] - distance, 0.0) * client_weight[None, :]).sum(axis=1)
        # A tie (e.g. no gain left: every measured row at distance 0) goes to the larger weight.
        gain = np.where(taken, -np.inf, gain + 1e-12 * weights)
        pick = int(np.argmax(gain))
        picks[i], taken[pick] = pick, True
        current = np.minimum(current, distance[pick])
    return picks


DIVERSITY = {"k-center": k_center, "k-median": k_median}
DEFAULT_DIVERSITY = "k-center"


def diversity_method(name: str):
    """The selection function :data:`DIVERSITY` names ``name``; InputError for any other name."""
    if name not in DIVERSITY:
        raise InputError(f"diversity must be one of {sorted(DIVERSITY)}, got {name!r}")
    return DIVERSITY[name]


def label_points(table: pa.Table, label_names: Sequence[str], widths: np.ndarray) -> np.ndarray:
    """The predicted labels of ``table`` divided by the training spreads ``[N, L]`` (a null label
    sits at 0 in its axis: it neither attracts nor repels picks)."""
    columns = [table.column(n).to_numpy(zero_copy_only=False).astype(np.float64) for n in label_names]
    points = np.stack(columns, axis=1) / np.asarray(widths, dtype=np.float64)
    return np.where(np.isfinite(points), points, 0.0)


def covered_points(
    labels: np.ndarray, names: Sequence[str], label_names: Sequence[str], widths: np.ndarray
) -> np.ndarray:
    """Reference stars' labels ``[S, len(names)]`` (columns ``names``) as points of the selection's
    space ``[S, L]``: the columns of ``label_names`` divided by ``widths``. InputError when the
    reference stars lack one of the labels."""
    missing = [n for n in label_names if n not in names]
    if missing:
        raise InputError(f"the reference stars have no label(s) {missing}")
    columns = [list(names).index(n) for n in label_names]
    return np.asarray(labels, dtype=np.float64)[:, columns] / np.asarray(widths, dtype=np.float64)


def diverse(
    table: pa.Table,
    n: int,
    label_names: Sequence[str],
    widths: np.ndarray,
    weighted: bool,
    diversity: str = DEFAULT_DIVERSITY,
    covered: np.ndarray | None = None,
) -> pa.Table:
    """The ``min(n, rows)`` rows of ``table`` that ``diversity`` (:data:`DIVERSITY`: :func:`k_center`
    or :func:`k_median`) picks, in pick order, away from the ``covered`` points (standardised
    labels, :func:`covered_points`)."""
    method = diversity_method(diversity)
    n = min(n, table.num_rows)
    weights = table.column("score").to_numpy() if weighted else None
    picks = method(label_points(table, label_names, widths), n, weights, covered)
    return table.take(pa.array(picks))


class CandidatePools:
    """The ``per_partition`` best-scored rows of each sky partition seen so far (ties: the smaller
    ``spectrum_id``), so the rows held never exceed ``per_partition`` times the partitions plus the
    batch being added. ``peak_rows``: the most rows held at once (after adding a batch)."""

    def __init__(self, per_partition: int):
        if per_partition < 1:
            raise InputError(f"per_partition must be >= 1, got {per_partition}")
        self.per_partition = per_partition
        self.pools: dict[int, pa.Table] = {}
        self.seen = 0  # rows offered
        self.peak_rows = 0

    @property
    def rows(self) -> int:
        return sum(t.num_rows for t in self.pools.values())

    def add(self, table: pa.Table) -> None:
        self.seen += table.num_rows
        cells = table.column(PARTITION).to_numpy(zero_copy_only=False)
        for cell in np.unique(cells):
            part = table.filter(pa.array(cells == cell))
            held = self.pools.get(int(cell))
            if held is not None:
                part = pa.concat_tables([held, part.cast(held.schema)])
            self.pools[int(cell)] = top_rows(part, self.per_partition)
        self.peak_rows = max(self.peak_rows, self.rows)

    def tables(self) -> list[pa.Table]:
        return [self.pools[cell] for cell in sorted(self.pools)]


def top_rows(table: pa.Table, n: int) -> pa.Table:
    """The ``n`` rows of largest score (ties: smaller spectrum_id first)."""
    order = pc.sort_indices(table, sort_keys=[("score", "descending"), ("spectrum_id", "ascending")])
    return table.take(order[:n])


def select(
    pools: CandidatePools,
    n: int,
    label_names: Sequence[str],
    widths: np.ndarray,
    *,
    weighted: bool = True,
    diversity: str = DEFAULT_DIVERSITY,
    covered: np.ndarray | None = None,
) -> pa.Table:
    """The ``n`` picks over every partition with a ``rank`` column (1 = first pick): ``diversity``
    (k-center or k-median) within each partition, then over the partitions' winners, both away
    from the ``covered`` points (:func:`covered_points`: the model's reference stars). InputError
    when fewer than ``n`` rows qualify."""
    if pools.per_partition < n:
        raise InputError(f"the per-partition bound ({pools.per_partition}) must be at least n ({n})")
    held = pools.rows  # below n (<= the bound) only when no partition was cut: every eligible row
    if n > held:
        raise InputError(
            f"asked for {n} suggestions but only {held} rows qualify: rows with a disqualifying flag "
            f"({', '.join(f.name.lower() for f in Flag if f & DISQUALIFYING)}), excluded ids and rows "
            "outside --where are never suggested"
        )
    winners = [
        diverse(t, n, label_names, widths, weighted, diversity, covered) for t in pools.tables() if t.num_rows
    ]
    merged = diverse(pa.concat_tables(winners), n, label_names, widths, weighted, diversity, covered)
    return merged.append_column("rank", pa.array(np.arange(1, n + 1, dtype=np.int32)))
