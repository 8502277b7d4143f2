"""The label catalogue: its partitioned layout, the writer the label job uses, and Arrow queries.

See :mod:`.layout` for the folder layout and the sky partitioning, :mod:`.writer` for writing and
publishing a release, :mod:`.reader` for queries, :mod:`.expr` for the filter language and
:mod:`.flight` for the Arrow Flight service.

    from speclabel.pipeline.catalogue import open_catalogue
    cat = open_catalogue("s3://survey/labels")
    table = cat.query("feh < -1 and mgfe_std < 0.05", columns=["spectrum_id", "feh", "mgfe"],
                      cone=(83.82, -5.39, 2.0))
"""

from .expr import QueryError, parse_where
from .layout import CatalogueLayout, read_layout
from .reader import CONE_DISTANCE, Catalogue, Cone, Query
from .writer import CatalogueWriter, WriteOptions, WriteResult, write_release

open_catalogue = Catalogue.open

__all__ = [
    "CONE_DISTANCE",
    "Catalogue",
    "CatalogueLayout",
    "CatalogueWriter",
    "Cone",
    "Query",
    "QueryError",
    "WriteOptions",
    "WriteResult",
    "open_catalogue",
    "parse_where",
    "read_layout",
    "write_release",
]
