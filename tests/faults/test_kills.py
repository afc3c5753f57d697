"""Scenario 2: the server kills every connection of the app between two requests.

An administrator (or a failover, or a pooler) ends the app's server sessions:
``pg_terminate_backend`` on PostgreSQL, ``KILL CONNECTION`` on MariaDB. The pools of
the gunicorn workers still hold those connections; pre-ping must replace them before
a view sees one. Negative control: with pre-ping off, the harness sees the failures.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL

from tests.support.apps import SECRET_KEY
from tests.support.databases import Backend
from tests.support.servers import ThrowawayServer

from .conftest import Answer, burst, escaped_errors, logged_in_browser
from .figures import record
from .servers import gunicorn
from .slowapp import create_fault_app

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn]

APP_NAME = "myapp-faults-kill"
APP_ENV = {"DATABASE_POOL_TIMEOUT": "2", "DATABASE_CONNECT_TIMEOUT": "2", "DATABASE_APP_NAME": APP_NAME}
CLIENTS = 8
REQUESTS_AFTER = 48


def kill_app_connections(server: ThrowawayServer, database: URL) -> int:
    """End every server session of the app on ``database``; return how many."""
    admin = server.admin_engine()
    try:
        with admin.connect() as connection:
            if server.name == "postgresql":
                # Only the app's sessions: they carry its application_name. The timeout
                # makes each call wait until the backend is gone: the connections are
                # dead before the next request, not dying during it.
                return sum(connection.scalars(text(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                    "WHERE datname = :db AND application_name LIKE :app"
                ), {"db": database.database, "app": f"{APP_NAME}:%"}))
            query = text("SELECT id FROM information_schema.processlist WHERE db = :db AND id <> CONNECTION_ID()")
            ids = list(connection.scalars(query, {"db": database.database}))
            for thread_id in ids:
                connection.execute(text(f"KILL CONNECTION {int(thread_id)}"))
            deadline = time.monotonic() + 5
            while set(connection.scalars(query, {"db": database.database})) & set(ids):
                assert time.monotonic() < deadline, "killed threads are still there after 5 s"
                time.sleep(0.05)
            return len(ids)
    finally:
        admin.dispose()


def failures(answers: list[Answer]) -> int:
    return sum(answer.status != 200 for answer in answers)


def kill_between_requests(server: ThrowawayServer, database: URL, base_url: str) -> tuple[int, list[Answer]]:
    """Fill the workers' pools, kill their connections, then send the next requests."""
    browsers = [logged_in_browser(base_url, f"killed{n}")[0] for n in range(CLIENTS)]
    warm = burst(base_url, ["/"] * CLIENTS * 4, CLIENTS, browsers=browsers)
    assert failures(warm) == 0, [(a.status, a.body[:300]) for a in warm if a.status != 200]
    killed = kill_app_connections(server, database)
    return killed, burst(base_url, ["/"] * REQUESTS_AFTER, CLIENTS, browsers=browsers)


def test_killed_connections_are_replaced(
    fault_server: ThrowawayServer, fault_db: URL, tmp_path: Path
) -> None:
    with gunicorn(fault_db, tmp_path / "gunicorn", **APP_ENV) as server:
        killed, after = kill_between_requests(fault_server, fault_db, server.url)
        log = server.log_text()
    failed = failures(after)
    command = "pg_terminate_backend" if fault_server.name == "postgresql" else "KILL CONNECTION"
    injected = f"{command} on every app connection ({killed}) between requests"
    record("2 server kills", fault_server.name, injected, f"failures in next {len(after)} requests",
           failed, "0", failed == 0)
    assert killed > 0, "no app connection was found to kill: the fault was not injected"
    assert failed == 0, [(a.status, a.body[:200]) for a in after if a.status != 200]
    assert escaped_errors(log) == 0, log[-3000:]


def test_negative_control_kills_without_pre_ping(
    fault_server: ThrowawayServer, fault_db: URL, tmp_path: Path
) -> None:
    env = {**APP_ENV, "FAULTS_PRE_PING": "0"}
    with gunicorn(fault_db, tmp_path / "gunicorn", fault_app=True, **env) as server:
        killed, after = kill_between_requests(fault_server, fault_db, server.url)
    failed = failures(after)
    record("2 server kills, negative control", fault_server.name, "as above, pool_pre_ping off",
           f"failures in next {len(after)} requests", failed, "> 0 (harness detects)", failed > 0)
    assert killed > 0
    assert failed > 0
    # What does fail is a 503 page with Retry-After, not a 500.
    assert all(a.status == 503 and a.headers.get("Retry-After") for a in after if a.status != 200)


@pytest.mark.backends("postgresql", "mysql")
def test_connection_lost_before_teardown_still_answers(backend: Backend) -> None:
    """A connection that dies after the view's last statement (a restart or a kill in
    between) must not turn the finished response into a bare 500 at teardown: closing
    the session meets a dead connection, which is thrown away, and the app carries on."""
    app = create_fault_app({
        "TESTING": True, "SECRET_KEY": SECRET_KEY, "DATABASE_URL": backend.url,
        "DATABASE_APP_NAME": "myapp-faults-teardown",
    })
    engine = app.extensions["myapp.database"].engine
    try:
        client = app.test_client()
        # With TESTING on, an exception from the teardown reaches this call.
        lost = client.get("/faults/lose-connection")
        next_page = client.get("/")
        checked_out = engine.pool.checkedout()
    finally:
        engine.dispose()
    record("2 server kills", backend.name, "connection killed between the view's last query and its teardown",
           "status of that request", lost.status_code, "200", lost.status_code == 200)
    assert lost.status_code == 200
    assert next_page.status_code == 200
    assert checked_out == 0
