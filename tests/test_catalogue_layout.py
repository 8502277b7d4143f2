"""pipeline.catalogue.layout: sky cells against astropy_healpix, saliency names, _catalogue.json, types."""

import hashlib
import json

import astropy.units as u
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from astropy.coordinates import SkyCoord
from astropy_healpix import HEALPix

from speclabel.core.errors import ConfigError
from speclabel.core.labels import LABEL_NAMES
from speclabel.pipeline.catalogue.layout import (
    COLUMN_TYPES,
    SETTINGS_FILE,
    CatalogueLayout,
    cone_distance,
    cone_expression,
    ensure_layout,
    normalise,
    read_layout,
    saliency_column,
)
from speclabel.pipeline.publish import Dataset


def _positions(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    ra = rng.uniform(-30.0, 400.0, n)  # outside [0, 360) too: right ascension wraps
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    dec[:3] = [90.0, -90.0, 0.0]  # the poles are positions
    ra[3], dec[4], dec[5] = np.nan, 90.5, np.inf  # no usable position
    dec_null = np.zeros(n, dtype=bool)
    dec_null[6] = True
    return pa.table(
        {
            "spectrum_id": pa.array([f"GES_{i:05d}" for i in range(n)]),
            "ra": pa.array(ra, pa.float64()),
            "dec": pa.array(dec, pa.float32(), mask=dec_null),  # float32 and a null: cast on the way
        }
    )


def _bucket(spectrum_id: str, buckets: int) -> int:
    return int.from_bytes(hashlib.blake2b(spectrum_id.encode(), digest_size=8).digest(), "little") % buckets


@pytest.mark.parametrize(
    "layout", [CatalogueLayout(), CatalogueLayout(sky_order=3, fine_order=9, hash_buckets=5)]
)
def test_sky_and_fine_cells_are_astropy_healpix_nested_indices(layout):
    table = _positions(500)
    sky, fine = layout.assign(table)
    assert sky.dtype == np.int32 and fine.type == pa.int64() and len(sky) == len(fine) == 500
    ra = table.column("ra").to_numpy()
    dec = table.column("dec").cast(pa.float64()).fill_null(np.nan).to_numpy()
    ids = table.column("spectrum_id").to_pylist()
    positioned = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90)
    assert positioned.sum() == 496
    coarse = HEALPix(nside=2**layout.sky_order, order="nested")
    finest = HEALPix(nside=2**layout.fine_order, order="nested")
    lon, lat = (ra[positioned] % 360) * u.deg, dec[positioned] * u.deg
    assert np.array_equal(sky[positioned], coarse.lonlat_to_healpix(lon, lat))
    assert np.array_equal(fine.to_numpy(zero_copy_only=False)[positioned], finest.lonlat_to_healpix(lon, lat))
    # Rows without a position: a null fine index and a stable hash bucket below zero.
    assert np.array_equal(fine.is_null().to_numpy(zero_copy_only=False), ~positioned)
    expected = [-1 - _bucket(ids[i], layout.hash_buckets) for i in np.flatnonzero(~positioned)]
    assert sky[~positioned].tolist() == expected
    assert all(-layout.hash_buckets <= s <= -1 for s in expected)


def test_rows_without_position_columns_all_go_to_hash_buckets():
    layout = CatalogueLayout(hash_buckets=4)
    sky, fine = layout.assign(pa.table({"spectrum_id": ["s1", "s2", "s3"]}))
    assert sky.tolist() == [-1 - _bucket(s, 4) for s in ("s1", "s2", "s3")]
    assert fine.null_count == 3
    # The buckets are part of the on-disk format: these values must never change.
    assert CatalogueLayout().hash_bucket("s1") == 9 and CatalogueLayout().hash_bucket("GES_J0530-0523") == 11
    assert layout.hash_bucket("s1") == 1


@pytest.mark.parametrize(
    ("ra", "dec", "radius", "order"), [(83.8, -5.4, 2.0, 6), (10.0, 89.0, 3.0, 5), (0.1, 0.0, 0.5, 8)]
)
def test_cone_cells_hold_every_point_of_the_cone(ra, dec, radius, order):
    layout = CatalogueLayout()
    cells = layout.cone_cells(ra, dec, radius, order)
    assert cells.dtype == np.int64 and np.all(np.diff(cells) > 0)
    # Random points inside the cone (uniform on the cap) all fall in returned cells.
    rng = np.random.default_rng(1)
    centre = SkyCoord(ra * u.deg, dec * u.deg)
    separation = np.degrees(np.arccos(1 - rng.uniform(0, 1, 4000) * (1 - np.cos(np.radians(radius)))))
    points = centre.directional_offset_by(rng.uniform(0, 360, 4000) * u.deg, separation * u.deg)
    inside = HEALPix(nside=2**order, order="nested").lonlat_to_healpix(points.ra, points.dec)
    assert set(inside.tolist()) <= set(cells.tolist())
    # No cell lies wholly outside: each centre is within the radius plus a cell's diagonal.
    healpix = HEALPix(nside=2**order, order="nested")
    lon, lat = healpix.healpix_to_lonlat(cells)
    diagonal = 2 * healpix.pixel_resolution.to_value(u.deg)
    assert np.all(centre.separation(SkyCoord(lon, lat)).deg <= radius + diagonal)


def test_fine_ranges_cover_exactly_the_children_and_merge_neighbours():
    layout = CatalogueLayout(sky_order=1, fine_order=4)
    shift = 2 * (4 - 2)
    assert layout.fine_ranges(np.array([5, 1, 2]), order=2) == [
        (1 << shift, (3 << shift) - 1),
        (5 << shift, (6 << shift) - 1),
    ]
    cells = np.array([0, 3, 4, 7, 8, 9, 47])
    covered = {i for lo, hi in layout.fine_ranges(cells, order=2) for i in range(lo, hi + 1)}
    children = {c * 4**2 + k for c in cells.tolist() for k in range(4**2)}
    assert covered == children
    assert layout.fine_ranges(np.array([7]), order=4) == [(7, 7)]


def test_range_order_keeps_the_cone_to_a_few_dozen_cells():
    layout = CatalogueLayout()
    orders = [layout.range_order(r) for r in (0.005, 0.1, 1.0, 5.0, 30.0, 90.0)]
    assert orders == sorted(orders, reverse=True) and orders[0] == layout.fine_order and orders[-1] == 2
    for radius, order in zip((0.1, 1.0, 5.0), orders[1:4], strict=True):
        assert len(layout.cone_cells(40.0, -30.0, radius, order)) <= 64
        assert len(layout.cone_cells(40.0, -30.0, radius, order + 1)) > 64 / 4  # one finer is too many


def test_cone_expression_and_distance_against_astropy():
    rng = np.random.default_rng(3)
    ra, dec, radius = 359.5, -10.0, 2.5  # across ra = 0
    rows = pa.table({"ra": (ra + rng.uniform(-4, 4, 3000)) % 360, "dec": dec + rng.uniform(-4, 4, 3000)})
    truth = (
        SkyCoord(ra * u.deg, dec * u.deg)
        .separation(SkyCoord(rows.column("ra").to_numpy() * u.deg, rows.column("dec").to_numpy() * u.deg))
        .deg
    )
    dataset = pads.dataset(rows)
    selected = dataset.to_table(filter=cone_expression(ra, dec, radius))
    assert selected.num_rows == int((truth <= radius).sum()) > 100
    distance = dataset.to_table(columns={"d": cone_distance(ra, dec)}).column("d").to_numpy()
    np.testing.assert_allclose(distance, truth, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    ("label", "group", "column"),
    [
        ("mgfe", "Mg I", "sal_mgfe_mg_i"),
        ("teff", "peak_wave", "sal_teff_peak_wave"),
        ("feh", "Fe I/II (blend)", "sal_feh_fe_i_ii_blend"),
        ("logg", " H I  Paschen ", "sal_logg_h_i_paschen"),
        ("alfe", "Al-I 8773", "sal_alfe_al_i_8773"),
    ],
)
def test_saliency_column_names_are_plain(label, group, column):
    assert saliency_column(label, group) == column


def test_layout_settings_round_trip_and_refusals():
    layout = CatalogueLayout(sky_order=3, fine_order=11, hash_buckets=8)
    assert CatalogueLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout
    with pytest.raises(ConfigError, match="does not describe a speclabel label catalogue"):
        CatalogueLayout.from_dict({**layout.to_dict(), "format": "something else"})
    with pytest.raises(ConfigError, match=r"invalid _catalogue\.json"):
        CatalogueLayout.from_dict({k: v for k, v in layout.to_dict().items() if k != "hash_buckets"})
    for bad, message in (
        ({"sky_order": 5, "fine_order": 4}, "sky_order <= fine_order"),
        ({"fine_order": 30}, "<= 29"),
        ({"sky_order": -1}, "0 <= sky_order"),
        ({"hash_buckets": 0}, "hash_buckets >= 1"),
        ({"schema_version": 2}, "upgrade speclabel"),
    ):
        with pytest.raises(ConfigError, match=message):
            CatalogueLayout(**bad)


def test_catalogue_json_is_written_once_and_checked_after(tmp_path):
    dataset = Dataset.open(str(tmp_path / "cat"))
    assert read_layout(dataset) is None
    layout = CatalogueLayout(sky_order=1, fine_order=10, hash_buckets=4)
    assert ensure_layout(dataset, layout) == layout
    stored = json.loads((tmp_path / "cat" / SETTINGS_FILE).read_text())
    assert stored["format"] == "speclabel label catalogue"
    settings = ("sky_order", "fine_order", "hash_buckets", "schema_version")
    assert [stored[k] for k in settings] == [1, 10, 4, 1]
    assert read_layout(Dataset.open(str(tmp_path / "cat"))) == layout
    assert ensure_layout(dataset, layout) == layout
    with pytest.raises(ConfigError, match="every release of a catalogue shares one layout"):
        ensure_layout(dataset, CatalogueLayout())
    assert read_layout(dataset) == layout  # a refused layout leaves the stored one


def test_normalise_stores_known_columns_in_catalogue_types():
    n = 3
    members = pa.FixedShapeTensorArray.from_numpy_ndarray(np.arange(n * 4, dtype=np.float64).reshape(n, 4))
    table = pa.table(
        {
            "release": ["DR1"] * n,
            "sky": pa.array([1, 2, 3], pa.int32()),
            "spectrum_id": pa.array(["a", "b", "c"], pa.large_string()),
            "healpix": pa.array([1, 2, None], pa.int32()),
            "snr": pa.array([10.0, 20.5, None], pa.float64()),
            "teff": pa.array([5000, 5100, 5200], pa.int64()),
            "feh_std": pa.array([0.1, 0.2, 0.3], pa.float64()),
            "flags": pa.array([0, 2, 6], pa.int64()),
            "processed_at": pa.array([0, 1_000, 2_000_000], pa.timestamp("ns", tz="UTC")),
            "teff_members": members,
            "feh_members": pa.array([[0.1, 0.2]] * n, pa.large_list(pa.float64())),
            "sal_mgfe_mg_i": pa.array([0.5, 0.25, 0.125], pa.float64()),
            "survey_field": pa.array([1, 2, 3], pa.int8()),  # unknown column: left as it is
            "extra_vector": pa.array([[1, 2]] * n, pa.list_(pa.int16(), 2)),  # fixed size -> plain list
        }
    ).replace_schema_metadata({"pandas": "{}"})
    out = normalise(table)
    assert "release" not in out.column_names and "sky" not in out.column_names
    assert out.schema.metadata is None
    for name in ("spectrum_id", "healpix", "snr", "teff", "feh_std", "flags", "processed_at", "teff_members"):
        assert out.schema.field(name).type == COLUMN_TYPES[name], name
    assert out.schema.field("feh_members").type == pa.list_(pa.float32())
    assert out.schema.field("sal_mgfe_mg_i").type == pa.float32()
    assert out.schema.field("survey_field").type == pa.int8()
    assert out.schema.field("extra_vector").type == pa.list_(pa.int16())
    # The values survive the casts.
    assert out.column("teff_members").to_pylist() == np.arange(12.0).reshape(3, 4).tolist()
    assert out.column("snr").to_pylist() == [10.0, 20.5, None] and out.column("healpix").null_count == 1
    assert out.column("processed_at").cast(pa.int64()).to_pylist() == [0, 1, 2_000]  # microseconds
    assert set(COLUMN_TYPES) >= {"spectrum_id", *LABEL_NAMES, *(f"{n}_std" for n in LABEL_NAMES)}


def test_normalise_refuses_a_column_that_cannot_be_stored():
    with pytest.raises(ConfigError, match="label column 'teff' of type string cannot be stored as float"):
        normalise(pa.table({"spectrum_id": ["a"], "teff": ["hot"]}))
