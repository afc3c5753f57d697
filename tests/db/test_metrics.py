"""The database's hot-path metrics (issue 18): statement latency by server, the pool's
waits, timeouts and connections in use, connections opened by host, lost writes."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from flask import Flask
from sqlalchemy import exc, text
from sqlalchemy.pool import QueuePool

from myapp.db import db
from myapp.db.metrics import MeasuredPool
from myapp.db.tracking import LostWriteError
from myapp.models import User
from tests.support.databases import Backend
from tests.support.metrics import Delta, exists, sample

AppFactory = Callable[..., Flask]


def _host(backend: Backend) -> str:
    return "local" if backend.is_sqlite else f"{backend.url.host}:{backend.url.port}"


def test_each_statement_is_timed_on_its_server(app: Flask) -> None:
    delta = Delta()
    with app.app_context():
        for _ in range(3):
            db.session.execute(text("SELECT 1"))
    assert delta("myapp_db_statement_duration_seconds_count", server="primary") >= 3
    assert delta("myapp_db_statement_duration_seconds_sum", server="primary") > 0


def test_the_pool_reports_its_size_its_waits_and_what_is_checked_out(app_factory: AppFactory) -> None:
    engine = app_factory(DATABASE_POOL_SIZE=4).extensions["myapp.database"].engine
    assert isinstance(engine.pool, MeasuredPool)
    delta = Delta()
    before = sample("myapp_db_pool_checked_out", server="primary")
    with engine.connect(), engine.connect():
        assert sample("myapp_db_pool_checked_out", server="primary") == before + 2
    assert sample("myapp_db_pool_checked_out", server="primary") == before
    assert sample("myapp_db_pool_size", server="primary") == 4
    assert delta("myapp_db_pool_wait_seconds_count", server="primary") == 2


@pytest.mark.backends("postgresql", "mysql")  # SQLite writers wait on its lock instead
def test_a_wait_that_times_out_is_counted(app_factory: AppFactory) -> None:
    engine = app_factory(DATABASE_POOL_SIZE=1, DATABASE_MAX_OVERFLOW=0,
                         DATABASE_POOL_TIMEOUT=0.1).extensions["myapp.database"].engine
    delta = Delta()
    with engine.connect():
        with pytest.raises(exc.TimeoutError):
            engine.connect()
    assert delta("myapp_db_pool_timeouts_total", server="primary") == 1


def test_new_connections_are_counted_by_the_host_that_answered(app_factory: AppFactory, backend: Backend) -> None:
    engine = app_factory().extensions["myapp.database"].engine
    delta = Delta()
    with engine.connect():
        pass
    with engine.connect():  # the same pooled connection: not a new one
        pass
    assert delta("myapp_db_connections_opened_total", server="primary", host=_host(backend)) == 1


def test_metrics_off_leave_the_pool_unmeasured(app_factory: AppFactory) -> None:
    engine = app_factory(METRICS=False).extensions["myapp.database"].engine
    delta = Delta()
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    assert delta("myapp_db_pool_wait_seconds_count", server="primary") == 0
    assert delta("myapp_db_statement_duration_seconds_count", server="primary") == 0


def test_the_measured_pool_adds_no_name_the_library_pool_has() -> None:
    """MeasuredPool keeps its own fields on itself (test_layout allows that by name)."""
    assert not {"_wait", "_timeouts", "measure"} & set(dir(QueuePool))


def test_a_lost_write_is_counted(app: Flask) -> None:
    delta = Delta()
    with pytest.raises(LostWriteError):
        with app.app_context():
            db.session.add(User(username="forgotten", password_hash="x"))
    assert delta("myapp_db_lost_writes_total") == 1


def test_a_request_counts_its_own_statements_only(app_factory: AppFactory) -> None:
    """Its own: not a thread's working beside it, and not the BEGIN or COMMIT around
    them (SQLite's BEGIN is a statement of its own)."""
    app = app_factory()

    @app.get("/_test/two-statements")
    def two_statements() -> str:
        worker = threading.Thread(target=_three_statements, args=(app,))
        worker.start()
        worker.join()
        db.session.execute(text("SELECT 1"))
        with db.transaction() as session:
            session.execute(text("SELECT 2"))
        return "ok"

    delta = Delta()
    assert app.test_client().get("/_test/two-statements").text == "ok"
    assert delta("myapp_db_statements_per_request_sum") == 2


def _three_statements(app: Flask) -> None:
    with app.app_context():
        for _ in range(3):
            db.session.execute(text("SELECT 1"))


def test_every_retry_reason_has_its_series_before_its_first_retry() -> None:
    assert all(exists("myapp_db_retries_total", reason=reason)
               for reason in ("serialization", "deadlock", "certification", "locked"))
