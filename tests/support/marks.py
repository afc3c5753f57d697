"""Which marks of a collected test can act, checked by tests/conftest.py's collection hook."""

from __future__ import annotations

from pathlib import Path

import pytest

from .databases import BACKENDS

TESTS = Path(__file__).resolve().parent.parent

# Marks that select a folder's tests (``pytest -m faults``): each belongs on every test
# of its folder and nowhere else, or a selection by mark and one by path would differ.
FOLDER_MARKS = {"faults": TESTS / "faults", "e2e": TESTS / "e2e"}


def mark_problems(item: pytest.Item) -> list[tuple[str, str]]:
    """Why each mark of ``item`` cannot do what it says; empty when all of them can.

    - ``real_commits`` is read only by the ``app`` fixture: without it, the test gets
      no isolation to turn off, and the rows it commits are not cleaned up either.
    - ``backends(...)`` only drops variants of a test parametrized by ``backend``, and
      a name that is not a backend would drop every variant.
    - ``options`` (pytest-flask) only sets config on the ``app`` fixture.
    - ``faults`` and ``e2e``: see ``FOLDER_MARKS``.

    ``gunicorn`` is not checked: whether a test starts gunicorn shows only when it runs.
    """
    uses = set(getattr(item, "fixturenames", ()))
    problems = [
        (name, f"@{name} acts only through the app fixture, which this test does not use")
        for name in ("real_commits", "options")
        if item.get_closest_marker(name) and "app" not in uses
    ]
    return problems + _backends_problems(item) + _folder_problems(item)


def _backends_problems(item: pytest.Item) -> list[tuple[str, str]]:
    """A ``backends`` mark must name backends and sit on a test parametrized by one."""
    marker = item.get_closest_marker("backends")
    if marker is None:
        return []
    problems = []
    unknown = [name for name in marker.args if name not in BACKENDS]
    if not marker.args or unknown:
        problems.append(("backends", f"@backends{marker.args!r}: the backends are {', '.join(BACKENDS)}"))
    callspec = getattr(item, "callspec", None)
    if callspec is None or "backend" not in callspec.params:
        problems.append(("backends", "@backends acts only on a test parametrized by the backend fixture"))
    return problems


def _folder_problems(item: pytest.Item) -> list[tuple[str, str]]:
    """A folder mark must be on every test of its folder, and on no other test."""
    problems = []
    path = Path(str(item.path)).resolve()
    for name, folder in FOLDER_MARKS.items():
        inside = path.is_relative_to(folder)
        if item.get_closest_marker(name) and not inside:
            problems.append((name, f"@{name} belongs to the tests in {folder.relative_to(TESTS.parent)}/ only"))
        elif inside and not item.get_closest_marker(name):
            problems.append((name, f"a test in {folder.relative_to(TESTS.parent)}/ must carry @{name}"))
    return problems
