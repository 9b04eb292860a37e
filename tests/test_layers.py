"""The layering contract: the roles import only the shared core `s2t` (and `s2t.v1`), never each other; the
core imports no role, except `s2t.cli` and `s2t.stack`, the one place that composes them."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("slm_worker", "llm_selector", "distill")
COMPOSERS = {"s2t/cli.py", "s2t/stack.py"}


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every absolute import in the file, wherever it stands (functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("role", ROLES)
def test_a_role_imports_no_other_role(role):
    others = set(ROLES) - {role}
    bad = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & others) for p in python_files(role)}
    assert not {f: m for f, m in bad.items() if m}, "roles may import only s2t and s2t.v1"


def test_the_core_imports_no_role_outside_the_composers():
    bad = {}
    for p in python_files("s2t"):
        rel = str(p.relative_to(ROOT))
        if rel in COMPOSERS:
            continue
        found = sorted(imported_packages(p) & set(ROLES))
        if found:
            bad[rel] = found
    assert not bad, "only s2t/cli.py and s2t/stack.py may compose the roles"


def test_the_contract_test_sees_a_forbidden_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from llm_selector.core import SelectorCore\n")
    assert "llm_selector" in imported_packages(f)
