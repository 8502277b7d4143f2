"""The label catalogue's layout: sky partitions, the fine HEALPix column, column types, settings.

A catalogue is a dataset in the layout of :mod:`speclabel.pipeline.publish`, partitioned twice::

    CATALOGUE/_catalogue.json                               the layout below (readers never guess)
    CATALOGUE/release=<R>/sky=<k>/part-<run>-<n>.parquet    live rows of release R in sky cell k

``sky`` is the HEALPix index (nested scheme, ICRS ra/dec) of the row's position at ``sky_order``, or,
for a row without a usable position, ``-1 - bucket`` where ``bucket`` is a stable hash (blake2b) of
its ``spectrum_id`` modulo ``hash_buckets``. Each file also carries ``healpix``, the nested index at
``fine_order`` (null without a position), and its rows are sorted by it, so the Parquet row-group
statistics let a cone search skip most of a file as well as most of the partitions.

Defaults and why:

- ``sky_order = 2``: 192 cells of 215 deg² (about 15° across). Fibre surveys observe hundreds to
  thousands of fields spread over half the sky, so each release occupies most cells a sky order
  offers: at order 2 a 2-million-row release makes ~150 files of several MB, at order 3 ~600 files
  of ~1 MB and a 100k-row release (Gaia-ESO size) mostly files of a few hundred rows. Coarse cells
  cost cone searches little because inside each file the rows are sorted by the fine index and
  row groups outside the cone are skipped. Catalogues of tens of millions of rows per release can
  choose order 3 (``CatalogueLayout(sky_order=3)``) for more, smaller partitions.
- ``fine_order = 12``: 0.86 arcmin pixels, finer than any GIRAFFE fibre spacing matters for pruning,
  and the HEALPix level encoded in Gaia source ids (``source_id // 2**35`` is the nested level-12
  index), so ``healpix`` joins directly with Gaia.
- ``hash_buckets = 16``: rows without a position are rare; 16 buckets keep them in a few files while
  letting a release made only of such rows still spread over several files.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import astropy.units as u
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from astropy_healpix import HEALPix

from speclabel.core.errors import ConfigError
from speclabel.core.labels import LABEL_NAMES
from speclabel.core.layout import RELEASE
from speclabel.core.storage import exists, read_json, write_json_atomic

from ..publish import Dataset

SCHEMA_VERSION = 1
SETTINGS_FILE = "_catalogue.json"
FORMAT_NAME = "speclabel label catalogue"

SKY = "sky"
HEALPIX = "healpix"

# The hive partitioning, given explicitly so that every reader (pyarrow, dask, DuckDB) agrees on the
# types: left to inference, dask makes `sky` a category and Ray makes it a string.
PARTITIONING_SCHEMA = pa.schema([(RELEASE, pa.string()), (SKY, pa.int32())])

# Release names become folder names and hive partition values: keep them plain.

MAX_ORDER = 29  # the finest HEALPix order whose nested index fits an int64


def _fixed_types() -> dict[str, pa.DataType]:
    types = {
        "spectrum_id": pa.string(),
        HEALPIX: pa.int64(),
        "ra": pa.float64(),
        "dec": pa.float64(),
        "snr": pa.float32(),
        "object": pa.string(),
        "input_sha256": pa.string(),
        "flags": pa.int32(),
        "model_id": pa.string(),
        "run_id": pa.string(),
        "processed_at": pa.timestamp("us", tz="UTC"),
        # How far the spectrum lies from the training set (model/ood.py), 0-100; null without a reference.
        "ood_score": pa.float32(),
        # The labels outside the model's training range, comma-separated in model order ('' for none).
        "extrapolated_labels": pa.string(),
    }
    for label in LABEL_NAMES:
        types[label] = pa.float32()
        types[f"{label}_std"] = pa.float32()
        types[f"{label}_members"] = pa.list_(pa.float32())
    return types


# The types the catalogue stores for its known columns (docs/data-format.md, "Label catalogue").
# Saliency summary columns (`sal_<label>_<group>`, `sal_<label>_peak_wave`) are float32.
COLUMN_TYPES: dict[str, pa.DataType] = _fixed_types()
SALIENCY_PREFIX = "sal_"


def column_type(name: str) -> pa.DataType:
    """The catalogue type of a column: a known column's, ``list<float32>`` for ``<label>_members``,
    else float32 (the labels a model declares, their ``_std``, saliency summaries)."""
    if name in COLUMN_TYPES:
        return COLUMN_TYPES[name]
    return pa.list_(pa.float32()) if name.endswith("_members") else pa.float32()


def label_columns(names: Iterable[str]) -> list[str]:
    """The labels of a catalogue schema, in its order: the columns with a ``<label>_std`` partner (a
    catalogue holds the labels of the models that made it, not a fixed list)."""
    names = list(names)
    present = set(names)
    return [name for name in names if f"{name}_std" in present]


def saliency_column(label: str, group: str) -> str:
    """The saliency summary column of a label and a line-window group (or ``peak_wave``):
    ``sal_mgfe_mg_i`` for label ``mgfe`` and group ``Mg I``; plain names every tool accepts."""
    slug = re.sub(r"[^a-z0-9]+", "_", group.lower()).strip("_")
    return f"{SALIENCY_PREFIX}{label}_{slug}"


@dataclass(frozen=True)
class CatalogueLayout:
    """How a catalogue is partitioned; stored in ``_catalogue.json``, the same for all releases."""

    sky_order: int = 2
    fine_order: int = 12
    hash_buckets: int = 16
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not 0 <= self.sky_order <= self.fine_order <= MAX_ORDER:
            raise ConfigError(
                f"catalogue layout needs 0 <= sky_order <= fine_order <= {MAX_ORDER}, "
                f"got sky_order={self.sky_order}, fine_order={self.fine_order}"
            )
        if self.hash_buckets < 1:
            raise ConfigError(f"catalogue layout needs hash_buckets >= 1, got {self.hash_buckets}")
        if self.schema_version != SCHEMA_VERSION:
            raise ConfigError(
                f"catalogue schema version {self.schema_version} is not supported by this speclabel "
                f"(it reads version {SCHEMA_VERSION}); upgrade speclabel"
            )

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME,
            **asdict(self),
            "sky": "HEALPix nested index of ICRS (ra, dec) at sky_order; -1 - blake2b-64(spectrum_id) "
            "% hash_buckets for rows without a position",
            "healpix": "HEALPix nested index at fine_order; rows sorted by it within each file",
        }

    @classmethod
    def from_dict(cls, data: dict) -> CatalogueLayout:
        if data.get("format") != FORMAT_NAME:
            raise ConfigError(f"{SETTINGS_FILE} does not describe a {FORMAT_NAME} ({data.get('format')!r})")
        try:
            return cls(
                sky_order=int(data["sky_order"]),
                fine_order=int(data["fine_order"]),
                hash_buckets=int(data["hash_buckets"]),
                schema_version=int(data["schema_version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid {SETTINGS_FILE}: {exc!r}") from exc

    # -- cells ------------------------------------------------------------------------------------

    def healpix(self, order: int) -> HEALPix:
        return HEALPix(nside=2**order, order="nested")

    def assign(self, table: pa.Table) -> tuple[np.ndarray, pa.Array]:
        """The ``sky`` partition (int32) and fine ``healpix`` index (int64, null without a position)
        of each row of ``table`` (which has ``spectrum_id`` and optionally ``ra``, ``dec``)."""
        n = table.num_rows
        positioned = np.zeros(n, dtype=bool)
        if "ra" in table.column_names and "dec" in table.column_names:
            ra = _as_float64(table.column("ra"))
            dec = _as_float64(table.column("dec"))
            positioned = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90.0)
        fine = np.zeros(n, dtype=np.int64)
        sky = np.empty(n, dtype=np.int32)
        if positioned.any():
            fine[positioned] = self.healpix(self.fine_order).lonlat_to_healpix(
                np.mod(ra[positioned], 360.0) * u.deg, dec[positioned] * u.deg
            )
            # In the nested scheme a cell's parent at a coarser order is a right shift.
            sky[positioned] = fine[positioned] >> (2 * (self.fine_order - self.sky_order))
        if not positioned.all():
            ids = table.column("spectrum_id").to_pylist()
            sky[~positioned] = [-1 - self.hash_bucket(ids[i]) for i in np.flatnonzero(~positioned)]
        return sky, pa.array(fine, pa.int64(), mask=~positioned)

    def hash_bucket(self, spectrum_id: str) -> int:
        """Stable across processes and Python versions (unlike ``hash()``)."""
        digest = hashlib.blake2b(spectrum_id.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.hash_buckets

    def cone_cells(self, ra: float, dec: float, radius: float, order: int) -> np.ndarray:
        """Nested HEALPix cells at ``order`` that overlap, even partly, the cone (degrees)."""
        cells = self.healpix(order).cone_search_lonlat(ra * u.deg, dec * u.deg, radius * u.deg)
        return np.unique(np.asarray(cells, dtype=np.int64))

    def fine_ranges(self, cells: np.ndarray, order: int) -> list[tuple[int, int]]:
        """Inclusive ranges of ``healpix`` (fine order) covered by nested ``cells`` at ``order``,
        with adjacent ranges merged."""
        shift = 2 * (self.fine_order - order)
        ranges: list[tuple[int, int]] = []
        for cell in np.sort(cells):
            lo, hi = int(cell) << shift, ((int(cell) + 1) << shift) - 1
            if ranges and ranges[-1][1] + 1 == lo:
                ranges[-1] = (ranges[-1][0], hi)
            else:
                ranges.append((lo, hi))
        return ranges

    def range_order(self, radius: float, max_cells: int = 64) -> int:
        """The finest order (between sky_order and fine_order) at which a cone of ``radius`` degrees
        covers about ``max_cells`` cells or fewer: fine enough to prune row groups, coarse enough to
        keep the filter short."""
        order = self.sky_order
        for candidate in range(self.sky_order, self.fine_order + 1):
            pixel_deg = np.degrees(np.sqrt(4 * np.pi / (12 * 4**candidate)))
            if np.pi * (radius / pixel_deg + 1) ** 2 > max_cells:
                break
            order = candidate
        return order


def _as_float64(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return column.cast(pa.float64()).fill_null(np.nan).to_numpy()


def read_layout(dataset: Dataset) -> CatalogueLayout | None:
    """The layout stored in the catalogue, or None for a folder that is not (yet) a catalogue."""
    path = dataset.path(SETTINGS_FILE)
    if not exists(dataset.fs, path):
        return None
    return CatalogueLayout.from_dict(read_json(dataset.fs, path))


def ensure_layout(dataset: Dataset, layout: CatalogueLayout) -> CatalogueLayout:
    """Store ``layout`` in a new catalogue, or check that an existing one uses the same layout."""
    stored = read_layout(dataset)
    if stored is None:
        dataset.fs.create_dir(dataset.root, recursive=True)
        write_json_atomic(dataset.fs, dataset.path(SETTINGS_FILE), layout.to_dict())
        return layout
    if stored != layout:
        raise ConfigError(
            f"{dataset.location} is partitioned as {stored}, not {layout}: every release of a catalogue "
            "shares one layout; write to a new catalogue or use the stored settings"
        )
    return stored


def normalise(table: pa.Table) -> pa.Table:
    """Label rows as the catalogue stores them: known columns in their catalogue types, extension
    types (e.g. Ray's tensor columns) unwrapped to plain lists, the partition columns dropped (they
    live in the folder names) and no producer metadata (a stale pandas schema would mislead readers)."""
    columns, fields = [], []
    for field, column in zip(table.schema, table.columns, strict=True):
        if field.name in (RELEASE, SKY):
            continue
        if isinstance(field.type, pa.ExtensionType):
            column = pa.chunked_array([chunk.storage for chunk in column.chunks], field.type.storage_type)
        target = COLUMN_TYPES.get(field.name)
        if target is None and field.name.startswith(SALIENCY_PREFIX):
            target = pa.float32()
        if target is None and (
            pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type)
        ):
            target = pa.list_(column.type.value_type)
        if target is not None and column.type != target:
            try:
                column = column.cast(target)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ConfigError(
                    f"label column {field.name!r} of type {field.type} cannot be stored as {target}: {exc}"
                ) from exc
        columns.append(column)
        fields.append(pa.field(field.name, column.type))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def _haversine(ra: float, dec: float) -> pc.Expression:
    """hav(angular distance) of each row from (ra, dec): stable at small separations, unlike acos."""
    d2r = np.pi / 180.0
    half_ddec = pc.sin((pc.field("dec") - dec) * (d2r / 2))
    half_dra = pc.sin((pc.field("ra") - ra) * (d2r / 2))
    cos_dec = pc.cos(pc.field("dec") * d2r) * float(np.cos(dec * d2r))
    return half_ddec * half_ddec + cos_dec * half_dra * half_dra


def cone_expression(ra: float, dec: float, radius: float) -> pc.Expression:
    """Rows within ``radius`` degrees of (ra, dec) on the sphere."""
    return _haversine(ra, dec) <= float(np.sin(np.radians(radius) / 2) ** 2)


def cone_distance(ra: float, dec: float) -> pc.Expression:
    """Great-circle distance (degrees) of each row from (ra, dec)."""
    hav = pc.min_element_wise(_haversine(ra, dec), 1.0)
    return pc.asin(pc.sqrt(hav)) * float(2 * 180.0 / np.pi)
