"""The registry never hands a dead context's session to a new one, and always gives its
connection back, even when the teardown that removes it fails or never runs."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator

import pytest
from flask import Flask
from flask.ctx import AppContext
from flask.globals import app_ctx
from sqlalchemy import func, select
from sqlalchemy.util import ScopedRegistry

from myapp.db import AppSession, db
from myapp.db import lifecycle
from myapp.models import User
from tests.support.apps import make_app
from tests.support.databases import Backend

@pytest.fixture
def bare_app(backend: Backend) -> Iterator[Flask]:
    """An app outside test isolation: the registry's own sessions and connections."""
    app = make_app(backend.url)
    yield app
    with app.extensions["myapp.database"].engine.begin() as connection:
        connection.execute(User.__table__.delete())
    app.extensions["myapp.database"].engine.dispose()


def _pool(app: Flask) -> object:
    return app.extensions["myapp.database"].engine.pool


def _abandon_a_session(app: Flask) -> tuple[int, AppSession]:
    """Push a context, write in its session, and pop it while a teardown that runs
    before ours (registered after it) raises: our teardown never runs."""

    def later_teardown(exc: BaseException | None) -> None:
        raise RuntimeError("a teardown registered after the database's failed")

    app.teardown_appcontext(later_teardown)
    context = app.app_context()
    context.push()
    session = db.session()
    session.add(User(username="abandoned", password_hash="x"))
    session.flush()  # a transaction is open and holds a pooled connection
    assert _pool(app).checkedout() == 1  # type: ignore[attr-defined]
    try:
        context.pop()
    except RuntimeError:
        pass
    else:
        raise AssertionError("the failing teardown did not run")
    app.teardown_appcontext_funcs.remove(later_teardown)
    dead_id, alive = id(context), weakref.ref(context)
    del context
    gc.collect()
    assert alive() is None, gc.get_referrers(alive())
    return dead_id, session


def _count_users(app: Flask) -> int:
    with app.extensions["myapp.database"].engine.connect() as connection:
        return connection.scalar(select(func.count()).select_from(User.__table__)) or 0


def test_a_context_whose_teardown_never_ran_gives_its_connection_back(bare_app: Flask) -> None:
    _dead_id, abandoned = _abandon_a_session(bare_app)

    # Freed with its context: no entry left for a later context (whatever address it
    # gets) to find, the transaction rolled back, the connection back in the pool.
    assert len(db.session.registry.registry) == 0  # type: ignore[attr-defined]
    assert not abandoned.in_transaction()
    assert _pool(bare_app).checkedout() == 0  # type: ignore[attr-defined]
    assert _count_users(bare_app) == 0

    with bare_app.app_context():
        fresh = db.session()
        assert fresh is not abandoned
        assert not fresh.new and len(fresh.identity_map) == 0 and not fresh.in_transaction()
        assert fresh.scalar(select(func.count()).select_from(User)) == 0
    assert _pool(bare_app).checkedout() == 0  # type: ignore[attr-defined]


def test_negative_control_a_registry_keyed_on_id_keeps_the_session_for_a_reused_id(
    bare_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hazard is real: keyed on ``id()`` of the context, the abandoned session stays
    registered, in its transaction and holding its connection, under a number that
    CPython hands to the next object allocated at the freed address."""
    id_keyed = ScopedRegistry(db.session.registry.createfunc, lambda: id(app_ctx._get_current_object()))
    monkeypatch.setattr(db.session, "registry", id_keyed)
    monkeypatch.setattr(db, "_abandon", lambda key: None)  # and no safety net either

    dead_id, abandoned = _abandon_a_session(bare_app)
    try:
        assert id_keyed.registry[dead_id] is abandoned
        assert abandoned.in_transaction()
        assert _pool(bare_app).checkedout() == 1  # type: ignore[attr-defined]
    finally:
        abandoned.rollback()
        abandoned.close()
        id_keyed.registry.clear()


def test_a_failing_lost_write_report_still_removes_the_session(
    bare_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_report(session: AppSession) -> list[str]:
        raise RuntimeError("describe_uncommitted failed")

    monkeypatch.setattr(lifecycle, "describe_uncommitted", broken_report)

    @bare_app.post("/_test/write")
    def write() -> str:
        db.session.add(User(username="forgotten", password_hash="x"))
        db.session.flush()
        return "ok"

    with pytest.raises(RuntimeError, match="describe_uncommitted failed"):
        bare_app.test_client().post("/_test/write")
    assert _pool(bare_app).checkedout() == 0  # type: ignore[attr-defined]
    assert len(db.session.registry.registry) == 0  # type: ignore[attr-defined]
    assert _count_users(bare_app) == 0
    monkeypatch.undo()
    with bare_app.app_context():
        assert not db.session().new and not db.session().in_transaction()


def test_registry_outside_an_app_context_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match="outside an application context"):
        db.session()
    with pytest.raises(RuntimeError, match="outside an application context"):
        db.session.registry.has()


def test_outside_an_app_context_no_session_can_be_registered() -> None:
    """No key exists outside a context, so no session set there could reach a later use."""
    with pytest.raises(RuntimeError, match="outside an application context"):
        db.session.registry.set(AppSession())
