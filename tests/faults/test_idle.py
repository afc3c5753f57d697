"""Scenario 3: the server closes connections that stay idle too long.

PostgreSQL's ``idle_session_timeout`` (set on the test's database) and MariaDB's
``wait_timeout`` (set globally on the throwaway server) end a pooled connection after
a second or two of silence. After a longer pause, requests must still succeed: the
pool pings a connection before handing it out (pre-ping), or replaces connections
older than ``pool_recycle``. Negative control: neither, and a dead connection reaches
a view.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL

from tests.support.apps import SECRET_KEY
from tests.support.servers import ThrowawayServer

from .figures import record
from .slowapp import create_fault_app

pytestmark = pytest.mark.faults

IDLE_TIMEOUT_SECONDS = 1
PAUSE_SECONDS = 2.5
APP_NAME = "myapp-faults-idle"


@contextmanager
def idle_timeout(server: ThrowawayServer, database: URL) -> Iterator[None]:
    """Make the server end connections idle for more than ``IDLE_TIMEOUT_SECONDS``."""
    admin = server.admin_engine()
    try:
        with admin.connect() as connection:
            if server.name == "postgresql":
                ms = IDLE_TIMEOUT_SECONDS * 1000
                connection.execute(text(f"ALTER DATABASE {database.database} SET idle_session_timeout = {ms}"))
            else:
                connection.execute(text(f"SET GLOBAL wait_timeout = {IDLE_TIMEOUT_SECONDS}"))
        yield
    finally:
        with admin.connect() as connection:
            if server.name == "postgresql":
                connection.execute(text(f"ALTER DATABASE {database.database} RESET idle_session_timeout"))
            else:
                connection.execute(text("SET GLOBAL wait_timeout = DEFAULT"))
        admin.dispose()


def app_sessions(server: ThrowawayServer, database: URL) -> int:
    """Server sessions the app has open on ``database`` right now."""
    admin = server.admin_engine()
    try:
        with admin.connect() as connection:
            if server.name == "postgresql":
                query = "SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND application_name LIKE :app"
                return int(connection.scalar(text(query), {"db": database.database, "app": f"{APP_NAME}:%"}))
            query = "SELECT count(*) FROM information_schema.processlist WHERE db = :db AND id <> CONNECTION_ID()"
            return int(connection.scalar(text(query), {"db": database.database}))
    finally:
        admin.dispose()


def requests_after_idle(
    server: ThrowawayServer, database: URL, monkeypatch: pytest.MonkeyPatch, *, pre_ping: bool, recycle: int
) -> tuple[int, int, int]:
    """Open pooled connections, wait past the idle timeout, send 20 requests.

    Return the app's server sessions before and after the pause and the failed requests.
    """
    monkeypatch.setenv("FAULTS_PRE_PING", "1" if pre_ping else "0")
    app = create_fault_app({
        "TESTING": True, "SECRET_KEY": SECRET_KEY, "DATABASE_URL": database, "DATABASE_APP_NAME": APP_NAME,
        "DATABASE_POOL_RECYCLE": recycle, "DATABASE_CONNECT_TIMEOUT": 2, "DATABASE_POOL_TIMEOUT": 2,
    })
    engine = app.extensions["myapp.database"].engine
    try:
        client = app.test_client()
        assert all(client.get("/").status_code == 200 for _ in range(3))
        before = app_sessions(server, database)
        time.sleep(PAUSE_SECONDS)
        after_pause = app_sessions(server, database)
        failed = sum(client.get("/").status_code != 200 for _ in range(20))
        assert engine.pool.checkedout() == 0
        return before, after_pause, failed
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("pre_ping", "recycle"),
    [pytest.param(True, 1800, id="pre-ping"), pytest.param(False, IDLE_TIMEOUT_SECONDS, id="recycle")],
)
def test_idle_connections_are_never_handed_out_dead(
    fault_server: ThrowawayServer, fault_db: URL, monkeypatch: pytest.MonkeyPatch, pre_ping: bool, recycle: int
) -> None:
    with idle_timeout(fault_server, fault_db):
        before, after_pause, failed = requests_after_idle(
            fault_server, fault_db, monkeypatch, pre_ping=pre_ping, recycle=recycle
        )
    guard = "pre-ping" if pre_ping else f"pool_recycle={recycle} s, no pre-ping"
    record("3 idle timeout", fault_server.name,
           f"server idle timeout {IDLE_TIMEOUT_SECONDS} s, pause {PAUSE_SECONDS} s ({guard})",
           "failures in next 20 requests", failed, "0", failed == 0)
    # The fault happened: the server ended the pooled connection during the pause.
    assert before > 0 and after_pause == 0
    assert failed == 0


def test_negative_control_idle_without_pre_ping_or_recycle(
    fault_server: ThrowawayServer, fault_db: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    with idle_timeout(fault_server, fault_db):
        before, after_pause, failed = requests_after_idle(
            fault_server, fault_db, monkeypatch, pre_ping=False, recycle=1800
        )
    record("3 idle timeout, negative control", fault_server.name, "as above, no pre-ping, pool_recycle 1800 s",
           "failures in next 20 requests", failed, "> 0 (harness detects)", failed > 0)
    assert before > 0 and after_pause == 0
    assert failed > 0
