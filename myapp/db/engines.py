"""Engines, set up right for each backend, and kept safe across forks and exits.

Nothing here knows about Flask: what a request promises (that it only reads) reaches
an engine as the execution option ``routing.READ_ONLY`` on the session's bind.
"""

from __future__ import annotations

import atexit
import os
import select
import weakref
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool, StaticPool

from .routing import READ_ONLY

# Every pooled engine, so that a fork or the interpreter's exit can reach them.
_all_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def make_engine(config: Mapping[str, Any], instance_path: str, *, probe: bool = False) -> Engine:
    """Create the engine for ``DATABASE_URL`` with the options its backend needs.

    A probe engine has no pool and a short connect timeout: each ping opens a fresh
    connection, which proves the server still accepts new ones.
    """
    url = _resolve_url(config["DATABASE_URL"], instance_path)
    backend = url.get_backend_name()
    options: dict[str, Any] = {
        "pool_pre_ping": True,
        "hide_parameters": True,
        "echo": bool(config.get("DATABASE_ECHO", False)),
    }
    connect_args: dict[str, Any] = {}
    connect_timeout = int(config["DATABASE_PING_TIMEOUT" if probe else "DATABASE_CONNECT_TIMEOUT"])
    statement_timeout_ms = int(config.get("DATABASE_STATEMENT_TIMEOUT") or 0)

    if backend == "sqlite" and _is_memory(url):
        options["poolclass"] = StaticPool  # one database shared by every session
        connect_args["check_same_thread"] = False
    elif probe:
        options["poolclass"] = NullPool
    else:
        options.update(
            pool_size=int(config["DATABASE_POOL_SIZE"]),
            max_overflow=int(config["DATABASE_MAX_OVERFLOW"]),
            pool_timeout=float(config["DATABASE_POOL_TIMEOUT"]),
            pool_recycle=int(config["DATABASE_POOL_RECYCLE"]),
        )

    if backend == "sqlite":
        connect_args["timeout"] = float(config["SQLITE_BUSY_TIMEOUT"])
    elif backend == "postgresql":
        connect_args["connect_timeout"] = connect_timeout
        if statement_timeout_ms:
            connect_args["options"] = f"-c statement_timeout={statement_timeout_ms}"
    elif backend in ("mysql", "mariadb"):
        url = url.update_query_dict({"charset": "utf8mb4"})
        connect_args["connect_timeout"] = connect_timeout
        if statement_timeout_ms:
            connect_args["init_command"] = f"SET SESSION max_statement_time={statement_timeout_ms / 1000}"

    engine = create_engine(url, connect_args=connect_args, **options)
    if backend == "sqlite":
        _configure_sqlite(engine)
    else:
        _name_connections(engine, config["DATABASE_APP_NAME"])
    if backend == "postgresql" and not probe:
        _ping_only_when_the_socket_speaks(engine)
    if not probe:
        _all_engines.add(engine)
    return engine


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


def _resolve_url(raw: str | URL, instance_path: str) -> URL:
    """Parse the URL; a relative SQLite path is taken relative to the instance folder."""
    url = make_url(raw)
    if url.get_backend_name() == "sqlite" and not _is_memory(url):
        assert url.database is not None
        if not os.path.isabs(url.database) and not url.database.startswith("file:"):
            os.makedirs(instance_path, exist_ok=True)
            url = url.set(database=os.path.join(instance_path, url.database))
    return url


def _name_connections(engine: Engine, app_name: str) -> None:
    """Label every connection with the app and the worker's pid, so that an operator
    (or a fault test) can tell whose connection a server-side session is."""
    key = "application_name" if engine.dialect.name == "postgresql" else "program_name"

    @event.listens_for(engine, "do_connect")
    def _label(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        # At connect time, not at engine creation: with --preload the engine is made
        # in the gunicorn master, the connections in each worker.
        cparams[key] = f"{app_name}:{os.getpid()}"


def _ping_only_when_the_socket_speaks(engine: Engine) -> None:
    """Make PostgreSQL's pre-ping free for a connection whose socket is quiet.

    An idle connection receives nothing unless the server ended it: a restart, a
    ``pg_terminate_backend`` or an idle timeout sends a FATAL message and closes the
    socket, which makes it readable. So when psycopg sees the connection idle and
    intact and a zero-timeout poll finds nothing to read, the SELECT 1 round trip can
    only say "alive" and is skipped; otherwise the real ping runs, and a failure goes
    through ``pool_pre_ping``'s usual path (invalidate the pool, reconnect). A frozen
    or unreachable server goes unnoticed, as it does with a real ping, which would
    block. (The same check as go-sql-driver/mysql's ``connCheck`` before reuse.)
    """
    real_ping = engine.dialect.do_ping

    def do_ping(dbapi_connection: Any) -> bool:
        if _socket_is_quiet(dbapi_connection):
            return True
        return real_ping(dbapi_connection)

    # The one place the layer replaces a library method: SQLAlchemy has no hook between
    # "checked out" and "pinged", and pool_pre_ping (the seed's promise) calls the
    # dialect's do_ping. tests/db/test_engines.py fails if a ping stops going through it.
    engine.dialect.do_ping = do_ping  # type: ignore[method-assign]


def _socket_is_quiet(connection: Any) -> bool:
    """True if the psycopg connection is idle, not broken, and has nothing to read."""
    from psycopg.pq import TransactionStatus

    try:
        if connection.closed or connection.broken:
            return False
        if connection.info.transaction_status != TransactionStatus.IDLE:
            return False
        poller = select.poll()
        poller.register(connection.fileno(), select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP)
        return not poller.poll(0)
    except Exception:  # whatever went wrong, let the real ping decide
        return False


def _configure_sqlite(engine: Engine) -> None:
    """Give SQLite real transactions: WAL, foreign keys, and an up-front write lock.

    Python 3.11's sqlite3 issues its own BEGIN lazily, before the first write, which
    breaks SAVEPOINTs and lets a read-then-write transaction fail at once with
    "database is locked" whatever the busy timeout. So we switch its handling off and
    emit BEGIN ourselves: BEGIN IMMEDIATE (take the write lock up front, waiting up to
    the busy timeout) except for sessions bound with the ``READ_ONLY`` option (requests
    whose method promises not to write), so that readers never queue behind a writer.
    """
    memory = _is_memory(engine.url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        if not memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        if connection.get_execution_options().get(READ_ONLY):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


# -- process lifecycle ---------------------------------------------------------------

_hooks_registered = False


def register_process_hooks() -> None:
    """Keep pooled connections from crossing a fork, and close them at exit."""
    global _hooks_registered
    if _hooks_registered:
        return
    _hooks_registered = True
    os.register_at_fork(after_in_child=forget_inherited_connections)
    atexit.register(dispose_all_engines)


def forget_inherited_connections() -> None:
    """Drop, without closing, every pooled connection this process inherited.

    close=False: the sockets belong to the parent (e.g. the gunicorn master with
    --preload); the child drops its references and opens its own connections.
    """
    for engine in list(_all_engines):
        engine.dispose(close=False)


def dispose_all_engines() -> None:
    """Close every pooled connection, so the server sees a clean goodbye instead of
    waiting for a socket to time out, and a smart shutdown is not held up."""
    for engine in list(_all_engines):
        engine.dispose()
