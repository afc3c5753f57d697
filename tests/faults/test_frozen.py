"""Scenario 19a: the database's processes are frozen (SIGSTOP) while requests need it.

A frozen server (stuck on storage, a paused VM) never answers, yet its kernel accepts
connections and acknowledges every packet: no TCP timer fires, and its own statement
timeout cannot run. Requests that were already holding pooled connections, and new
ones, must all be answered within 15 s all the same (a 503 is fine: there is no
replica here), and the site must work again once the server thaws.

With the deadline (``DATABASE_NETWORK_TIMEOUT``, 10 s by default) a wait past it makes
the watchdog ask the server for a fresh connection (the ping's 2 s); it goes
unanswered, so the waits are abandoned and the connects that follow fail at once.
Negative control: ``DATABASE_NETWORK_TIMEOUT=0``, no deadline: the requests hang until
the server thaws.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from flask import Flask
from sqlalchemy.engine import URL

from myapp.db import db
from myapp.models import User
from tests.support.apps import make_app
from tests.support.servers import PostgresServer, ThrowawayServer

from .figures import record

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]

FREEZE = 16.0  # seconds the server stays frozen
GOAL = 15.0  # seconds within which every request started during the freeze is answered
CLIENTS = 4


@pytest.fixture
def frozen_db(throwaway_postgres: ThrowawayServer) -> Iterator[tuple[PostgresServer, URL]]:
    assert isinstance(throwaway_postgres, PostgresServer)
    with throwaway_postgres.database() as url:
        yield throwaway_postgres, url


def _app(url: URL, **settings: object) -> Flask:
    app = make_app(url, PROPAGATE_EXCEPTIONS=False, **settings)
    counter = iter(range(10**6))
    lock = threading.Lock()

    @app.post("/_test/write")
    def write() -> str:
        with lock:
            number = next(counter)
        with db.transaction() as session:
            session.add(User(username=f"frozen{number}", password_hash="x"))
        return "written"

    return app


def _timed(app: Flask, method: str, path: str) -> tuple[int, float]:
    started = time.monotonic()
    status = app.test_client().open(path, method=method).status_code
    return status, time.monotonic() - started


def _under_freeze(server: PostgresServer, app: Flask) -> list[tuple[int, float]]:
    """Pool CLIENTS connections, let them age past the free-ping window, freeze the
    server, and send reads and a write from CLIENTS threads; wait out the freeze."""
    calls = [("GET", "/")] * (CLIENTS - 1) + [("POST", "/_test/write")]
    with ThreadPoolExecutor(CLIENTS) as pool:
        assert all(status == 200 for status, _ in pool.map(lambda call: _timed(app, *call), calls[:-1] * 2))
        time.sleep(1.2)
        frozen_at = time.monotonic()
        with server.frozen():
            futures = [pool.submit(_timed, app, method, path) for method, path in calls]
            time.sleep(max(0.0, FREEZE - (time.monotonic() - frozen_at)))
            done = [future.result() for future in futures if future.done()]
            pending = len(futures) - len(done)
        late = [future.result(timeout=60) for future in futures if future not in done]
    return done + [(status, max(seconds, FREEZE)) for status, seconds in late[:pending]]


def test_every_request_during_a_freeze_is_answered_within_15_s(
    frozen_db: tuple[PostgresServer, URL]
) -> None:
    server, url = frozen_db
    app = _app(url)
    try:
        results = _under_freeze(server, app)
        slowest = max(seconds for _, seconds in results)
        statuses = sorted(status for status, _ in results)
        scenario, injected = "19a frozen server", f"SIGSTOP on every server process for {FREEZE:g} s"
        record(scenario, "postgresql", injected, "slowest answer during the freeze (s)", round(slowest, 2),
               f"<= {GOAL:g}", slowest <= GOAL)
        record(scenario, "postgresql", injected, "requests answered 503 (no replica)", statuses.count(503),
               f"{CLIENTS}", statuses.count(503) == CLIENTS)
        assert slowest <= GOAL and statuses == [503] * CLIENTS, results
        deadline = time.monotonic() + 15
        while _timed(app, "GET", "/")[0] != 200:  # thawed: the site works again
            assert time.monotonic() < deadline, "the site did not come back after the thaw"
            time.sleep(0.2)
    finally:
        app.extensions["myapp.database"].engine.dispose()


def test_negative_control_without_the_deadline_requests_hang_until_the_thaw(
    frozen_db: tuple[PostgresServer, URL]
) -> None:
    server, url = frozen_db
    app = _app(url, DATABASE_NETWORK_TIMEOUT=0)
    try:
        results = _under_freeze(server, app)
        hung = sum(seconds >= FREEZE - 0.5 for _, seconds in results)
        record("19a frozen server, negative control", "postgresql", "no deadline (DATABASE_NETWORK_TIMEOUT=0)",
               "requests still waiting when the server thawed", hung, f"{CLIENTS} (they hang)", hung == CLIENTS)
        assert hung == CLIENTS, results
    finally:
        app.extensions["myapp.database"].engine.dispose()
