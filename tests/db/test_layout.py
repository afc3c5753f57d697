"""The package's shape holds: nothing below the lifecycle knows about Flask's request,
and the layer reaches into no private attribute of Flask or SQLAlchemy."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "myapp" / "db"
# Flask glue: the lifecycle (the registry, teardown, the request's read-only promise),
# the per-request instruments it switches on, and read-your-writes' cookie (sticking).
FLASK_AWARE = {"lifecycle.py", "instrumentation.py", "sticking.py", "__init__.py"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in FLASK_AWARE))
def test_modules_below_the_lifecycle_do_not_import_flask(module: str) -> None:
    assert not {name for name in _imports(PACKAGE / module) if name.split(".")[0] == "flask"}


def test_the_guard_sees_flask_where_it_is() -> None:
    assert "flask" in _imports(PACKAGE / "lifecycle.py")


def test_no_private_attribute_of_flask_or_sqlalchemy() -> None:
    """`_cv_app`, `Select._for_update_arg` and the like are gone; the one replaced library
    method (dialect.do_ping, engines.py) is documented where it is done."""
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in {"_for_update_arg", "_cv_app", "_creator", "_pre_ping"}:
                offenders.append(f"{path.name}:{node.lineno} {node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module and any(a.name.startswith("_") for a in node.names):
                if node.module.split(".")[0] in ("flask", "sqlalchemy"):
                    offenders.append(f"{path.name}:{node.lineno} from {node.module} import a private name")
    assert offenders == []
