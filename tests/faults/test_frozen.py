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
the server thaws. With a replica the reads go on, served by it under the read-only
banner, and only the write waits for its deadline.
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
from tests.support.apps import dispose_app, make_app
from tests.support.servers import PostgresServer, ThrowawayServer
from tests.topology import ReplicatedPostgres
from tests.topology.fixtures import replicated, replicated_session  # noqa: F401 (fixtures)

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
        dispose_app(app)


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
        dispose_app(app)


# -- with a replica: the reads go on -------------------------------------------------------------


@pytest.fixture
def replicated_db(replicated: ReplicatedPostgres) -> Iterator[tuple[ReplicatedPostgres, URL]]:  # noqa: F811
    with replicated.replayed_database() as url:
        yield replicated, url


def test_with_a_replica_the_reads_go_on_during_a_freeze(replicated_db: tuple[ReplicatedPostgres, URL]) -> None:
    """The primary frozen, the standby well: the reads are served from the standby under
    the read-only banner at once, the write gets its 503 within 15 s."""
    topology, url = replicated_db
    standby_url = topology.standbys[0].url(str(url.database)).render_as_string(hide_password=False)
    app = _app(url, DATABASE_REPLICA_URLS=standby_url, DATABASE_REPLICA_CHECK_INTERVAL=0.2)
    try:
        results = _under_freeze(topology.primary, app)
        reads, (write_status, write_seconds) = results[:-1], results[-1]
        slowest_read = max(seconds for _, seconds in reads)
        scenario, injected = "19a frozen server, with a replica", f"SIGSTOP on the primary for {FREEZE:g} s"
        record(scenario, "postgresql", injected, "reads answered 200 from the replica",
               sum(status == 200 for status, _ in reads), f"{len(reads)}", all(s == 200 for s, _ in reads))
        record(scenario, "postgresql", injected, "slowest read (s)", round(slowest_read, 2), "<= 15",
               slowest_read <= GOAL)
        record(scenario, "postgresql", injected, "the write's answer (s)", round(write_seconds, 2), "<= 15 (503)",
               write_status == 503 and write_seconds <= GOAL)
        assert [status for status, _ in reads] == [200] * len(reads) and slowest_read <= GOAL, results
        assert write_status == 503 and write_seconds <= GOAL, results
    finally:
        dispose_app(app)
