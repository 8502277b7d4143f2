"""core.layout: release names that may become folder names, and side folders that readers skip."""

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from speclabel.core import layout
from speclabel.core.errors import UsageError
from speclabel.core.storage import resolve_files


@pytest.mark.parametrize("name", ["DR5", "iDR6.1", "a", "0", "x+y_z-1", "GES.iDR6_final-v2+fix", "R" * 64])
def test_plain_release_names_are_accepted_as_they_are(name):
    assert layout.check_release_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "R" * 65,  # longer than a hive partition value should be
        ".DR1",  # hidden folder
        "_DR1",  # side-folder prefix: dataset discovery would skip it
        "-DR1",
        "+DR1",
        "DR1/sub",
        "../DR1",
        "DR 1",
        "DR1=x",  # would break the release=<R> partition name
        "DR1\n",
        "DR1*",
        "DRé",
        None,
        5,
    ],
)
def test_other_release_names_are_refused_with_the_rule(name):
    with pytest.raises(UsageError, match=r"use 1-64 letters, digits and \. _ \+ -") as caught:
        layout.check_release_name(name)
    assert repr(name) in str(caught.value)


def test_side_folders_are_skipped_by_dataset_discovery(tmp_path):
    """Every side folder starts with ``_``: Arrow and speclabel's own input discovery see live rows only."""
    side = sorted({layout.STAGING, layout.MANIFESTS, layout.VERSIONS, *layout.RUN_SIDE_OUTPUTS})
    assert all(name.startswith("_") for name in [*side, layout.INDEX, layout.LOCK])
    live = tmp_path / f"{layout.RELEASE}=DR1"
    live.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), live / "part-0.parquet")
    for name in side:
        folder = tmp_path / name / f"{layout.RELEASE}=DR1"
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"x": [99]}), folder / "part-0.parquet")
    table = pads.dataset(str(tmp_path), format="parquet", partitioning="hive").to_table()
    assert sorted(table.column("x").to_pylist()) == [1, 2]
    assert resolve_files(tmp_path, (".parquet",))[1] == [str(live / "part-0.parquet")]
