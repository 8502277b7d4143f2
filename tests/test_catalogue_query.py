"""Catalogue reads: filters and cone searches against numpy brute force, pruning, model choice, joins."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from catalogue_data import LAYOUT, OPTIONS, add_side_tables, build_catalogue, label_rows

from speclabel.core.errors import InputError
from speclabel.pipeline.catalogue import CONE_DISTANCE, Catalogue, Cone, Query, QueryError, write_release
from speclabel.pipeline.catalogue.reader import left_join_by_id
from speclabel.pipeline.publish import Dataset


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """DR1 labelled by m1 then relabelled by m2 (different values), DR2 by m1; some quarantine and
    saliency maps for DR2."""
    root = tmp_path_factory.mktemp("catalogue") / "cat"
    given = build_catalogue(root, {"DR1": 2500, "DR2": 1200}, model_id="m1")
    relabelled = label_rows("DR1", 2500, seed=7, model_id="m2")
    write_release(str(root), "DR1", [relabelled], model_id="m2", layout=LAYOUT, options=OPTIONS)
    cat = Catalogue.open(str(root))
    dr2_run = cat.index()["releases"]["DR2"]["run_id"]
    add_side_tables(root, "DR2", dr2_run, given["DR2"].column("spectrum_id").slice(0, 100))
    return cat, {"DR1": relabelled, "DR1-m1": given["DR1"], "DR2": given["DR2"]}


def _numpy(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).cast(pa.float64()).fill_null(np.nan).to_numpy()


def _ids(table: pa.Table, mask: np.ndarray | None = None) -> set[str]:
    ids = np.array(table.column("spectrum_id").to_pylist(), dtype=object)
    return set(ids if mask is None else ids[mask])


def _haversine_deg(ra, dec, ra0, dec0):
    ra, dec, ra0, dec0 = map(np.radians, (ra, dec, ra0, dec0))
    h = np.sin((dec - dec0) / 2) ** 2 + np.cos(dec) * np.cos(dec0) * np.sin((ra - ra0) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1))))


def test_filter_matches_numpy(catalogue):
    cat, given = catalogue
    result = cat.query("feh < -0.3 and mgfe_std < 0.05", releases=["DR1"])
    t = given["DR1"]
    with np.errstate(invalid="ignore"):
        mask = (_numpy(t, "feh") < -0.3) & (_numpy(t, "mgfe_std") < 0.05)
    assert mask.sum() > 20
    assert _ids(result) == _ids(t, mask)
    assert set(result.column("release").to_pylist()) == {"DR1"}


def test_cone_search_matches_brute_force(catalogue):
    cat, given = catalogue
    both = pa.concat_tables([given["DR1"], given["DR2"]])
    ra, dec = _numpy(both, "ra"), _numpy(both, "dec")
    rng = np.random.default_rng(3)
    centres = [(0.5, 10.0, 30.0), (359.0, -60.0, 20.0), (120.0, 89.0, 15.0)]  # wrap-around, pole
    picks = rng.choice(np.flatnonzero(np.isfinite(ra)), 5, replace=False)
    centres += [(ra[i], dec[i], r) for i, r in zip(picks, [0.5, 2.0, 5.0, 12.0, 40.0], strict=True)]
    for ra0, dec0, radius in centres:
        result = cat.query(cone=(ra0, dec0, radius))
        with np.errstate(invalid="ignore"):
            distance = _haversine_deg(ra, dec, ra0, dec0)
        expected = _ids(both, distance <= radius)
        assert _ids(result) == expected, (ra0, dec0, radius)
        got = dict(zip(result.column("spectrum_id").to_pylist(), _numpy(result, CONE_DISTANCE), strict=True))
        ids = both.column("spectrum_id").to_pylist()
        for i in np.flatnonzero(distance <= radius):
            assert got[ids[i]] == pytest.approx(distance[i], abs=1e-9)
    assert any(len(cat.query(cone=c)) > 10 for c in centres)


def test_cone_and_release_prune_files_and_row_groups(catalogue):
    cat, given = catalogue
    dataset = cat.arrow_dataset()
    all_files = list(dataset.get_fragments())
    t = given["DR2"]
    i = int(np.flatnonzero(np.isfinite(_numpy(t, "ra")))[0])
    cone = Cone(float(_numpy(t, "ra")[i]), float(_numpy(t, "dec")[i]), 1.0)
    expression = cat.filter(Query(cone=cone), dataset.schema)
    kept = list(dataset.get_fragments(filter=expression))
    cells = set(LAYOUT.cone_cells(cone.ra, cone.dec, cone.radius, LAYOUT.sky_order).tolist())
    assert kept and len(kept) < len(all_files) / 5
    assert all(int(f.path.split("/sky=")[1].split("/")[0]) in cells for f in kept)
    # Inside the kept files, the fine HEALPix ranges skip row groups.
    total = sum(f.num_row_groups for f in kept)
    read = sum(len(f.subset(filter=expression, schema=dataset.schema).row_groups) for f in kept)
    assert read < total
    # Release filters select whole releases' files only.
    dr2 = list(dataset.get_fragments(filter=pc.field("release") == "DR2"))
    assert dr2 and all("/release=DR2/" in f.path for f in dr2) and len(dr2) < len(all_files)
    assert sum(f.count_rows() for f in dr2) == given["DR2"].num_rows


def test_model_id_selects_live_or_superseded_rows(catalogue):
    cat, given = catalogue
    live = cat.query(columns=["spectrum_id", "feh", "model_id"], releases=["DR1"])
    assert set(live.column("model_id").to_pylist()) == {"m2"}
    old = cat.query(columns=["spectrum_id", "feh", "model_id"], releases=["DR1"], model_id="m1")
    assert set(old.column("model_id").to_pylist()) == {"m1"}
    expected = dict(
        zip(given["DR1-m1"].column("spectrum_id").to_pylist(), _numpy(given["DR1-m1"], "feh"), strict=True)
    )
    assert all(
        expected[s] == pytest.approx(f)
        for s, f in zip(old.column("spectrum_id").to_pylist(), _numpy(old, "feh"), strict=True)
    )
    assert len(old) == given["DR1-m1"].num_rows
    # Without releases, model m1 is read where it exists: superseded DR1 and live DR2.
    everywhere = cat.query(columns=["release"], model_id="m1")
    assert sorted(set(everywhere.column("release").to_pylist())) == ["DR1", "DR2"]
    with pytest.raises(QueryError, match="no published run with model_id 'm9'"):
        cat.query(model_id="m9")
    with pytest.raises(QueryError, match=r"no published run with model_id 'm2'.*DR2"):
        cat.query(model_id="m2", releases=["DR2"])


def test_projection_limit_and_helpful_errors(catalogue):
    cat, _ = catalogue
    table = cat.query("teff > 5000", columns=["spectrum_id", "teff"], limit=7)
    assert table.column_names == ["spectrum_id", "teff"] and len(table) == 7
    assert min(table.column("teff").to_pylist()) > 5000
    with pytest.raises(QueryError, match="did you mean teff"):
        cat.query(columns=["spectrum_id", "tef"])
    with pytest.raises(QueryError, match=r"unknown release\(s\) \['DR9'\]"):
        cat.query(releases=["DR9"])
    with pytest.raises(QueryError, match="radius"):
        cat.query(cone=(10, 10, 0))


def test_pandas_and_dask_agree_with_arrow(catalogue):
    cat, _ = catalogue
    kwargs = {"columns": ["spectrum_id", "feh", "release", "sky"], "cone": (40.0, -30.0, 25.0)}
    arrow = cat.query("logg < 3", **kwargs).sort_by("spectrum_id")
    frame = cat.to_pandas("logg < 3", **kwargs).sort_values("spectrum_id")
    dask_frame = cat.to_dask("logg < 3", **kwargs).compute().sort_values("spectrum_id")
    assert len(arrow) > 0
    for other in (frame, dask_frame):
        assert other["spectrum_id"].tolist() == arrow.column("spectrum_id").to_pylist()
        assert np.allclose(other["feh"].to_numpy(), _numpy(arrow, "feh"))
        assert other["sky"].dtype == np.int32 and set(other["release"]) <= {"DR1", "DR2"}


def test_only_indexed_files_are_read(catalogue, tmp_path):
    cat, given = catalogue
    # A file of an unpublished run in a live folder (an object-store copy cut short) is invisible.
    folder = cat.dataset.live_dir("DR2") + "/sky=0"
    os.makedirs(folder, exist_ok=True)
    stray = folder + "/part-29990101T000000Z-ffffffff-00001.parquet"
    pq.write_table(given["DR2"].slice(0, 5), stray)
    try:
        assert len(cat.query(releases=["DR2"], columns=["spectrum_id"])) == given["DR2"].num_rows
    finally:
        os.unlink(stray)
    with pytest.raises(InputError, match="not a speclabel catalogue"):
        Catalogue.open(str(tmp_path))


def test_quarantine_lookup_and_saliency_join(catalogue):
    cat, given = catalogue
    quarantine = cat.quarantine()
    assert sorted(quarantine.column("spectrum_id").to_pylist()) == ["DR2-bad-1", "DR2-bad-2"]
    assert set(quarantine.column("release").to_pylist()) == {"DR2"}
    good = given["DR2"].column("spectrum_id")[3].as_py()
    found = cat.lookup([good, "DR2-bad-1", "nowhere"], columns=["spectrum_id", "feh"])
    status = dict(
        zip(found.column("spectrum_id").to_pylist(), found.column("status").to_pylist(), strict=True)
    )
    assert status == {good: "labelled", "DR2-bad-1": "quarantined", "nowhere": "absent"}
    reasons = dict(
        zip(found.column("spectrum_id").to_pylist(), found.column("reason").to_pylist(), strict=True)
    )
    assert reasons["DR2-bad-1"] == "nonfinite_flux"

    rows = cat.query(columns=["spectrum_id", "release", "feh"], releases=["DR2"], limit=300)
    joined = cat.join_saliency(rows)
    ids = given["DR2"].column("spectrum_id").to_pylist()
    for sid, sal in zip(
        joined.column("spectrum_id").to_pylist(), joined.column("saliency_feh").to_pylist(), strict=True
    ):
        index = ids.index(sid)
        assert sal == ([float(index)] * 4 if index < 100 else None)


def test_left_join_carries_list_columns_and_renames_clashes():
    left = pa.table({"spectrum_id": ["a", "b", "c"], "x": [1, 2, 3]})
    right = pa.table(
        {"spectrum_id": ["c", "a"], "x": [30, 10], "m": pa.array([[1.0], [2.0]], pa.list_(pa.float32()))}
    )
    joined = left_join_by_id(left, right, suffix="_r")
    assert joined.column("x_r").to_pylist() == [10, None, 30]
    assert joined.column("m").to_pylist() == [[2.0], None, [1.0]]


def test_reads_through_a_non_local_filesystem(catalogue):
    # A SubTreeFileSystem is not a LocalFileSystem: the same code path as s3:// or gs:// catalogues.
    cat, _ = catalogue
    root = cat.dataset.root
    remote = Catalogue.open(
        Dataset(root, pafs.SubTreeFileSystem(os.path.dirname(root), pafs.LocalFileSystem()), "cat")
    )
    kwargs = {"columns": ["spectrum_id", "feh"], "cone": (40.0, -30.0, 30.0), "model_id": "m1"}
    assert (
        remote.query("feh < 0", **kwargs)
        .sort_by("spectrum_id")
        .equals(cat.query("feh < 0", **kwargs).sort_by("spectrum_id"))
    )
