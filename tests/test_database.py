"""The Database class, its engine options and the app-context session registry."""

from __future__ import annotations

import os
import secrets
import threading
import time
from contextlib import ExitStack
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import Engine, create_engine, delete, event, func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import DeclarativeBase, Session
from sqlalchemy.pool import NullPool
from sqlalchemy.util import ScopedRegistry
from werkzeug.security import generate_password_hash

from myapp.db import Base, Database, LostWriteError, db
from myapp.db.errors import describe_error, mask_url
from myapp.models import Post, User
from tests.support.apps import make_app
from tests.support.databases import Backend


def _count_users(app: Flask) -> int:
    """Count through a connection of its own, outside any registry session."""
    with app.extensions["myapp.database"].engine.connect() as connection:
        return connection.scalar(select(func.count()).select_from(User.__table__)) or 0


def _users_named(engine: Engine, username: str) -> int:
    """Count, over a connection of its own, the committed users called ``username``."""
    users = User.__table__
    with engine.connect() as connection:
        return connection.scalar(select(func.count()).select_from(users).where(users.c.username == username)) or 0


def _add_user_route(app: Flask) -> None:
    """A test-only view that writes a user and then fails."""

    @app.post("/_test/write-then-fail")
    def write_then_fail() -> str:
        db.session.add(User(username="ghost", password_hash="x"))
        db.session.flush()
        raise RuntimeError("the view failed after writing")


# -- the seed's public face -----------------------------------------------------------


def test_get_base_is_the_one_declarative_base() -> None:
    assert Database.get_base() is Base
    assert db.get_base() is Base
    assert issubclass(Base, DeclarativeBase)
    assert User.__table__.metadata is Base.metadata and Post.__table__.metadata is Base.metadata


def test_get_engine_and_independent_sessions(app: Flask) -> None:
    with app.app_context():
        assert db.get_engine() is app.extensions["myapp.database"].engine
        first, second = db.get_session(), db.get_session()
        try:
            assert isinstance(first, Session) and first is not second
            assert first is not db.session() and second is not db.session()
            assert first.autoflush is False
        finally:
            first.close()
            second.close()


def test_engine_options(app: Flask, backend: Backend) -> None:
    engine = app.extensions["myapp.database"].engine
    assert engine.hide_parameters is True
    assert engine.pool.size() == app.config["DATABASE_POOL_SIZE"]
    assert engine.pool.timeout() == app.config["DATABASE_POOL_TIMEOUT"]


def test_pool_settings_come_from_config(backend: Backend) -> None:
    """Size, overflow, timeout and recycle, each shown by what the pool does with them."""
    app = make_app(
        backend.url,
        DATABASE_POOL_SIZE=2,
        DATABASE_MAX_OVERFLOW=1,
        DATABASE_POOL_TIMEOUT=0.2,
        DATABASE_POOL_RECYCLE=1,
    )
    engine = app.extensions["myapp.database"].engine
    try:
        assert (engine.pool.size(), engine.pool.timeout()) == (2, 0.2)
        with ExitStack() as held:
            # Two pooled connections and one overflow: the most the pool may open.
            opened = [held.enter_context(engine.connect()).connection.dbapi_connection for _ in range(3)]
            started = time.monotonic()
            with pytest.raises(PoolTimeoutError):
                engine.connect()
            waited = time.monotonic() - started
        assert 0.2 <= waited < 2, waited
        time.sleep(1.2)  # past pool_recycle: a pooled connection is replaced, not reused
        with engine.connect() as connection:
            assert all(connection.connection.dbapi_connection is not old for old in opened)
    finally:
        engine.dispose()


def test_backend_specific_connection_setup(app: Flask, backend: Backend) -> None:
    with app.app_context():
        if backend.name == "sqlite":
            assert db.session.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert db.session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        elif backend.name == "postgresql":
            name = db.session.execute(text("SHOW application_name")).scalar()
            assert name == f"myapp-test:{os.getpid()}"
        else:
            charset = db.session.execute(text("SELECT @@character_set_connection")).scalar()
            assert charset == "utf8mb4"
            wait_timeout = db.session.execute(text("SELECT @@wait_timeout")).scalar()
            assert app.config["DATABASE_POOL_RECYCLE"] < int(wait_timeout)


def test_connect_timeout_is_always_set(backend: Backend) -> None:
    """What the driver is asked to connect with, as a ``do_connect`` listener receives it
    (after the app's own, which names the connection), for the pool and for the probe."""
    app = make_app(backend.url, DATABASE_CONNECT_TIMEOUT=7, DATABASE_PING_TIMEOUT=3, SQLITE_BUSY_TIMEOUT=4.5)
    state = app.extensions["myapp.database"]
    seen: dict[str, dict[str, Any]] = {}

    def capture(name: str) -> Any:
        def listener(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
            seen[name] = dict(cparams)

        return listener

    event.listen(state.engine, "do_connect", capture("pool"))
    event.listen(state.probe_engine, "do_connect", capture("probe"))
    try:
        with state.engine.connect():
            pass
        with app.app_context():
            db.ping()
    finally:
        state.engine.dispose()
        state.probe_engine.dispose()

    if backend.is_sqlite:
        assert seen["pool"]["timeout"] == seen["probe"]["timeout"] == 4.5
        return
    assert (seen["pool"]["connect_timeout"], seen["probe"]["connect_timeout"]) == (7, 3)
    label = "application_name" if backend.name == "postgresql" else "program_name"
    assert seen["pool"][label] == seen["probe"][label] == f"myapp-test:{os.getpid()}"
    if backend.name == "mysql":
        assert seen["pool"]["charset"] == "utf8mb4"


def _end_behind_the_pools_back(engine: Engine, backend: Backend) -> Any:
    """Pool one connection, then end it as a restart or an administrator would: the
    server ends its session (SQLite has no server: the connection is closed under the
    pool). Return that connection's DBAPI object, still in the pool, now dead."""
    with engine.connect() as connection:
        dead = connection.connection.dbapi_connection
        if backend.name == "postgresql":
            server_id = connection.scalar(text("SELECT pg_backend_pid()"))
        elif backend.name == "mysql":
            server_id = connection.scalar(text("SELECT CONNECTION_ID()"))
    if backend.is_sqlite:
        assert dead is not None
        dead.close()
        return dead
    admin = create_engine(backend.url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            if backend.name == "postgresql":  # waits until the backend is gone
                assert connection.scalar(text("SELECT pg_terminate_backend(:id, 5000)"), {"id": server_id})
                return dead
            connection.execute(text(f"KILL CONNECTION {int(server_id)}"))
            alive = text("SELECT COUNT(*) FROM information_schema.processlist WHERE id = :id")
            deadline = time.monotonic() + 5
            while connection.scalar(alive, {"id": server_id}):
                assert time.monotonic() < deadline, "the killed connection is still there after 5 s"
                time.sleep(0.05)
    finally:
        admin.dispose()
    return dead


def test_a_dead_pooled_connection_is_replaced_before_a_query_sees_it(backend: Backend) -> None:
    """pool_pre_ping, by its effect: the next checkout finds the pooled connection dead
    and opens another, and the query never sees the dead one."""
    app = make_app(backend.url)
    engine = app.extensions["myapp.database"].engine
    try:
        dead = _end_behind_the_pools_back(engine, backend)
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT 1")) == 1
            assert connection.connection.dbapi_connection is not dead
        assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()


def test_negative_control_without_pre_ping_the_dead_connection_reaches_the_query(backend: Backend) -> None:
    """The harness can fail: the same dead connection, in a pool that does not ping, is
    handed out and the query fails."""
    engine = create_engine(backend.url, pool_pre_ping=False)
    try:
        _end_behind_the_pools_back(engine, backend)
        with pytest.raises(DBAPIError):
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
    finally:
        engine.dispose()


def test_sqlite_write_transactions_take_the_lock_up_front(tmp_path) -> None:
    """BEGIN IMMEDIATE: two read-then-write transactions wait for each other instead of
    one failing at once with 'database is locked'."""
    app = make_app(f"sqlite:///{tmp_path / 'lock.sqlite'}", SQLITE_BUSY_TIMEOUT=10)
    with app.app_context():
        Base.metadata.create_all(db.get_engine())
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def read_then_write(n: int) -> None:
        try:
            with app.app_context():
                barrier.wait()
                db.session.scalar(select(func.count()).select_from(User))
                db.session.add(User(username=f"user{n}", password_hash="x"))
                db.session.commit()
        except BaseException as error:  # collected for the assertion below
            errors.append(error)

    threads = [threading.Thread(target=read_then_write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert _count_users(app) == 4
    app.extensions["myapp.database"].engine.dispose()


def test_bound_parameters_are_hidden_from_errors(app: Flask) -> None:
    secret_hash = generate_password_hash("hunter2-secret")
    with app.app_context():
        db.session.add(User(username="dup", password_hash=secret_hash))
        db.session.flush()
        db.session.add(User(username="dup", password_hash=secret_hash))
        with pytest.raises(IntegrityError) as caught:
            db.session.flush()
        db.session.rollback()
    assert secret_hash not in str(caught.value)
    assert "hidden due to hide_parameters" in str(caught.value)


def test_url_password_is_masked() -> None:
    assert mask_url("postgresql+psycopg://me:s3cret@db/x") == "postgresql+psycopg://me:***@db/x"
    assert "s3cret" not in repr(make_app("sqlite://").extensions["myapp.database"].engine.url)


# -- the registry ---------------------------------------------------------------------


def test_session_outside_app_context_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match=r"app_context\(\)"):
        db.session.execute(text("SELECT 1"))


def test_same_context_same_session_new_context_new_session(app: Flask) -> None:
    with app.app_context():
        first = db.session()
        assert db.session() is first
        with app.app_context():
            assert db.session() is not first
        assert db.session() is first


def test_two_apps_never_share_engine_or_session(backend: Backend) -> None:
    one, two = make_app(backend.url), make_app(backend.url)
    assert one.extensions["myapp.database"].engine is not two.extensions["myapp.database"].engine
    with one.app_context():
        session_one = db.session()
        with two.app_context():
            session_two = db.session()
            assert session_two is not session_one
            assert session_two.get_bind() is two.extensions["myapp.database"].engine
        assert session_one.get_bind() is one.extensions["myapp.database"].engine
    for app in (one, two):
        app.extensions["myapp.database"].engine.dispose()


def test_init_app_twice_is_refused(backend: Backend) -> None:
    app = make_app(backend.url)
    with pytest.raises(RuntimeError, match="once per app"):
        db.init_app(app)


@pytest.mark.real_commits
def test_session_removed_and_connection_returned_after_each_request(app: Flask, client) -> None:
    engine = app.extensions["myapp.database"].engine
    sessions = []

    @app.get("/_test/peek")
    def peek() -> str:
        db.session.scalar(select(func.count()).select_from(User))
        sessions.append(db.session())
        assert engine.pool.checkedout() == 1
        return "ok"

    for _ in range(3):
        assert client.get("/_test/peek").status_code == 200
        assert engine.pool.checkedout() == 0
    assert len({id(s) for s in sessions}) == 3


@pytest.mark.real_commits
def test_view_that_raised_leaves_nothing_behind(app: Flask, client) -> None:
    app.config["PROPAGATE_EXCEPTIONS"] = False
    _add_user_route(app)
    engine = app.extensions["myapp.database"].engine
    response = client.post("/_test/write-then-fail")
    assert response.status_code == 500
    assert b"Something went wrong" in response.data and b"Traceback" not in response.data
    assert engine.pool.checkedout() == 0
    assert _count_users(app) == 0


@pytest.mark.real_commits
def test_nothing_left_in_transaction_on_the_server(app: Flask, client, backend: Backend) -> None:
    app.config["PROPAGATE_EXCEPTIONS"] = False
    _add_user_route(app)
    for _ in range(5):
        client.post("/_test/write-then-fail")
    if backend.name == "postgresql":
        with app.extensions["myapp.database"].engine.connect() as connection:
            idle = connection.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state LIKE 'idle in transaction%'"
                )
            )
        assert idle == 0
    assert _count_users(app) == 0


@pytest.mark.real_commits
def test_nested_context_in_a_view_keeps_the_outer_session(app: Flask, client) -> None:
    @app.post("/_test/nested")
    def nested() -> str:
        db.session.add(User(username="outer", password_hash="x"))
        with app.app_context():
            db.session.scalar(select(func.count()).select_from(User))
        db.session.commit()  # the outer session still has its pending user
        return "ok"

    assert client.post("/_test/nested").status_code == 200
    assert _count_users(app) == 1


@pytest.mark.real_commits
def test_nested_context_in_a_cli_command_keeps_the_outer_session(app: Flask, runner) -> None:
    import click

    @app.cli.command("nested-write")
    def nested_write() -> None:
        db.session.add(User(username="outer", password_hash="x"))
        with app.app_context():
            db.session.scalar(select(func.count()).select_from(User))
        db.session.commit()
        click.echo("done")

    result = runner.invoke(args=["nested-write"])
    assert result.exit_code == 0, result.output
    assert _count_users(app) == 1
    assert app.extensions["myapp.database"].engine.pool.checkedout() == 0


def _register(app: Flask, username: str) -> None:
    """Register through the view, which commits its own unit of work."""
    response = app.test_client().post("/auth/register", data={"username": username, "password": "correct horse"})
    assert response.status_code == 302, response.get_data(as_text=True)


def test_isolation_keeps_what_a_test_commits_out_of_the_database(backend: Backend) -> None:
    """Inside ``db.test_isolation`` a view's commit is seen by the rest of the test; once
    the isolation ends, neither a new isolation nor a connection of its own sees it."""
    app = make_app(backend.url)
    engine = app.extensions["myapp.database"].engine
    name = f"isolated-{secrets.token_hex(4)}"
    count = select(func.count()).select_from(User).where(User.username == name)
    try:
        with db.test_isolation(app):
            _register(app, name)
            with app.app_context():
                assert db.session.scalar(count) == 1
        with db.test_isolation(app):
            with app.app_context():
                assert db.session.scalar(count) == 0
        assert _users_named(engine, name) == 0
        assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()


def test_negative_control_without_isolation_the_commit_reaches_the_database(backend: Backend) -> None:
    """The check above can fail: the same registration without isolation is committed,
    and the same count finds it."""
    app = make_app(backend.url)
    engine = app.extensions["myapp.database"].engine
    name = f"committed-{secrets.token_hex(4)}"
    try:
        _register(app, name)
        assert _users_named(engine, name) == 1
    finally:
        with engine.begin() as connection:
            connection.execute(delete(User).where(User.username == name))
        engine.dispose()


def test_describe_error_is_one_line_without_sql(app: Flask) -> None:
    with app.app_context():
        with pytest.raises(Exception) as caught:
            db.session.execute(text("SELECT * FROM no_such_table WHERE secret = :p"), {"p": "pw"})
        db.session.rollback()
    line = describe_error(caught.value)
    assert "\n" not in line and "pw" not in line and "no_such_table" in line


@pytest.mark.real_commits
def test_negative_control_thread_local_registry_loses_the_outer_write(
    app: Flask, client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The harness can fail: keyed on the thread, the inner teardown discards the write."""
    thread_keyed = ScopedRegistry(db.session.registry.createfunc, threading.get_ident)
    monkeypatch.setattr(db.session, "registry", thread_keyed)
    # The teardown finds the context's session through the registry alone, as such a design would.
    monkeypatch.setattr(db, "_current_session", lambda: db.session() if thread_keyed.has() else None)

    @app.post("/_test/nested")
    def nested() -> str:
        db.session.add(User(username="outer", password_hash="x"))
        with app.app_context():
            db.session.scalar(select(func.count()).select_from(User))
        db.session.commit()
        return "ok"

    # The inner teardown removed the shared session: the write is lost, and the
    # lost-write check says so.
    with pytest.raises(LostWriteError, match="new User"):
        client.post("/_test/nested")
    assert _count_users(app) == 0
