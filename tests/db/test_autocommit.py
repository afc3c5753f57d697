"""Read-only routing never splits a unit of work (PostgreSQL's autocommit fast path).

A GET request reads in autocommit; from the moment its unit of work needs a transaction
(``db.transaction()``, ``session.begin()``, ``session.connection()`` with options, a
write, a row lock) every statement runs in one transaction on the one connection the
request holds. Each test asks the server what happened; each negative control shows
the same check catching a split unit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import Engine, event, func, insert, select, text, update
from sqlalchemy.exc import DBAPIError

from myapp.db import LostWriteError, db
from myapp.db.statements import needs_transaction, writes
from myapp.models import Post, User
from tests.support.apps import make_app
from tests.support.databases import Backend

postgres_only = pytest.mark.backends("postgresql")


@pytest.fixture
def pg_app(backend: Backend) -> Iterator[Flask]:
    """An app with the fast path on, outside test isolation (which turns it off)."""
    app = make_app(backend.url)
    app.config["PROPAGATE_EXCEPTIONS"] = True
    yield app
    engine = _engine(app)
    with engine.begin() as connection:
        connection.execute(Post.__table__.delete())
        connection.execute(User.__table__.delete())
    assert engine.pool.checkedout() == 0
    engine.dispose()


def _engine(app: Flask) -> Engine:
    return app.extensions["myapp.database"].engine  # type: ignore[no-any-return]


def _other_connection(app: Flask) -> Any:
    """A connection outside the app's pool, to look at the app's from the server."""
    return app.extensions["myapp.database"].probe_engine.connect()


def _server_state(app: Flask, pid: int) -> str:
    with _other_connection(app) as connection:
        return str(connection.scalar(text("SELECT state FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}))


def _seed_post(app: Flask) -> int:
    with _engine(app).begin() as connection:
        author = connection.execute(insert(User).values(username="author", password_hash="x").returning(User.id))
        post = connection.execute(
            insert(Post).values(author_id=author.scalar_one(), title="t", body="b", version=1).returning(Post.id)
        )
        return int(post.scalar_one())


def _max_checked_out(app: Flask) -> dict[str, int]:
    """Record the most connections the app's pool had out at once."""
    pool = _engine(app).pool
    seen = {"max": 0}

    @event.listens_for(pool, "checkout")
    def _out(*args: Any) -> None:
        seen["max"] = max(seen["max"], pool.checkedout())  # type: ignore[attr-defined]

    return seen


# -- one unit, one transaction -----------------------------------------------------------


@postgres_only
def test_reads_inside_db_transaction_are_in_the_transaction_that_writes(pg_app: Flask) -> None:
    post_id = _seed_post(pg_app)
    seen: dict[str, Any] = {}

    @pg_app.get("/_test/read-then-modify")
    def read_then_modify() -> str:
        db.session.scalar(select(func.count()).select_from(User))  # a plain read before: autocommit
        seen["pid"] = db.session.scalar(text("SELECT pg_backend_pid()"))
        seen["before"] = _server_state(pg_app, seen["pid"])
        with db.transaction():
            seen["xid_read"] = db.session.scalar(select(func.pg_current_xact_id()))
            post = db.session.get(Post, post_id)
            seen["inside"] = _server_state(pg_app, seen["pid"])
            assert post is not None
            post.title = "modified"
            db.session.flush()
            seen["xid_write"] = db.session.scalar(text("SELECT pg_current_xact_id()"))
            seen["pid_write"] = db.session.scalar(text("SELECT pg_backend_pid()"))
        return "ok"

    checked_out = _max_checked_out(pg_app)
    assert pg_app.test_client().get("/_test/read-then-modify").text == "ok"
    assert seen["before"] == "idle"  # the fast path is on before the unit starts
    assert seen["inside"] == "idle in transaction"  # the read opened the unit's transaction
    assert seen["xid_read"] == seen["xid_write"]
    assert seen["pid_write"] == seen["pid"]
    assert checked_out["max"] == 1


@postgres_only
def test_negative_control_an_autocommit_read_is_outside_the_transaction(pg_app: Flask) -> None:
    """The same checks catch a split unit: a read on an autocommit connection gets a
    transaction id of its own and leaves its connection idle."""
    with _engine(pg_app).connect().execution_options(isolation_level="AUTOCOMMIT") as reader, \
            _engine(pg_app).begin() as writer:
        xid_read = reader.scalar(text("SELECT pg_current_xact_id()"))
        xid_write = writer.scalar(text("SELECT pg_current_xact_id()"))
        pid = reader.scalar(text("SELECT pg_backend_pid()"))
        assert xid_read != xid_write
        assert _server_state(pg_app, pid) == "idle"


@postgres_only
def test_repeatable_read_unit_in_a_get_detects_the_concurrent_update(pg_app: Flask) -> None:
    """Read-modify-write under REPEATABLE READ: another transaction's update between the
    read and the write must make the write fail (40001), not be overwritten."""
    post_id = _seed_post(pg_app)
    read_done, other_committed = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def concurrent_writer() -> None:
        read_done.wait(10)
        with _engine(pg_app).begin() as connection:
            connection.execute(update(Post).where(Post.id == post_id).values(version=Post.version + 1))
        other_committed.set()

    @pg_app.get("/_test/increment")
    def increment() -> str:
        try:
            with db.transaction():
                db.session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
                version = db.session.scalar(select(Post.version).where(Post.id == post_id))
                read_done.set()
                other_committed.wait(10)
                db.session.execute(update(Post).where(Post.id == post_id).values(version=version + 1))
        except DBAPIError as error:
            outcome["sqlstate"] = getattr(error.orig, "sqlstate", None)
        return "done"

    thread = threading.Thread(target=concurrent_writer)
    thread.start()
    assert pg_app.test_client().get("/_test/increment").text == "done"
    thread.join(10)
    assert outcome.get("sqlstate") == "40001"  # the conflict was seen, not silently lost
    with _engine(pg_app).connect() as connection:
        assert connection.scalar(select(Post.version).where(Post.id == post_id)) == 2


@postgres_only
def test_select_for_update_holds_its_lock_until_the_unit_ends(pg_app: Flask) -> None:
    post_id = _seed_post(pg_app)
    seen: dict[str, Any] = {}

    def locked_by_someone() -> bool:
        with _other_connection(pg_app) as connection, connection.begin():
            return connection.scalar(
                select(Post.id).where(Post.id == post_id).with_for_update(skip_locked=True)
            ) is None

    @pg_app.get("/_test/lock")
    def lock() -> str:
        db.session.scalar(select(Post.title).where(Post.id == post_id))  # an autocommit read first
        db.session.scalar(select(Post).where(Post.id == post_id).with_for_update())
        seen["locked_in_request"] = locked_by_someone()
        return "ok"

    assert pg_app.test_client().get("/_test/lock").text == "ok"
    assert seen["locked_in_request"] is True
    assert locked_by_someone() is False  # released at teardown


@postgres_only
def test_negative_control_a_lock_taken_in_autocommit_is_gone_at_once(pg_app: Flask) -> None:
    post_id = _seed_post(pg_app)
    with _engine(pg_app).connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.scalar(select(Post.id).where(Post.id == post_id).with_for_update())
        with _other_connection(pg_app) as other, other.begin():
            assert other.scalar(select(Post.id).where(Post.id == post_id).with_for_update(skip_locked=True)) == post_id


@postgres_only
def test_side_effecting_select_in_a_unit_runs_in_its_transaction(pg_app: Flask) -> None:
    """``pg_advisory_xact_lock`` is a SELECT; in autocommit its lock would end with it."""
    seen: dict[str, Any] = {}

    def lock_free() -> bool:
        with _other_connection(pg_app) as connection, connection.begin():
            return bool(connection.scalar(text("SELECT pg_try_advisory_xact_lock(4242)")))

    @pg_app.get("/_test/advisory")
    def advisory() -> str:
        with db.transaction():
            db.session.execute(select(func.pg_advisory_xact_lock(4242)))
            seen["free_inside"] = lock_free()
        seen["free_after"] = lock_free()
        return "ok"

    assert pg_app.test_client().get("/_test/advisory").text == "ok"
    assert seen == {"free_inside": False, "free_after": True}


@postgres_only
def test_explicit_begin_keeps_the_unit_in_one_transaction(pg_app: Flask) -> None:
    seen: dict[str, Any] = {}

    @pg_app.get("/_test/begin")
    def begin() -> str:
        with db.session.begin():
            seen["first"] = db.session.scalar(select(func.pg_current_xact_id()))
            seen["second"] = db.session.scalar(select(func.pg_current_xact_id()))
        return "ok"

    assert pg_app.test_client().get("/_test/begin").text == "ok"
    assert seen["first"] == seen["second"]


@postgres_only
def test_connection_with_options_starts_the_transaction_it_configures(pg_app: Flask) -> None:
    seen: dict[str, Any] = {}

    @pg_app.get("/_test/isolation")
    def isolation() -> str:
        db.session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
        seen["level"] = db.session.scalar(select(func.current_setting("transaction_isolation")))
        seen["xids"] = {db.session.scalar(select(func.pg_current_xact_id())) for _ in range(2)}
        db.session.rollback()
        return "ok"

    assert pg_app.test_client().get("/_test/isolation").text == "ok"
    assert seen["level"] == "serializable"
    assert len(seen["xids"]) == 1


@postgres_only
def test_a_get_that_reads_writes_and_reads_holds_one_connection(pg_app: Flask) -> None:
    @pg_app.get("/_test/mixed")
    def mixed() -> str:
        db.session.scalar(select(func.count()).select_from(User))
        with db.transaction():
            db.session.add(User(username="mixed", password_hash="x"))
        return str(db.session.scalar(select(func.count()).select_from(User)))

    checked_out = _max_checked_out(pg_app)
    assert pg_app.test_client().get("/_test/mixed").text == "1"
    assert checked_out["max"] == 1


@postgres_only
def test_negative_control_a_second_session_is_counted(pg_app: Flask) -> None:
    @pg_app.get("/_test/two")
    def two() -> str:
        db.session.scalar(select(func.count()).select_from(User))
        with db.get_session() as other:
            other.scalar(select(func.count()).select_from(User))
        return "ok"

    checked_out = _max_checked_out(pg_app)
    assert pg_app.test_client().get("/_test/two").text == "ok"
    assert checked_out["max"] == 2


@postgres_only
def test_pooled_connections_leave_autocommit_behind(pg_app: Flask) -> None:
    """A connection that read in autocommit goes back to the pool transactional: the next
    POST's writes are one transaction, rolled back together."""
    _engine(pg_app).pool.dispose()

    @pg_app.route("/_test/status", methods=["GET", "POST"])
    def status() -> str:
        db.session.scalar(select(func.count()).select_from(User))
        return str(db.session.connection().connection.dbapi_connection.autocommit)  # type: ignore[union-attr]

    client = pg_app.test_client()
    assert client.get("/_test/status").text == "True"
    assert client.post("/_test/status").text == "False"


# -- writes that bypass the ORM count as writes ------------------------------------------


@postgres_only
@pytest.mark.parametrize("how", ["text", "core", "connection"])
def test_writes_through_text_and_core_are_lost_writes_if_not_committed(pg_app: Flask, how: str) -> None:
    statements = {
        "text": lambda: db.session.execute(
            text("INSERT INTO \"user\" (username, password_hash, created_at) VALUES ('t', 'x', now())")
        ),
        "core": lambda: db.session.execute(insert(User).values(username="t", password_hash="x")),
        "connection": lambda: db.session.connection().execute(
            insert(User.__table__).values(username="t", password_hash="x", created_at=func.now())
        ),
    }

    @pg_app.get("/_test/forget")
    def forget() -> str:
        statements[how]()
        return "forgot to commit"

    with pytest.raises(LostWriteError, match="INSERT statement"):
        pg_app.test_client().get("/_test/forget")
    with _engine(pg_app).connect() as connection:  # run in a transaction, rolled back
        assert connection.scalar(select(func.count()).select_from(User)) == 0


@postgres_only
def test_negative_control_a_textual_read_is_no_write(pg_app: Flask) -> None:
    @pg_app.get("/_test/read")
    def read() -> str:
        return str(db.session.scalar(text("SELECT count(*) FROM \"user\"")))

    assert pg_app.test_client().get("/_test/read").text == "0"


@pytest.mark.parametrize(
    ("statement", "locks_or_writes", "is_write"),
    [
        ("SELECT 1", False, False),
        ("  (SELECT 1)", False, False),
        ("select * from post for update", True, False),
        ("SELECT * FROM post FOR NO KEY UPDATE", True, False),
        ("SELECT * FROM post FOR SHARE SKIP LOCKED", True, False),
        ("SHOW transaction_isolation", False, False),
        ("WITH x AS (SELECT 1) SELECT * FROM x", False, False),
        ("WITH gone AS (DELETE FROM post RETURNING id) SELECT count(*) FROM gone", True, True),
        ("insert into post values (1)", True, True),
        ("UPDATE post SET title = 'x'", True, True),
        ("TRUNCATE post", True, True),
        ("SAVEPOINT sa_savepoint_1", True, False),
        ("SET LOCAL statement_timeout = 100", True, False),
    ],
)
def test_statement_classification(statement: str, locks_or_writes: bool, is_write: bool) -> None:
    assert needs_transaction(statement) is locks_or_writes
    assert writes(statement) is is_write
