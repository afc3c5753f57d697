"""Scenario 4: the pool runs dry, and a runaway query meets the statement timeout.

One gunicorn worker with four threads and a pool of one connection (no overflow, a
one-second pool timeout). Four concurrent requests hold the database for 3 s each:
one gets the connection, the other three must get a 503 page with ``Retry-After``
after about the pool timeout (not wait for the slow one, not a 500), and the app must
recover fully once it finishes. A query running past ``DATABASE_STATEMENT_TIMEOUT``
must be cancelled by the server and answered with a 503 page, and its connection
must go back to the pool, usable.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.support.databases import Backend

from .conftest import burst, escaped_errors
from .figures import record
from .servers import gunicorn

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn, pytest.mark.backends("postgresql", "mysql")]

POOL_TIMEOUT = 1
SLOW_SECONDS = 3
STATEMENT_TIMEOUT_MS = 2000
APP_ENV = {
    "WEB_CONCURRENCY": "1",
    "GUNICORN_THREADS": "4",
    "DATABASE_POOL_SIZE": "1",
    "DATABASE_MAX_OVERFLOW": "0",
    "DATABASE_POOL_TIMEOUT": str(POOL_TIMEOUT),
    "DATABASE_APP_NAME": "myapp-faults-pool",
}


def checked_out(base_url: str) -> int:
    return int(requests.get(f"{base_url}/faults/pool", timeout=10).json()["checkedout"])


def test_pool_exhaustion_answers_503_then_recovers(backend: Backend, tmp_path: Path) -> None:
    with gunicorn(backend.url, tmp_path / "gunicorn", fault_app=True, **APP_ENV) as server:
        slow = burst(server.url, [f"/faults/sleep?seconds={SLOW_SECONDS}"] * 4, clients=4, timeout=15)
        after = burst(server.url, ["/faults/whoami"] * 20, clients=4)
        left_checked_out = checked_out(server.url)
        log = server.log_text()

    served = [a for a in slow if a.status == 200]
    refused = [a for a in slow if a.status == 503]
    slowest_refusal = max((a.seconds for a in refused), default=0.0)
    injected = f"4 concurrent {SLOW_SECONDS} s queries, pool 1 + 0 overflow, pool_timeout {POOL_TIMEOUT} s"
    margin = POOL_TIMEOUT + 1.0
    record("4 pool exhaustion", backend.name, injected, "503s (of 3 extra requests)", len(refused), "3", len(refused) == 3)
    record("4 pool exhaustion", backend.name, injected, "seconds to the slowest 503", round(slowest_refusal, 2),
           f"< {margin:g} (pool_timeout + 1 s)", slowest_refusal < margin)
    failed_after = sum(a.status != 200 for a in after)
    record("4 pool exhaustion", backend.name, injected, "failures in next 20 requests", failed_after, "0",
           failed_after == 0)
    record("4 pool exhaustion", backend.name, injected, "connections checked out after", left_checked_out, "0",
           left_checked_out == 0)

    assert len(served) == 1 and len(refused) == 3, [(a.status, a.body[:200]) for a in slow]
    assert all(a.headers.get("Retry-After") and "Temporarily unavailable" in a.body for a in refused)
    # The page says why: the site is busy, not the database down.
    assert all("every database connection is in use" in a.body for a in refused)
    assert failed_after == 0
    assert left_checked_out == 0
    assert escaped_errors(log) == 0, log[-3000:]


def test_statement_timeout_cancels_a_runaway_query(backend: Backend, tmp_path: Path) -> None:
    env = {**APP_ENV, "DATABASE_STATEMENT_TIMEOUT": str(STATEMENT_TIMEOUT_MS)}
    with gunicorn(backend.url, tmp_path / "gunicorn", fault_app=True, **env) as server:
        connection_before = requests.get(f"{server.url}/faults/whoami", timeout=10).json()["backend"]
        runaway = requests.get(f"{server.url}/faults/sleep?seconds=30", timeout=20)
        # The same single connection serves the next requests: it was returned, usable.
        after = burst(server.url, ["/faults/whoami"] * 10, clients=2)
        left_checked_out = checked_out(server.url)
        log = server.log_text()

    seconds = runaway.elapsed.total_seconds()
    setting = "statement_timeout" if backend.name == "postgresql" else "max_statement_time"
    injected = f"30 s query, {setting} {STATEMENT_TIMEOUT_MS} ms"
    record("4 statement timeout", backend.name, injected, "status of the runaway request", runaway.status_code,
           "503", runaway.status_code == 503)
    record("4 statement timeout", backend.name, injected, "seconds to the 503", round(seconds, 2),
           f"< {STATEMENT_TIMEOUT_MS / 1000 + 1:g}", seconds < STATEMENT_TIMEOUT_MS / 1000 + 1)
    failed_after = sum(a.status != 200 for a in after)
    record("4 statement timeout", backend.name, injected, "failures in next 10 requests", failed_after, "0",
           failed_after == 0)

    assert runaway.status_code == 503 and runaway.headers.get("Retry-After")
    assert "Temporarily unavailable" in runaway.text and "Traceback" not in runaway.text
    assert "took too long to answer" in runaway.text and "may or may not have been saved" in runaway.text
    assert failed_after == 0
    # The pool's one connection served everything: the cancelled query's connection
    # went back to the pool, usable, instead of being held or thrown away.
    assert {a.json["backend"] for a in after} == {connection_before}
    assert left_checked_out == 0
    assert escaped_errors(log) == 0, log[-3000:]


def test_negative_control_runaway_query_without_statement_timeout(backend: Backend, tmp_path: Path) -> None:
    """Without a statement timeout the harness sees the runaway request hang."""
    with gunicorn(backend.url, tmp_path / "gunicorn", fault_app=True, **APP_ENV) as server:
        try:
            status: int | None = requests.get(f"{server.url}/faults/sleep?seconds=4", timeout=2).status_code
        except requests.Timeout:
            status = None
    record("4 statement timeout, negative control", backend.name, "4 s query, no statement timeout",
           "answered within 2 s", int(status is not None), "0 (harness detects the hang)", status is None)
    assert status is None


def test_negative_control_exhausted_pool_with_a_long_pool_timeout(backend: Backend, tmp_path: Path) -> None:
    """With a pool timeout longer than the slow query, the harness sees the extra
    request wait instead of getting its 503."""
    env = {**APP_ENV, "DATABASE_POOL_TIMEOUT": "30"}
    with gunicorn(backend.url, tmp_path / "gunicorn", fault_app=True, **env) as server:
        answers = burst(server.url, ["/faults/sleep?seconds=2"] * 2, clients=2, timeout=3)
    refused = sum(a.status == 503 for a in answers)
    waited = sum(a.status is None for a in answers)
    record("4 pool exhaustion, negative control", backend.name, "2 concurrent 2 s queries, pool 1, pool_timeout 30 s",
           "503s", refused, "0 (harness detects the wait)", refused == 0 and waited > 0)
    assert refused == 0 and waited >= 1
