"""The slow-query log and the query budget (myapp/db/instrumentation.py)."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from myapp.db import db
from tests.support.apps import make_app
from tests.support.databases import Backend


def test_a_slow_statement_is_logged_without_its_parameters(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(backend.url, DATABASE_SLOW_QUERY_MS=0.001)
    caplog.set_level(logging.WARNING, "myapp.sql")
    with app.app_context():
        db.session.execute(text("SELECT :secret AS value"), {"secret": "hunter2"})
        db.session.rollback()
    assert "slow query" in caplog.text and "AS value" in caplog.text
    assert "hunter2" not in caplog.text
    app.extensions["myapp.database"].engine.dispose()


def test_failed_statements_leave_no_timer_behind(backend: Backend) -> None:
    """Bug: the timer pushed each statement's start onto a list in the pooled
    connection's info and only a statement that succeeded popped it, so every failed
    statement left one entry behind for the life of the connection."""
    app = make_app(backend.url, DATABASE_SLOW_QUERY_MS=500)
    with app.app_context():
        connection = db.session.connection()
        for _ in range(5):
            with pytest.raises(DBAPIError):
                connection.execute(text("SELECT * FROM no_such_table"))
            db.session.rollback()
            connection = db.session.connection()
        connection.execute(text("SELECT 1"))
        left = {key: value for key, value in connection.info.items() if "query_started" in str(key)}
        db.session.rollback()
    assert all(not isinstance(value, list) for value in left.values()) and not left
    app.extensions["myapp.database"].engine.dispose()


def test_a_request_over_the_query_budget_is_reported(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(backend.url, DATABASE_QUERY_BUDGET=2)

    @app.get("/_test/three")
    def three() -> str:
        for _ in range(3):
            db.session.execute(text("SELECT 1"))
        return "three"

    @app.get("/_test/two")
    def two() -> str:
        for _ in range(2):
            db.session.execute(text("SELECT 1"))
        return "two"

    client = app.test_client()
    assert client.get("/_test/two").status_code == 200
    assert "queries (budget" not in caplog.text
    assert client.get("/_test/three").status_code == 200
    assert "GET /_test/three sent 3 queries (budget 2)" in caplog.text
    app.extensions["myapp.database"].engine.dispose()
