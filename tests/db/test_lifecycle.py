"""A session's birth and death (myapp/db/lifecycle.py): what goes wrong there must not
leak a bulkhead slot or hide the error that matters."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from myapp.db import AppSession, db, lifecycle
from myapp.models import User
from tests.support.apps import make_app
from tests.support.databases import Backend


def _status_from_another_thread(app: Flask, path: str) -> int:
    """A request from a thread that holds no slot of its own."""
    statuses: list[int] = []
    thread = threading.Thread(target=lambda: statuses.append(app.test_client().get(path).status_code))
    thread.start()
    thread.join(30)
    return statuses[0]


@pytest.mark.backends("postgresql", "mysql")
def test_a_failure_while_a_session_is_born_gives_its_bulkhead_slot_back(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug: the slot was recorded after the try that guarded the session's birth, so an
    error in between (describing the request's origin) kept the slot forever."""
    app = make_app(backend.url, DATABASE_BULKHEAD=1, DATABASE_POOL_TIMEOUT=1, PROPAGATE_EXCEPTIONS=False)

    @app.get("/_test/read")
    def read() -> str:
        db.session.scalar(select(User.id).limit(1))
        return "read"

    def broken_origin() -> str:
        raise RuntimeError("describing the origin failed")

    monkeypatch.setattr(lifecycle, "_describe_origin", broken_origin)
    assert _status_from_another_thread(app, "/_test/read") == 500
    monkeypatch.undo()
    assert _status_from_another_thread(app, "/_test/read") == 200  # the one slot is free
    app.extensions["myapp.database"].engine.dispose()


def test_a_rollback_that_fails_after_a_failed_commit_does_not_hide_the_commit_error(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Bug: with DATABASE_COMMIT_ON_SUCCESS, the rollback after a failed commit was not
    guarded: when it failed too (the connection was gone), its error replaced the
    commit's, and a duplicate username showed as "database unreachable"."""
    app = make_app(backend.url, DATABASE_COMMIT_ON_SUCCESS=True, PROPAGATE_EXCEPTIONS=False)

    @app.post("/_test/duplicate")
    def duplicate() -> str:
        db.session.add_all([User(username="twice", password_hash="x"), User(username="twice", password_hash="y")])
        return "written"

    def failing_rollback(self: AppSession) -> Any:
        raise OperationalError("ROLLBACK", {}, Exception("server closed the connection"))

    monkeypatch.setattr(AppSession, "rollback", failing_rollback)
    response = app.test_client().post("/_test/duplicate")
    monkeypatch.undo()
    assert response.status_code == 500  # the IntegrityError's page, not a 503
    assert "IntegrityError" in caplog.text and "rollback failed" in caplog.text
    with app.app_context():
        assert db.session.scalar(select(User.id).where(User.username == "twice")) is None
    app.extensions["myapp.database"].engine.dispose()


@pytest.mark.backends("postgresql", "mysql")
def test_a_session_removed_by_hand_gives_its_slot_back_when_the_next_one_is_born(backend: Backend) -> None:
    """``db.session.remove()`` in a view, then more work: the context's first session
    held a bulkhead slot that only its own end could give back."""
    app = make_app(backend.url, DATABASE_BULKHEAD=1, DATABASE_POOL_TIMEOUT=1, PROPAGATE_EXCEPTIONS=False)

    @app.get("/_test/twice")
    def twice() -> str:
        db.session.scalar(select(User.id).limit(1))
        db.session.remove()
        db.session.scalar(select(User.id).limit(1))
        return "twice"

    assert _status_from_another_thread(app, "/_test/twice") == 200
    assert _status_from_another_thread(app, "/_test/twice") == 200  # the one slot is free again
    app.extensions["myapp.database"].engine.dispose()
