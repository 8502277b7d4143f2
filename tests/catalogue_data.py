"""Small synthetic catalogues shared by the catalogue, query and Flight tests."""

from __future__ import annotations

import pyarrow as pa

from speclabel.core.setups import get_setup
from speclabel.pipeline.catalogue import CatalogueLayout, WriteOptions, write_release
from speclabel.pipeline.simulate.catalogue import SyntheticCatalogue, synthetic_label_rows

# Coarse sky cells (order 1: 48 cells) and tiny files, so that a few thousand rows still make
# several partitions, several files per partition and several row groups per file.
LAYOUT = CatalogueLayout(sky_order=1, fine_order=10, hash_buckets=4)
OPTIONS = WriteOptions(max_rows_per_file=150, row_group_rows=32, buffer_bytes=200_000)


def label_rows(release: str, n: int, *, seed: int = 0, model_id: str = "m1", start: int = 0) -> pa.Table:
    """Rows spread over the whole sky (wide fields), 5 % without a position."""
    config = SyntheticCatalogue(
        release=release,
        model_id=model_id,
        run_id="r",
        seed=seed,
        n_fields=12,
        field_radius_deg=25.0,
        positionless_fraction=0.05,
        n_members=3,
    )
    return synthetic_label_rows(get_setup(), config, start, n)


def build_catalogue(location, releases: dict[str, int], *, model_id: str = "m1", seed: int = 0) -> dict:
    """Write and publish each release (name -> rows) in batches of 500; return the input tables."""
    tables = {}
    for i, (release, n) in enumerate(releases.items()):
        table = label_rows(release, n, seed=seed + i, model_id=model_id)
        write_release(
            str(location),
            release,
            table.to_batches(max_chunksize=500),
            model_id=model_id,
            layout=LAYOUT,
            options=OPTIONS,
        )
        tables[release] = table
    return tables


def add_side_tables(root, release: str, run_id: str, ids: pa.Array) -> pa.Table:
    """Two quarantined rows and full saliency maps (``saliency_feh`` = [i] * 4 for the i-th of
    ``ids``) for the run ``run_id`` of ``release``, where a label run writes them; returns the
    quarantine table."""
    import pathlib

    import pyarrow.parquet as pq

    from speclabel.core.contract import quarantine_table

    root = pathlib.Path(root)
    quarantine = quarantine_table(
        [f"{release}-bad-1", f"{release}-bad-2"], ["nonfinite_flux: x", "wrong_length: y"], "in.parquet"
    )
    folder = root / "_quarantine" / f"release={release}" / f"run={run_id}"
    folder.mkdir(parents=True)
    pq.write_table(quarantine, folder / "part-0.parquet")
    maps = pa.table(
        {
            "spectrum_id": ids,
            "saliency_feh": pa.array([[float(i)] * 4 for i in range(len(ids))], pa.list_(pa.float32())),
        }
    )
    folder = root / "_saliency" / f"release={release}" / f"run={run_id}"
    folder.mkdir(parents=True)
    pq.write_table(maps, folder / "part-0.parquet")
    return quarantine
