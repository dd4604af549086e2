"""The package's floors (docs/architecture.md), enforced: every import inside cds_service, at module level or in a
function, goes to its own floor or one it may build on. The clinical core (knowledge, fhir, clinical) imports
nothing from rendering, storage, the services, the HTTP edge or screening, so `evaluate`, the hook services and
`screen` all call the same core."""
from __future__ import annotations

import ast
from pathlib import Path

from .conftest import ROOT

PKG = ROOT / "cds_service"
FOUNDATION = {"foundation"}
CORE = FOUNDATION | {"knowledge", "fhir", "clinical"}
# floor -> the floors it may import (its own included)
MAY_IMPORT = {
    "foundation": FOUNDATION,
    "knowledge": FOUNDATION | {"knowledge"},
    "fhir": FOUNDATION | {"knowledge", "fhir"},
    "clinical": CORE,
    "rendering": CORE | {"rendering"},
    "storage": CORE | {"storage"},
    "services": CORE | {"rendering", "storage", "services"},
    "screening": CORE | {"services", "screening"},
    "web": CORE | {"rendering", "storage", "services", "web"},
    "app": CORE | {"rendering", "storage", "services", "web", "screening", "app"},
}
SUBPACKAGES = set(MAY_IMPORT) - {"foundation", "app"}


def floor_of(module: str) -> str:
    """The floor of a dotted module name inside cds_service."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in ("cli", "__main__"):
        return "app"                                    # cds_service itself (create_app), the CLI, python -m
    return parts[0] if parts[0] in SUBPACKAGES else "foundation"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, here: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) of every cds_service import in a file (`here`: its module name); `from X import
    name` counts X.name when that is a module (from .. import metrics)."""
    here = here or module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("cds_service"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (ROOT / Path(*sub.split(".")) / "__init__.py").is_file()
                out.append((node.lineno, sub if is_module else target))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("cds_service")]
    return out


def test_every_module_imports_only_from_the_floors_below_it():
    problems = []
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 40
    for path in files:
        own = floor_of(module_name(path))
        for line, target in imports_of(path):
            if floor_of(target) not in MAY_IMPORT[own]:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {own} imports {target} ({floor_of(target)})")
    assert not problems, "\n".join(problems)


def test_the_floors_are_what_the_folder_shows():
    """Every subpackage is a floor the contract names, so a new folder must be placed in it."""
    folders = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()} - {"content"}
    assert folders == SUBPACKAGES


def test_the_check_sees_a_violation(tmp_path):
    """The contract check itself: a core module importing the HTTP edge, even inside a function, is caught."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..knowledge.catalog import Catalog\n\ndef f():\n    from ..web.api import bp\n")
    found = [(line, floor_of(t)) for line, t in imports_of(probe, "cds_service.clinical.probe")]
    assert found == [(1, "knowledge"), (4, "web")]
    assert "web" not in MAY_IMPORT["clinical"] and "knowledge" in MAY_IMPORT["clinical"]
