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


def _quantile(values: np.ndarray, q: float) -> float:
    return float(np.quantile(values, q)) if len(values) else np.nan


def test_aggregates_per_group_match_numpy(catalogue):
    cat, given = catalogue
    specs = ["count", "count(ra)", "mean(feh)", "std(feh)", "median(teff)", "q05(feh)", "q95(logg)"]
    specs += ["min(snr)", "max(dec)", "sum(flags)"]
    result = cat.aggregate(specs, group_by=["release", "flags"], where="snr > 20")
    names = ["count", "count_ra", "mean_feh", "std_feh", "median_teff", "q05_feh", "q95_logg"]
    assert result.column_names == ["release", "flags", *names, "min_snr", "max_dec", "sum_flags"]
    both = pa.concat_tables([given["DR1"], given["DR2"]])
    with np.errstate(invalid="ignore"):
        keep = _numpy(both, "snr") > 20
    release = np.repeat(["DR1", "DR2"], [given["DR1"].num_rows, given["DR2"].num_rows])
    flags = both.column("flags").to_numpy()
    groups = sorted({(r, int(f)) for r, f in zip(release[keep], flags[keep], strict=True)})
    assert len(groups) > 4
    got = zip(result.column("release").to_pylist(), result.column("flags").to_pylist(), strict=True)
    assert list(got) == groups
    columns = {n: _numpy(both, n) for n in ("ra", "feh", "teff", "logg", "snr", "dec", "flags")}
    for row, (name, flag) in zip(result.to_pylist(), groups, strict=True):
        rows = keep & (release == name) & (flags == flag)
        v = {n: c[rows] for n, c in columns.items()}
        assert row["count"] == rows.sum() and row["count_ra"] == np.isfinite(v["ra"]).sum()
        std = np.std(v["feh"], ddof=1) if rows.sum() > 1 else None  # SQL: no sample std of one value
        expected = {
            "mean_feh": np.mean(v["feh"]),
            "std_feh": std,
            "median_teff": np.median(v["teff"]),
            "q05_feh": _quantile(v["feh"], 0.05),
            "q95_logg": _quantile(v["logg"], 0.95),
            "min_snr": v["snr"].min(),
            "max_dec": np.nanmax(v["dec"]) if np.isfinite(v["dec"]).any() else None,
            "sum_flags": int(v["flags"].sum()),
        }
        for name, value in expected.items():
            assert row[name] == (None if value is None else pytest.approx(value, rel=1e-6)), (name, row)


def test_aggregates_follow_release_model_cone_and_limit(catalogue):
    cat, given = catalogue
    old = cat.aggregate(["count", "mean(feh)"], releases=["DR1"], model_id="m1")
    m1 = given["DR1-m1"]
    assert old.to_pylist() == [{"count": m1.num_rows, "mean_feh": pytest.approx(np.mean(_numpy(m1, "feh")))}]
    live = cat.aggregate(["mean(feh)"], releases=["DR1"])
    assert live.column("mean_feh")[0].as_py() == pytest.approx(np.mean(_numpy(given["DR1"], "feh")))
    # A cone search selects the rows of the row query, and its distance can be aggregated.
    ra0, dec0, radius = 40.0, -30.0, 25.0
    cone = cat.aggregate(["count", "max(cone_distance)"], group_by=["release"], cone=(ra0, dec0, radius))
    expected = []
    for release in ("DR1", "DR2"):
        t = given[release]
        with np.errstate(invalid="ignore"):
            distance = _haversine_deg(_numpy(t, "ra"), _numpy(t, "dec"), ra0, dec0)
            inside = distance <= radius
        expected.append(
            {"release": release, "count": inside.sum(), "max_cone_distance": distance[inside].max()}
        )
    assert cone.to_pylist() == [
        {**e, "max_cone_distance": pytest.approx(e["max_cone_distance"])} for e in expected
    ]
    # --limit limits the groups, in group order; without groups, no rows still make one row.
    assert cat.aggregate(group_by=["release"], limit=1).to_pylist() == [{"release": "DR1", "count": 2500}]
    assert cat.aggregate(["count", "mean(feh)"], where="feh > 100").to_pylist() == [
        {"count": 0, "mean_feh": None}
    ]
    assert cat.count(Query(group_by=("release", "flags"))) == len(
        cat.aggregate(group_by=["release", "flags"])
    )
    with pytest.raises(QueryError, match="'spectrum_id' is string; mean needs a numeric column"):
        cat.aggregate(["mean(spectrum_id)"])
    with pytest.raises(QueryError, match="cannot group by 'feh_members': it is a list column"):
        cat.aggregate(group_by=["feh_members"])
    with pytest.raises(QueryError, match=r"unknown column 'cone_distance' in max\(cone_distance\)"):
        cat.aggregate(["max(cone_distance)"])  # only a cone search has a distance


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
