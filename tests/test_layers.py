"""The import rule: core <- model <- pipeline <- jobs, and nothing upward.

Every import in the installed packages is read from the source (module level and inside functions,
relative and absolute) and checked against the layer order; a few stage rules inside ``pipeline/``
keep the stages apart as ARCHITECTURE.md draws them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "model", "pipeline", "jobs")
# Inside pipeline/: (importing stage, imported stage) pairs that would tie stages together.
FORBIDDEN_STAGE_IMPORTS = {
    ("pipeline.ingest", "pipeline.catalogue"),  # the store stage knows nothing of catalogues
    ("pipeline.catalogue", "pipeline.simulate"),  # the catalogue stage reads what it is given
    ("pipeline.catalogue", "pipeline.labelling"),
    ("pipeline.catalogue", "pipeline.evaluation"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) for every speclabel module ``source`` imports, names relative to speclabel."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                names = [".".join([*base, node.module] if node.module else base)]
                names = [f"speclabel.{name}" for name in names]
            else:
                names = [node.module or ""]
        else:
            continue
        found += [(node.lineno, n.removeprefix("speclabel.")) for n in names if n.startswith("speclabel.")]
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    layer = module.split(".")[0]
    out = []
    for line, target in imported_modules(source, module, is_package):
        target_layer = target.split(".")[0]
        if target_layer in LAYERS and LAYERS.index(target_layer) > LAYERS.index(layer):
            out.append(f"{module}:{line} imports {target} (upward: {layer} <- {target_layer})")
        for src, dst in FORBIDDEN_STAGE_IMPORTS:
            inside = module == src or module.startswith(src + ".")
            if inside and (target == dst or target.startswith(dst + ".")):
                out.append(f"{module}:{line} imports {target} (stage {src} must not use {dst})")
    return out


def package_sources():
    for layer in LAYERS:
        yield from sorted((ROOT / layer).rglob("*.py"))


def test_no_module_imports_upward_or_across_stages():
    problems = []
    for path in package_sources():
        problems += violations(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not problems, "\n".join(problems)


def test_every_layer_is_checked():
    modules = {module_name(p).split(".")[0] for p in package_sources()}
    assert modules == set(LAYERS)


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("from speclabel.pipeline.contract import LABEL_NAMES", "model.arch"),
        ("from ..pipeline import publish", "model.io"),
        ("def f():\n    from speclabel.jobs import cli\n", "pipeline.labelling.job"),
        ("import speclabel.model.io", "core.storage"),
        ("from ..catalogue.layout import check_release_name", "pipeline.ingest.plan"),
    ],
)
def test_the_rule_catches_a_deliberate_upward_import(source, module):
    assert violations(source, module)


def test_downward_and_sideways_imports_pass():
    assert not violations("from speclabel.core.errors import InputError\nfrom .arch import x", "model.io")
    assert not violations("from ..publish import Dataset", "pipeline.catalogue.writer")
