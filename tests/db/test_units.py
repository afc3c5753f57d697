"""Units of work: lost-write detection, db.transaction(), commit before the response,
after-commit hooks, retries, sessions outside requests, the query log, shutdown."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import click
import pytest
from flask import Flask
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from myapp.db import LostWriteError, db
from myapp.db.engines import dispose_all_engines
from myapp.models import User
from myapp.security import SECURITY_HEADERS
from tests.support.apps import make_app
from tests.support.databases import Backend
from tests.support.metrics import Delta

ROOT = Path(__file__).resolve().parents[2]


def usernames(app: Flask) -> list[str]:
    """Committed usernames, read through a connection of its own."""
    with app.extensions["myapp.database"].engine.connect() as connection:
        return list(connection.scalars(select(User.username).order_by(User.username)))


def add_user(name: str) -> User:
    user = User(username=name, password_hash="x")
    db.session.add(user)
    return user


# -- 1. lost-write detection ----------------------------------------------------------


def test_forgotten_commit_raises_in_testing(app: Flask, client) -> None:
    @app.post("/_test/forgets")
    def forgets() -> str:
        add_user("forgotten")
        return "ok"

    with pytest.raises(LostWriteError, match=r"request POST forgets .*new User"):
        client.post("/_test/forgets")


def test_forgotten_flushed_write_is_logged_in_production(
    app: Flask, client, caplog: pytest.LogCaptureFixture
) -> None:
    app.testing = False

    @app.post("/_test/flushes")
    def flushes() -> str:
        add_user("flushed")
        db.session.flush()
        return "ok"

    with caplog.at_level(logging.WARNING, logger="myapp.db"):
        assert client.post("/_test/flushes").status_code == 200
    assert "request POST flushes ended with uncommitted changes (flushed new User)" in caplog.text
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(User)) == 0


def test_reads_and_committed_writes_never_warn(app: Flask, client, auth, caplog: pytest.LogCaptureFixture) -> None:
    auth.register_and_login()
    with caplog.at_level(logging.WARNING, logger="myapp.db"):
        assert client.get("/").status_code == 200
        assert client.post("/posts/new", data={"title": "t", "body": "b"}).status_code == 302
        assert client.get("/users/alice").status_code == 200
    assert "uncommitted" not in caplog.text


def test_view_that_raised_is_rolled_back_without_a_lost_write_error(app: Flask, client) -> None:
    app.config["PROPAGATE_EXCEPTIONS"] = False

    @app.post("/_test/fails")
    def fails() -> str:
        add_user("doomed")
        db.session.flush()
        raise RuntimeError("boom")

    assert client.post("/_test/fails").status_code == 500


# -- 2. db.transaction() --------------------------------------------------------------


@pytest.mark.real_commits
def test_transaction_commits_on_success_and_rolls_back_on_error(app: Flask) -> None:
    with app.app_context():
        with db.transaction():
            add_user("kept")
        with pytest.raises(RuntimeError):
            with db.transaction():
                add_user("dropped")
                db.session.flush()
                raise RuntimeError("abort the unit")
    assert usernames(app) == ["kept"]


@pytest.mark.real_commits
def test_nested_transaction_is_a_savepoint(app: Flask) -> None:
    with app.app_context():
        with db.transaction():
            add_user("outer")
            try:
                with db.transaction():
                    add_user("outer")  # duplicate: fails inside the savepoint only
            except IntegrityError:
                pass
            add_user("second")
    assert usernames(app) == ["outer", "second"]


@pytest.mark.real_commits
def test_transaction_as_a_decorator(app: Flask) -> None:
    @db.transaction()
    def register(name: str) -> None:
        add_user(name)

    with app.app_context():
        register("decorated")
        register("twice")
    assert usernames(app) == ["decorated", "twice"]


# -- 3. commit before the response ----------------------------------------------------


@pytest.fixture
def commit_app(backend: Backend) -> Any:
    app = make_app(backend.url, DATABASE_COMMIT_ON_SUCCESS=True, PROPAGATE_EXCEPTIONS=False)

    @app.post("/_test/status/<int:code>")
    def answer(code: int) -> Any:
        add_user(f"status{code}")
        return "done", code

    @app.post("/_test/duplicate")
    def duplicate() -> str:
        add_user("taken")
        return "this success must not reach the client"

    yield app
    engine = app.extensions["myapp.database"].engine
    with engine.begin() as connection:
        connection.execute(User.__table__.delete())
    engine.dispose()


@pytest.mark.parametrize(("code", "kept"), [(200, True), (201, True), (302, True), (400, False), (404, False), (500, False)])
def test_commit_on_success_policy(commit_app: Flask, code: int, kept: bool) -> None:
    response = commit_app.test_client().post(f"/_test/status/{code}")
    assert response.status_code == code
    assert (f"status{code}" in usernames(commit_app)) is kept


def test_failed_commit_becomes_an_error_page(commit_app: Flask) -> None:
    with commit_app.app_context():
        with db.transaction():
            add_user("taken")
    response = commit_app.test_client().post("/_test/duplicate")
    assert response.status_code == 500
    assert b"this success must not reach the client" not in response.data
    assert b"Something went wrong" in response.data
    assert usernames(commit_app) == ["taken"]
    # The replacement page is a response like any other: it carries the security headers.
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value


def test_policy_off_by_default(app: Flask, client) -> None:
    assert app.config["DATABASE_COMMIT_ON_SUCCESS"] is False

    @app.post("/_test/no-policy")
    def no_policy() -> str:
        add_user("uncommitted")
        return "ok"

    with pytest.raises(LostWriteError):
        client.post("/_test/no-policy")


# -- 4. after-commit hooks ------------------------------------------------------------


def test_on_commit_runs_only_after_the_commit(app: Flask) -> None:
    calls: list[str] = []
    with app.app_context():
        with db.transaction():
            add_user("hooked")
            db.on_commit(lambda: calls.append("mail"))
            assert calls == []
        assert calls == ["mail"]


def test_on_commit_dropped_on_rollback(app: Flask) -> None:
    calls: list[str] = []
    with app.app_context():
        with pytest.raises(RuntimeError):
            with db.transaction():
                add_user("hooked")
                db.on_commit(lambda: calls.append("mail"))
                raise RuntimeError("roll back")
        with db.transaction():
            add_user("later")  # a later commit must not run the dropped hook
    assert calls == []


def test_on_commit_dropped_when_its_savepoint_rolls_back(app: Flask) -> None:
    calls: list[str] = []
    with app.app_context():
        with db.transaction():
            add_user("outer")
            db.on_commit(lambda: calls.append("outer"))
            with pytest.raises(RuntimeError):
                with db.transaction():
                    db.on_commit(lambda: calls.append("inner"))
                    raise RuntimeError("roll back the savepoint")
    assert calls == ["outer"]


def test_on_commit_not_run_when_the_commit_fails(app: Flask) -> None:
    calls: list[str] = []
    with app.app_context():
        with db.transaction():
            add_user("dup")
        with pytest.raises(IntegrityError):
            with db.transaction():
                add_user("dup")
                db.on_commit(lambda: calls.append("mail"))
    assert calls == []


def test_on_commit_runs_at_once_without_a_transaction(app: Flask) -> None:
    calls: list[str] = []
    with app.app_context():
        db.on_commit(lambda: calls.append("now"))
        assert calls == ["now"]


# -- 5. retries -----------------------------------------------------------------------


def _concurrent(app: Flask, unit: Any, count: int = 2, scope: Any = db.session_scope) -> list[BaseException]:
    """Run ``unit`` in ``count`` threads at once, each in ``scope(app)``; return the errors."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with scope(app):
                unit()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


def _conflicting_update(app: Flask, backend: Backend, attempts: int) -> tuple[list[BaseException], list[int], str]:
    """Two transactions read one row, meet, then both update it: PostgreSQL (REPEATABLE
    READ) fails one with a serialization failure, MariaDB (shared locks) with a deadlock."""
    with db.session_scope(app):
        add_user("counter")
    barrier = threading.Barrier(2, timeout=30)
    runs: list[int] = []

    @db.retrying(attempts=attempts, backoff=0.01)
    def append_x() -> None:
        runs.append(1)
        with db.transaction() as session:
            if backend.name == "postgresql":
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
                user = session.scalars(select(User).where(User.username == "counter")).one()
            else:
                user = session.scalars(
                    select(User).where(User.username == "counter").with_for_update(read=True)
                ).one()
            if len(runs) <= 2:
                barrier.wait()
            user.password_hash += "x"

    errors = _concurrent(app, append_x, scope=Flask.app_context)
    with db.session_scope(app) as session:
        final = session.scalars(select(User.password_hash).where(User.username == "counter")).one()
    return errors, runs, final


@pytest.mark.real_commits
@pytest.mark.backends("postgresql", "mysql")
def test_retry_recovers_from_a_real_conflict(app: Flask, backend: Backend) -> None:
    delta = Delta()
    errors, runs, final = _conflicting_update(app, backend, attempts=3)
    assert errors == []
    assert len(runs) == 3  # one of the two units ran twice
    assert final == "xxx"  # both updates applied, none lost
    # PostgreSQL's REPEATABLE READ fails the second update as a serialization failure;
    # MariaDB finds a deadlock between the two shared locks.
    reason = "serialization" if backend.name == "postgresql" else "deadlock"
    assert delta("myapp_db_retries_total", reason=reason) == 1
    assert delta("myapp_db_units_given_up_total") == 0


@pytest.mark.real_commits
@pytest.mark.backends("postgresql", "mysql")
def test_negative_control_without_retry_the_conflict_fails(app: Flask, backend: Backend) -> None:
    delta = Delta()
    errors, runs, final = _conflicting_update(app, backend, attempts=1)
    assert len(errors) == 1 and isinstance(errors[0], OperationalError)
    assert final == "xx"
    assert delta("myapp_db_units_given_up_total") == 1


@pytest.mark.real_commits
@pytest.mark.backends("sqlite")
def test_retry_recovers_from_sqlite_busy(app: Flask, backend: Backend) -> None:
    """(The `app` fixture is here to empty the tables afterwards.)"""
    app = make_app(backend.url, SQLITE_BUSY_TIMEOUT=0.2)
    locked, attempted = threading.Event(), threading.Event()
    runs: list[int] = []

    def hold_the_write_lock() -> None:
        with app.extensions["myapp.database"].engine.connect() as connection:
            connection.execute(text("SELECT 1"))  # outside a request: BEGIN IMMEDIATE
            locked.set()
            attempted.wait(timeout=10)
            threading.Event().wait(0.4)  # longer than the busy timeout
            connection.rollback()

    @db.retrying(attempts=4, backoff=0.3)
    def write() -> None:
        runs.append(1)
        attempted.set()
        with db.transaction():
            add_user("patient")

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    assert locked.wait(timeout=10)
    try:
        with app.app_context():
            write()
    finally:
        holder.join()
    assert len(runs) >= 2
    assert usernames(app) == ["patient"]
    app.extensions["myapp.database"].engine.dispose()


def test_retry_refuses_to_discard_earlier_writes(app: Flask) -> None:
    @db.retrying()
    def unit() -> None:
        pass

    with app.app_context():
        add_user("earlier")
        with pytest.raises(RuntimeError, match="uncommitted writes"):
            unit()
        db.session.rollback()


def test_retry_refuses_to_run_inside_a_transaction(app: Flask) -> None:
    @db.retrying()
    def unit() -> None:
        pass

    with app.app_context():
        with pytest.raises(RuntimeError, match="inside an open db.transaction"):
            with db.transaction():
                unit()


def test_retry_does_not_retry_other_errors(app: Flask) -> None:
    runs: list[int] = []

    @db.retrying(attempts=3)
    def duplicate() -> None:
        runs.append(1)
        with db.transaction():
            add_user("once")
            add_user("once")

    with app.app_context():
        with pytest.raises(IntegrityError):
            duplicate()
    assert runs == [1]


# -- 6. sessions outside requests -----------------------------------------------------


@pytest.mark.real_commits
def test_session_scope_in_a_thread_commits_and_cleans_up(app: Flask) -> None:
    engine = app.extensions["myapp.database"].engine
    # Not the thread ident for a name: a finished thread's ident is reused at once.
    names = iter(["thread-a", "thread-b", "thread-c"])
    errors = _concurrent(app, lambda: add_user(next(names)), count=3)
    assert errors == []
    assert len(usernames(app)) == 3
    assert engine.pool.checkedout() == 0


@pytest.mark.real_commits
def test_session_scope_rolls_back_on_error(app: Flask) -> None:
    with pytest.raises(RuntimeError):
        with db.session_scope(app):
            add_user("never")
            raise RuntimeError("abort")
    assert usernames(app) == []


@pytest.mark.real_commits
def test_thread_started_from_a_view_gets_its_own_session(app: Flask, client) -> None:
    seen: dict[str, Any] = {}

    @app.post("/_test/background")
    def background() -> str:
        seen["view"] = db.session()
        real_app = app

        def work() -> None:
            with db.session_scope(real_app) as session:
                seen["thread"] = session
                add_user("from-thread")

        worker = threading.Thread(target=work)
        worker.start()
        worker.join(timeout=30)
        return "ok"

    assert client.post("/_test/background").status_code == 200
    assert seen["thread"] is not seen["view"]
    assert usernames(app) == ["from-thread"]


@pytest.mark.real_commits
def test_session_scope_in_a_cli_command(app: Flask, runner) -> None:
    @app.cli.command("add-user")
    @click.argument("name")
    def add_user_command(name: str) -> None:
        with db.session_scope():
            add_user(name)
        click.echo(f"added {name}")

    result = runner.invoke(args=["add-user", "cli-user"])
    assert result.exit_code == 0 and "added cli-user" in result.output
    assert usernames(app) == ["cli-user"]


def test_cli_database_error_is_one_line(app: Flask, runner) -> None:
    from myapp.cli import one_line_errors

    @app.cli.command("broken")
    @one_line_errors
    def broken() -> None:
        with db.session_scope():
            db.session.execute(text("SELECT * FROM no_such_table"))

    result = runner.invoke(args=["broken"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: database error:") and "no_such_table" in lines[0]


def test_session_scope_without_an_app_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match="session_scope"):
        with db.session_scope():
            pass


# -- 8. slow queries and the query budget ---------------------------------------------


def test_slow_query_log_names_statement_and_endpoint_but_not_parameters(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(backend.url, DATABASE_SLOW_QUERY_MS=0.000001)
    with caplog.at_level(logging.WARNING, logger="myapp.sql"):
        app.test_client().get("/users/secret-name-123")
    app.extensions["myapp.database"].engine.dispose()
    assert "slow query" in caplog.text and "posts.user_posts" in caplog.text
    assert "FROM user" in caplog.text.replace('"', "").replace("`", "")
    assert "secret-name-123" not in caplog.text


def test_query_count_header_in_debug(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(backend.url, DATABASE_QUERY_BUDGET=1, DEBUG=True)
    with caplog.at_level(logging.WARNING, logger="myapp.db"):
        response = app.test_client().get("/")
    app.extensions["myapp.database"].engine.dispose()
    assert response.headers["X-Query-Count"] == "1"
    assert "queries (budget" not in caplog.text


def test_query_budget_exceeded_is_logged(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(backend.url, DATABASE_QUERY_BUDGET=1)

    @app.get("/_test/chatty")
    def chatty() -> str:
        for _ in range(3):
            db.session.execute(text("SELECT 1"))
        return "ok"

    with caplog.at_level(logging.WARNING, logger="myapp.db"):
        app.test_client().get("/_test/chatty")
    app.extensions["myapp.database"].engine.dispose()
    assert "GET /_test/chatty sent 3 queries (budget 1)" in caplog.text


# -- 9. clean shutdown ----------------------------------------------------------------


@pytest.mark.real_commits
@pytest.mark.backends("postgresql")
def test_dispose_all_engines_closes_server_connections(app: Flask, backend: Backend) -> None:
    with app.app_context():
        db.session.execute(text("SELECT 1"))
        db.session.rollback()
    name = f"myapp-test:{os.getpid()}"
    admin = make_app(backend.url, DATABASE_APP_NAME="admin")

    def server_sessions() -> int:
        with admin.extensions["myapp.database"].probe_engine.connect() as connection:
            return int(connection.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n"), {"n": name}
            ))

    assert server_sessions() >= 1
    dispose_all_engines()
    assert server_sessions() == 0


def test_engines_are_disposed_at_interpreter_exit(backend: Backend) -> None:
    """A probe registered before the app runs after our atexit hook (LIFO) and reports."""
    script = (
        "import atexit\n"
        "state = {}\n"
        "atexit.register(lambda: print('checked in at exit:', state['engine'].pool.checkedin()))\n"
        "from tests.support.apps import make_app\n"
        "from sqlalchemy import text\n"
        f"app = make_app({backend.url.render_as_string(hide_password=False)!r})\n"
        "state['engine'] = app.extensions['myapp.database'].engine\n"
        "with state['engine'].connect() as c: c.execute(text('SELECT 1'))\n"
        "print('checked in before exit:', state['engine'].pool.checkedin())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert "checked in before exit: 1" in result.stdout
    assert "checked in at exit: 0" in result.stdout


@pytest.mark.backends("postgresql", "mysql")
def test_connections_carry_app_name_and_pid(backend: Backend) -> None:
    app = make_app(backend.url, DATABASE_APP_NAME="labelled")
    engine = app.extensions["myapp.database"].engine
    seen: list[dict[str, Any]] = []
    event.listen(engine, "do_connect", lambda dialect, rec, cargs, cparams: seen.append(dict(cparams)))
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    engine.dispose()
    key = "application_name" if backend.name == "postgresql" else "program_name"
    assert seen and seen[0][key] == f"labelled:{os.getpid()}"


# -- 7. read-only requests pay no transaction round trips -----------------------------


def _transaction_status(session: Any) -> str:
    """psycopg's view of the connection a plain SELECT would use: IDLE or INTRANS."""
    connection = session.connection(bind_arguments={"clause": select(User)})
    return connection.connection.dbapi_connection.info.transaction_status.name


@pytest.mark.real_commits
@pytest.mark.backends("postgresql")
def test_read_only_request_reads_without_a_transaction(app: Flask, client) -> None:
    @app.route("/_test/status", methods=["GET", "POST"])
    def status() -> str:
        db.session.scalar(select(func.count()).select_from(User))
        return _transaction_status(db.session)

    assert client.get("/_test/status").text == "IDLE"  # autocommit: no BEGIN was sent
    assert client.post("/_test/status").text == "INTRANS"  # a POST is one transaction


@pytest.mark.backends("postgresql")
def test_negative_control_setting_off_reads_in_a_transaction(backend: Backend) -> None:
    app = make_app(backend.url, DATABASE_READ_ONLY_AUTOCOMMIT=False)

    @app.get("/_test/status")
    def status() -> str:
        db.session.scalar(select(func.count()).select_from(User))
        return _transaction_status(db.session)

    assert app.test_client().get("/_test/status").text == "INTRANS"
    app.extensions["myapp.database"].engine.dispose()


@pytest.mark.real_commits
def test_a_write_in_a_read_only_request_is_still_transactional(app: Flask, client) -> None:
    app.config["PROPAGATE_EXCEPTIONS"] = False
    seen: dict[str, Any] = {}

    @app.get("/_test/get-that-writes")
    def get_that_writes() -> str:
        db.session.scalar(select(func.count()).select_from(User))
        add_user("first")
        db.session.flush()
        # Read-your-writes: the flushed row is visible to this request's next read.
        seen["count"] = db.session.scalar(select(func.count()).select_from(User))
        add_user("first")  # duplicate: the whole unit must roll back
        db.session.commit()
        return "unreachable"

    assert client.get("/_test/get-that-writes").status_code == 500
    assert seen["count"] == 1
    assert usernames(app) == []


# -- the app itself uses the unit-of-work helper -------------------------------------


def test_views_and_commands_commit_only_through_db_transaction() -> None:
    """Outside the database package, commits go through ``db.transaction()``: a bare
    ``commit()`` in a view or a command is the scattered-commit style this layer replaces."""
    package = ROOT / "myapp"
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted(package.rglob("*.py"))
        if path.parent != package / "db"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if ".commit()" in line
    ]
    assert offenders == []
    # The guard is not vacuous: the views it scans do write through the helper.
    assert "db.transaction()" in (package / "posts.py").read_text()
    assert "db.transaction()" in (package / "cli.py").read_text()
