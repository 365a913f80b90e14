"""The product packages stand on their own: none imports infra/ (the demo and cluster stack)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("core", "crawl", "ingest", "filter", "shards", "train", "apply")


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, ``import`` and ``from ... import`` alike, nested ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("package", PRODUCT)
def test_no_product_module_imports_infra(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in files
        for line, module in _imported_modules(path)
        if module == "infra" or module.startswith("infra.")
    ]
    assert not offenders, "product code imports infra/:\n" + "\n".join(offenders)
