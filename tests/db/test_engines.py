"""Engines per backend: what a connection is given to survive a silent network and a
demoted primary."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import Engine, event, func, select, text

from myapp.db import db
from myapp.db.engines import read_only_server_is_a_disconnect
from myapp.models import User
from tests.support.apps import make_app
from tests.support.databases import Backend

def _engine(app: Flask) -> Engine:
    return app.extensions["myapp.database"].engine  # type: ignore[no-any-return]


def _captured_connect_params(app: Flask) -> dict[str, Any]:
    captured: dict[str, Any] = {}
    event.listen(_engine(app), "do_connect", lambda dialect, record, cargs, cparams: captured.update(cparams))
    with _engine(app).connect():
        pass
    return captured


@pytest.mark.real_commits
@pytest.mark.backends("postgresql")
def test_postgres_connections_fail_within_the_network_timeout(app: Flask) -> None:
    params = _captured_connect_params(app)
    assert params["tcp_user_timeout"] == 10_000
    assert params["keepalives"] == 1
    assert params["keepalives_idle"] + params["keepalives_interval"] * params["keepalives_count"] <= 10


@pytest.mark.real_commits
@pytest.mark.backends("mysql")
def test_mariadb_reads_and_writes_time_out(app: Flask) -> None:
    params = _captured_connect_params(app)
    assert (params["read_timeout"], params["write_timeout"]) == (10, 10)


@pytest.mark.backends("postgresql", "mysql")
def test_network_timeout_zero_leaves_the_kernel_defaults(backend: Backend) -> None:
    app = make_app(backend.url, DATABASE_NETWORK_TIMEOUT=0)
    params = _captured_connect_params(app)
    assert not {"tcp_user_timeout", "keepalives", "read_timeout", "write_timeout"} & set(params)
    _engine(app).dispose()


@pytest.mark.backends("postgresql")
def test_pgbouncer_mode_prepares_nothing_and_sends_no_startup_options(backend: Backend) -> None:
    app = make_app(backend.url, DATABASE_PGBOUNCER="transaction", DATABASE_STATEMENT_TIMEOUT=1500)
    params = _captured_connect_params(app)
    assert params["prepare_threshold"] is None
    assert "options" not in params
    with app.test_request_context("/", method="GET"):
        timeout = db.session.scalar(select(func.current_setting("statement_timeout")))
        assert timeout == "1500ms"  # SET LOCAL in every transaction, reads included
    _engine(app).dispose()


# -- a demoted primary ----------------------------------------------------------------


@pytest.fixture
def pg_app(backend: Backend) -> Iterator[Flask]:
    app = make_app(backend.url, PROPAGATE_EXCEPTIONS=False, DATABASE_POOL_SIZE=1, DATABASE_MAX_OVERFLOW=0)

    @app.post("/_test/write")
    def write() -> str:
        with db.transaction():
            db.session.add(User(username=f"u{db.session.scalar(select(func.count()).select_from(User))}",
                                password_hash="x"))
        return str(db.session.scalar(text("SELECT pg_backend_pid()")))

    yield app
    _engine(app).dispose()  # the demoted connection must not clean up
    with _engine(app).begin() as connection:
        connection.execute(User.__table__.delete())
    _engine(app).dispose()


def _demote_the_pooled_connection(app: Flask) -> int:
    """Make the one pooled connection behave like one to a server that became a standby:
    it answers, and refuses every write with SQLSTATE 25006."""
    with _engine(app).connect() as connection:
        connection.exec_driver_sql("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        connection.commit()
        return int(connection.scalar(text("SELECT pg_backend_pid()")))


@pytest.mark.backends("postgresql")
def test_a_connection_to_a_read_only_server_is_discarded_not_reused(pg_app: Flask) -> None:
    demoted = _demote_the_pooled_connection(pg_app)
    client = pg_app.test_client()
    refused = client.post("/_test/write")
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    served = client.post("/_test/write")
    assert served.status_code == 200 and int(served.text) != demoted  # a new connection
    with _engine(pg_app).connect() as connection:
        assert connection.scalar(select(func.count()).select_from(User)) == 1


@pytest.mark.backends("postgresql")
def test_negative_control_without_the_rule_the_demoted_connection_keeps_failing(pg_app: Flask) -> None:
    event.remove(_engine(pg_app), "handle_error", read_only_server_is_a_disconnect)
    _demote_the_pooled_connection(pg_app)
    client = pg_app.test_client()
    assert [client.post("/_test/write").status_code for _ in range(3)] == [500, 500, 500]
