"""The label catalogue: its partitioned layout, the writer the label job uses, and Arrow queries.

See :mod:`.layout` for the folder layout and the sky partitioning, :mod:`.writer` for writing and
publishing a release.
"""

from .layout import CatalogueLayout, read_layout
from .writer import CatalogueWriter, WriteOptions, WriteResult, write_release

__all__ = [
    "CatalogueLayout",
    "CatalogueWriter",
    "WriteOptions",
    "WriteResult",
    "read_layout",
    "write_release",
]
