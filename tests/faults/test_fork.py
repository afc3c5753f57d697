"""Scenario 8: with ``gunicorn --preload`` no two workers share a server connection.

The test-only app runs a query while it is built, in the gunicorn master, so a
pooled connection exists before the fork. Each worker then reports, per request, its
pid and the server-side id of the connection it used (``pg_backend_pid()`` /
``CONNECTION_ID()``). The sets of ids of two workers must never meet. Negative
control: the engine left out of the fork hooks (no ``dispose(close=False)`` in the
child), and the harness sees the shared connection, or the errors it causes.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from tests.support.databases import Backend

from .conftest import Answer, burst
from .figures import record
from .servers import gunicorn

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn, pytest.mark.backends("postgresql", "mysql")]

WORKERS = 3
APP_ENV = {
    "GUNICORN_PRELOAD": "1",
    "FAULTS_TOUCH_AT_IMPORT": "1",
    "WEB_CONCURRENCY": str(WORKERS),
    "GUNICORN_THREADS": "2",
    "DATABASE_APP_NAME": "myapp-faults-fork",
    # A worker wedged on a shared socket must not hold up the stop for 20 s.
    "GUNICORN_CMD_ARGS": "--graceful-timeout 3",
}


def connections_by_worker(answers: list[Answer]) -> dict[int, set[int]]:
    seen: dict[int, set[int]] = defaultdict(set)
    for answer in answers:
        if answer.status == 200:
            seen[answer.json["pid"]].add(answer.json["backend"])
    return seen


def shared_connections(seen: dict[int, set[int]]) -> int:
    """Server connections used by more than one worker."""
    owners: dict[int, int] = defaultdict(int)
    for backends in seen.values():
        for backend_id in backends:
            owners[backend_id] += 1
    return sum(count > 1 for count in owners.values())


def run(backend: Backend, tmp_path: Path, **env: str) -> list[Answer]:
    with gunicorn(backend.url, tmp_path / "gunicorn", fault_app=True, **{**APP_ENV, **env}) as server:
        assert "Booting worker" in server.log_text()
        return burst(server.url, ["/faults/whoami"] * 80, clients=8, timeout=5)


def test_preloaded_workers_never_share_a_connection(backend: Backend, tmp_path: Path) -> None:
    answers = run(backend, tmp_path)
    seen = connections_by_worker(answers)
    shared = shared_connections(seen)
    errors = sum(answer.status != 200 for answer in answers)
    injected = f"--preload, query at import, {WORKERS} workers, 8 clients x 10 requests"
    record("8 fork safety", backend.name, injected, "server connections shared by workers", shared, "0", shared == 0)
    record("8 fork safety", backend.name, injected, "errors", errors, "0", errors == 0)
    assert errors == 0, [(a.status, a.body[:200]) for a in answers if a.status != 200]
    assert len(seen) >= 2, "the requests did not reach two workers: nothing was compared"
    assert shared == 0, seen


def test_negative_control_fork_without_dispose(backend: Backend, tmp_path: Path) -> None:
    answers = run(backend, tmp_path, FAULTS_FORK_DISPOSE="0")
    shared = shared_connections(connections_by_worker(answers))
    errors = sum(answer.status != 200 for answer in answers)
    record("8 fork safety, negative control", backend.name, "as above, no dispose in the child",
           "shared connections + errors", shared + errors, "> 0 (harness detects)", shared + errors > 0)
    assert shared + errors > 0
