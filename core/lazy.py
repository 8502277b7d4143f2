"""Package exports that load on first use (PEP 562), for packages whose Ray tasks import them.

A Ray worker that unpickles one function of a package imports the package's ``__init__``; with
lazy exports it pays only for the module that function lives in, not for torch or the whole job::

    _EXPORTS = {"LabelOptions": "options", "label_spectra": "job"}
    __getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], list[str]]:
    """A module ``__getattr__`` that imports ``package.<exports[name]>`` when ``name`` is first
    used, and the package's ``__all__``."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f".{exports[name]}", package), name)

    return __getattr__, sorted(exports)
