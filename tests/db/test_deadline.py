"""The deadline on each wait (myapp/db/deadline.py): a slow statement on a server that
answers is never abandoned; the frozen server itself is tests/faults/test_frozen.py."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from flask import Flask
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from myapp.db import db
from myapp.db.deadline import Deadlines
from tests.support.databases import Backend

AppFactory = Callable[..., Flask]


@pytest.mark.backends("postgresql")
def test_a_slow_statement_on_a_server_that_answers_runs_to_its_end(app_factory: AppFactory) -> None:
    """Past the deadline the watchdog asks the server for a fresh connection; it
    answers, so the statement (a long report, a migration) keeps running."""
    app = app_factory(DATABASE_NETWORK_TIMEOUT=1)
    with app.app_context():
        assert db.session.execute(text("SELECT pg_sleep(2.5), 42")).one()[1] == 42
        watchdog = db.app_state().feature(Deadlines).watchdogs["primary"]  # type: ignore[union-attr]
    assert watchdog.abandoned == 0 and not watchdog.recently_unanswered()


@pytest.mark.backends("postgresql")
def test_the_deadline_comes_after_the_statement_timeout(app_factory: AppFactory) -> None:
    """A statement the server would cancel itself gets the chance to."""
    app = app_factory(DATABASE_NETWORK_TIMEOUT=2, DATABASE_STATEMENT_TIMEOUT=5000)
    assert app.extensions["myapp.database"].feature(Deadlines).seconds == 6.0


@pytest.mark.backends("sqlite", "mysql")
def test_no_watchdog_where_the_driver_has_its_own_read_timeout(app_factory: AppFactory) -> None:
    """PyMySQL's read timeout already bounds a wait on a frozen server; SQLite has none."""
    assert app_factory().extensions["myapp.database"].feature(Deadlines) is None


@pytest.mark.backends("postgresql")
def test_a_stale_wait_never_shuts_down_a_socket_that_another_connection_reuses(backend: Backend) -> None:
    """A wait whose end no event reported (its connection closed, its engine disposed)
    must not let the watchdog shut down whatever got its descriptor number next."""
    import psycopg

    from myapp.db.deadline import Watchdog

    def no_answer() -> None:
        raise OperationalError("SELECT 1", {}, Exception("no answer"))

    conninfo = backend.url.render_as_string(hide_password=False).replace("postgresql+psycopg", "postgresql")
    watchdog = Watchdog("stale test", 0.01, no_answer)
    first = psycopg.connect(conninfo)
    watchdog.begin(first)  # and no end: the connection goes away with its wait noted
    first.close()
    second = psycopg.connect(conninfo)
    try:
        time.sleep(0.05)
        watchdog.look()
        assert watchdog.abandoned == 0
        assert second.execute("SELECT 1").fetchone() == (1,)
    finally:
        second.close()


@pytest.mark.backends("postgresql")
def test_a_connection_lost_inside_a_transaction_fails_as_a_lost_connection(app_factory: AppFactory) -> None:
    """The server session of a unit of work ends under it (a crashed or restarted
    server; here pg_terminate_backend). The rollback that follows sends nothing on the
    invalidated connection, so the deadline has no wait to watch: the request must end
    as the lost connection it met, a 503, not as PendingRollbackError, a 500 (the
    rollback listener used to ask the dead connection for its socket: seen in scenario
    19d, the Patroni leader's PostgreSQL killed under load)."""
    app = app_factory(DATABASE_NETWORK_TIMEOUT=5, PROPAGATE_EXCEPTIONS=False)
    killer = create_engine(app.extensions["myapp.database"].engine.url, poolclass=NullPool)

    @app.post("/_test/lose-the-connection")
    def lose_the_connection() -> str:
        with db.transaction() as session:
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with killer.connect() as connection:
                connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            session.execute(text("SELECT 1"))  # the session's connection is gone
        return "not reached"

    try:
        response = app.test_client().post("/_test/lose-the-connection")
    finally:
        killer.dispose()
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"]
