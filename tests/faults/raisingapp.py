"""A test-only app: myapp plus routes that fail on purpose, for the fault suite.

Nothing here ships: the routes live under ``/_faults`` in a blueprint that only this
module registers. In-process tests add them to the ``app`` fixture's app with
:func:`add_fault_routes`; gunicorn serves :func:`create_raising_app` through
:func:`serve`. Switches for the negative controls (a registry without teardown, SQLite's
deferred ``BEGIN``, one bulkhead share for every server) and the routes' ``split`` option (commit half, then fail) break the
product on purpose, to prove that the assertions would catch the breakage.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, current_app, request
from sqlalchemy import Connection, event, func, select

from myapp import create_app
from myapp.auth import csrf
from myapp.db import db
from myapp.db.breaker import Guards
from myapp.db.engines import READ_ONLY
from myapp.models import Post, User

if TYPE_CHECKING:
    from tests.support.gunicorn import Server

bp = Blueprint("faults", __name__, url_prefix="/_faults")
csrf.exempt(bp)  # the harness posts without forms; only this test-only blueprint

SLOW_WRITE_MAX_SECONDS = 30.0  # a forgotten sleeper still ends

# Connections checked out by /_faults/leak and never returned (the leaking control).
_leaked: list[Connection] = []


class InjectedFault(RuntimeError):
    """The failure a fault route raises on purpose."""


@bp.get("/read")
def read() -> dict[str, int]:
    """A plain read, the bulk of a realistic load."""
    return {"users": db.session.scalar(select(func.count(User.id))) or 0}


@bp.post("/write/<name>")
def write(name: str) -> tuple[dict[str, str], int]:
    """Insert a user and flush it; then raise if ``?fail=1``, else commit.

    The failing case does not roll back: cleaning up is the teardown's job, which is
    what the leak and atomicity scenarios check. ``?split=1`` commits before raising,
    the non-atomic control whose row must be seen.
    """
    db.session.add(User(username=name, password_hash="not-a-hash"))
    db.session.flush()
    if request.args.get("split") == "1":
        db.session.commit()
    if request.args.get("fail") == "1":
        raise InjectedFault(f"injected failure after writing {name}")
    db.session.commit()
    return {"written": name}, 201


@bp.post("/slow-write/<name>")
def slow_write(name: str) -> tuple[dict[str, str], int]:
    """Write a user, sleep (a worker may be killed here), then add a post and commit.

    With ``?split=1`` the user is committed before the sleep: a non-atomic write whose
    half survives a crash, the control for the SIGKILL scenario.
    """
    seconds = min(float(request.args.get("seconds", "0")), SLOW_WRITE_MAX_SECONDS)
    user = User(username=name, password_hash="not-a-hash")
    db.session.add(user)
    db.session.flush()
    if request.args.get("split") == "1":
        db.session.commit()
    pid_dir = current_app.config.get("FAULTS_PID_DIR")
    if pid_dir:
        Path(pid_dir, f"{name}.pid").write_text(str(os.getpid()))
    time.sleep(seconds)
    with db.transaction() as session:
        session.add(Post(title=f"by {name}", body="second half", author=user))
    return {"written": name}, 201


@bp.get("/leak")
def leak() -> dict[str, int]:
    """Check out a connection, open a transaction on it and never give it back.

    On SQLite the connection is bound read-only (a deferred BEGIN), so that the leaked
    transaction is a reader that blocks nobody.
    """
    engine = db.get_engine()
    connection = (engine.execution_options(**{READ_ONLY: True}) if engine.dialect.name == "sqlite" else engine).connect()
    connection.execute(select(func.count(User.id)))  # autobegins: 'idle in transaction'
    _leaked.append(connection)
    return {"leaked": len(_leaked)}


@bp.get("/pool")
def pool() -> dict[str, int]:
    """This worker's pid, connections checked out and sessions in the registry."""
    return {
        "pid": os.getpid(),
        "checked_out": db.get_engine().pool.checkedout(),  # type: ignore[attr-defined]
        "registry": registry_size(),
    }


def registry_size() -> int:
    """Sessions the registry holds (one per live app context that used the database)."""
    return len(db.session.registry.registry)


def release_leaked() -> int:
    """Close what /_faults/leak held, so that a control test ends clean."""
    count = len(_leaked)
    while _leaked:
        _leaked.pop().close()
    return count


def add_fault_routes(
    app: Flask,
    *,
    without_teardown: bool = False,
    sqlite_deferred_begin: bool = False,
    one_bulkhead_share: bool = False,
) -> Flask:
    """Register the fault routes (before the app's first request) and the breakages asked for."""
    app.register_blueprint(bp)
    app.config.setdefault("FAULTS_PID_DIR", os.environ.get("FAULTS_PID_DIR"))
    if without_teardown:
        _drop_teardown(app)
    if sqlite_deferred_begin:
        _use_deferred_begin(app)
    if one_bulkhead_share:
        _one_share_for_every_server(app)
    return app


def create_raising_app(config: Mapping[str, Any] | None = None, **breakages: bool) -> Flask:
    """The factory gunicorn calls: ``tests.faults.raisingapp:create_raising_app()``.

    With ``FAULTS_PID_DIR`` set, each worker leaves ``worker-<pid>.ready`` there once
    its app is loaded (its signal handlers are in place by then), so that a test can
    wait for a respawned worker before it stops the server.
    """
    app = add_fault_routes(create_app(config), **breakages)
    pid_dir = app.config.get("FAULTS_PID_DIR")
    if pid_dir:
        Path(pid_dir, f"worker-{os.getpid()}.ready").touch()
    return app


def _drop_teardown(app: Flask) -> None:
    """Take the registry's removal out of the app's teardown: sessions then outlive
    their request, the leak the leak checks must catch."""
    removal = db._remove_session
    app.teardown_appcontext_funcs[:] = [f for f in app.teardown_appcontext_funcs if f != removal]


def _one_share_for_every_server(app: Flask) -> None:
    """Let one server take every slot of the bulkhead, as before it had a share per
    server: threads stuck on the primary then refuse the pages a replica could serve."""
    guards = db.app_state(app).feature(Guards)
    assert guards is not None and guards.bulkhead is not None, "the one-share control needs a bulkhead"
    guards.bulkhead.share = guards.bulkhead.limit


def _use_deferred_begin(app: Flask) -> None:
    """Replace the engine's ``BEGIN IMMEDIATE`` with SQLite's plain, deferred ``BEGIN``."""
    engine = db.app_state(app).engine
    assert engine.dialect.name == "sqlite", "the deferred-BEGIN control is for SQLite"
    for listener in list(engine.dispatch.begin):
        event.remove(engine, "begin", listener)

    @event.listens_for(engine, "begin")
    def _deferred(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")


def serve(database_url: str, tmp_path: Path, factory: str = "create_raising_app()", **env: str) -> Server:
    """Start gunicorn (the project's gunicorn.conf.py) on this module's app."""
    from tests.support.gunicorn import start_gunicorn

    return start_gunicorn(database_url, tmp_path, app=f"tests.faults.raisingapp:{factory}", **env)


# -- what the server says: open transactions and sessions -----------------------------


def open_transactions(url: Any, app_name_prefix: str | None = None) -> int:
    """Transactions left open on the server by the app: PostgreSQL sessions ``idle in
    transaction`` labelled ``app_name_prefix*``; MariaDB InnoDB transactions of the
    database's connections; SQLite: 1 when the write lock is held, else 0."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            if engine.dialect.name == "postgresql":
                return int(connection.scalar(
                    text("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE :name "
                         "AND state LIKE 'idle in transaction%'"),
                    {"name": f"{app_name_prefix or ''}%"},
                ))
            if engine.dialect.name in ("mysql", "mariadb"):
                return int(connection.scalar(
                    text("SELECT count(*) FROM information_schema.innodb_trx t "
                         "JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id "
                         "WHERE p.db = DATABASE() AND p.id <> CONNECTION_ID()")
                ))
            connection.exec_driver_sql("PRAGMA busy_timeout = 0")
            try:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            except OperationalError:
                return 1
            connection.exec_driver_sql("ROLLBACK")
            return 0
    finally:
        engine.dispose()
