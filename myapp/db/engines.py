"""Engines, set up right for each backend, and kept safe across forks and exits.

Nothing here knows about Flask: what a request promises (that it only reads) reaches
an engine as the execution option ``READ_ONLY`` on the session's bind.
"""

from __future__ import annotations

import atexit
import os
import select
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool, StaticPool

from .config import DatabaseSettings, is_memory
from .hosts import prefer_the_last_good_host
from .metrics import MeasuredPool

# The execution option of a session's bind whose request promises not to write.
READ_ONLY = "myapp_read_only"

# Every pooled engine, so that a fork or the interpreter's exit can reach them.
_all_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def make_engine(settings: DatabaseSettings, *, probe: bool = False, replica_url: str | None = None) -> Engine:
    """Create the engine for the database (or for a replica) with what its backend needs.

    A probe engine has no pool and the ping's short connect timeout: each ping opens a
    fresh connection, which proves the server still accepts new ones. A replica engine
    reads in AUTOCOMMIT (no BEGIN, no ROLLBACK) and keeps its connections when the
    server says it is read-only: that is what a replica is.
    """
    url = settings.url if replica_url is None else make_url(replica_url)
    backend = url.get_backend_name()
    options: dict[str, Any] = {"pool_pre_ping": True, "hide_parameters": True, "echo": settings.echo,
                               **_pool_options(settings, url, probe)}
    if replica_url is not None:
        options["isolation_level"] = "AUTOCOMMIT"
    if backend == "sqlite":
        connect_args = _sqlite_connect_args(settings, url)
    elif backend == "postgresql":
        connect_args = _postgresql_connect_args(settings, probe)
    else:
        connect_args = _mariadb_connect_args(settings, probe)
    engine = create_engine(url, connect_args=connect_args, **options)
    _install_backend_events(engine, settings, probe=probe, replica=replica_url is not None)
    if not probe:
        _all_engines.add(engine)
    return engine


def _pool_options(settings: DatabaseSettings, url: URL, probe: bool) -> dict[str, Any]:
    if is_memory(url):
        return {"poolclass": StaticPool}  # one database shared by every session
    if probe:
        return {"poolclass": NullPool}
    pool = settings.pool
    return {"poolclass": MeasuredPool, "pool_size": pool.size, "max_overflow": pool.max_overflow,
            "pool_timeout": pool.timeout, "pool_recycle": pool.recycle}


def _sqlite_connect_args(settings: DatabaseSettings, url: URL) -> dict[str, Any]:
    args: dict[str, Any] = {"timeout": settings.sqlite_busy_timeout}
    if is_memory(url):
        args["check_same_thread"] = False
    return args


def _postgresql_connect_args(settings: DatabaseSettings, probe: bool) -> dict[str, Any]:
    args: dict[str, Any] = {"connect_timeout": settings.ping_timeout if probe else settings.connect_timeout}
    if settings.network_timeout:
        args.update(_tcp_timeouts(settings.network_timeout))
    if settings.pgbouncer:
        # Transaction pooling hands each transaction to any server connection: a
        # statement psycopg prepared on one is unknown on the next.
        args["prepare_threshold"] = None
    elif settings.statement_timeout_ms:
        args["options"] = f"-c statement_timeout={settings.statement_timeout_ms}"
    return args


def _mariadb_connect_args(settings: DatabaseSettings, probe: bool) -> dict[str, Any]:
    args: dict[str, Any] = {"connect_timeout": settings.ping_timeout if probe else settings.connect_timeout}
    if settings.network_timeout:
        # PyMySQL waits on a socket read for as long as this: it must outlast the
        # longest statement the server lets run.
        args["read_timeout"] = settings.network_timeout + settings.statement_timeout_ms // 1000
        args["write_timeout"] = settings.network_timeout
    if settings.statement_timeout_ms:
        args["init_command"] = f"SET SESSION max_statement_time={settings.statement_timeout_ms / 1000}"
    return args


def _install_backend_events(engine: Engine, settings: DatabaseSettings, *, probe: bool, replica: bool) -> None:
    """The events each backend needs, whatever features are on."""
    backend = engine.dialect.name
    if backend == "sqlite":
        _configure_sqlite(engine)
        return
    _name_connections(engine, settings.app_name)
    if backend != "postgresql":
        return
    prefer_the_last_good_host(engine)  # a URL that lists several hosts
    if not replica:
        _discard_connections_to_a_read_only_server(engine)
    if not probe:
        _ping_only_when_the_socket_speaks(engine)
    if settings.pgbouncer and settings.statement_timeout_ms:
        _set_statement_timeout_per_transaction(engine, settings.statement_timeout_ms)


# A health check's deadline: libpq's shortest connect timeout (it rounds anything
# shorter up to 2 s), then half a second for the statement and for unacknowledged packets.
CHECK_CONNECT_TIMEOUT = 2
CHECK_STATEMENT_TIMEOUT_MS = 500


def make_check_engine(settings: DatabaseSettings, url: str | URL, label: str) -> Engine:
    """A one-connection engine for the replica health checks of one server (PostgreSQL).

    Short deadlines everywhere, AUTOCOMMIT, no pre-ping (a failed check is the news);
    the connection is kept between checks, so a check costs one round trip.
    """
    connect_args: dict[str, Any] = {
        "connect_timeout": CHECK_CONNECT_TIMEOUT,
        "tcp_user_timeout": 1000,
        "keepalives": 1,
        "keepalives_idle": 1,
        "keepalives_interval": 1,
        "keepalives_count": 2,
    }
    if not settings.pgbouncer:  # PgBouncer refuses startup options
        connect_args["options"] = f"-c statement_timeout={CHECK_STATEMENT_TIMEOUT_MS}"
    engine = create_engine(
        url, connect_args=connect_args, isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=0,
        pool_timeout=CHECK_CONNECT_TIMEOUT, pool_recycle=settings.pool.recycle, hide_parameters=True,
    )
    _name_connections(engine, f"{settings.app_name}-{label}")
    _all_engines.add(engine)
    return engine


def _tcp_timeouts(seconds: int) -> dict[str, int]:
    """libpq settings that make a silent network fail a connection within ``seconds``.

    tcp_user_timeout bounds a statement whose packets go unacknowledged (the host
    vanished); keepalives bound a wait for an answer on a link that went quiet after
    the statement was acknowledged. Without them the kernel retransmits for ~15 minutes.
    """
    idle, interval = max(1, seconds // 2), max(1, seconds // 6)
    return {
        "tcp_user_timeout": seconds * 1000,
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": interval,
        "keepalives_count": 3,
    }


# read_only_sql_transaction: a write reached a server that is (now) a standby.
_READ_ONLY_SERVER_SQLSTATES = frozenset({"25006"})


def _discard_connections_to_a_read_only_server(engine: Engine) -> None:
    """After a failover, a pooled connection to the demoted primary still answers, but
    refuses every write (SQLSTATE 25006), and pre-ping cannot tell. Count that as a
    disconnect: SQLAlchemy then discards the connection and every older one in the pool,
    and the next connect goes, through a multi-host URL with
    ``target_session_attrs=read-write``, to the new primary."""
    event.listen(engine, "handle_error", read_only_server_is_a_disconnect)


def read_only_server_is_a_disconnect(context: Any) -> None:
    if getattr(context.original_exception, "sqlstate", None) in _READ_ONLY_SERVER_SQLSTATES:
        context.is_disconnect = True


def _set_statement_timeout_per_transaction(engine: Engine, timeout_ms: int) -> None:
    """Behind PgBouncer the startup ``options`` are refused: set the timeout per
    transaction instead (SET LOCAL ends with it, so no other client inherits it)."""

    @event.listens_for(engine, "begin")
    def _set_local(connection: Any) -> None:
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = {int(timeout_ms)}")


def _name_connections(engine: Engine, app_name: str) -> None:
    """Label every connection with the app and the worker's pid, so that an operator
    (or a fault test) can tell whose connection a server-side session is."""
    key = "application_name" if engine.dialect.name == "postgresql" else "program_name"

    @event.listens_for(engine, "do_connect")
    def _label(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        # At connect time, not at engine creation: with --preload the engine is made
        # in the gunicorn master, the connections in each worker.
        cparams[key] = f"{app_name}:{os.getpid()}"


# A pooled connection checked in longer ago than this gets a real ping.
QUIET_PING_WINDOW = 1.0


def _ping_only_when_the_socket_speaks(engine: Engine) -> None:
    """Make PostgreSQL's pre-ping free for a connection checked in moments ago whose
    socket is quiet.

    A server that ends a connection (a restart, ``pg_terminate_backend``, an idle
    timeout) sends a FATAL message and closes the socket, which makes it readable. So
    for a connection that psycopg sees idle and intact, that was in use less than
    ``QUIET_PING_WINDOW`` ago, and whose socket a zero-timeout poll finds empty, the
    SELECT 1 round trip can only say "alive" and is skipped. Older connections always
    get the real ping: a host that vanished without a word (a partition, a failover
    that moved the address) leaves the socket quiet, and only a round trip, bounded by
    the TCP timeouts, finds that out before a view is handed the connection.
    """
    real_ping = engine.dialect.do_ping
    checked_in: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
    guards = _ping_guards[engine.dialect] = []

    @event.listens_for(engine, "checkin")
    def _note_checkin(dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is not None:
            checked_in[dbapi_connection] = time.monotonic()

    def do_ping(dbapi_connection: Any) -> bool:
        recently = time.monotonic() - checked_in.get(dbapi_connection, 0.0) < QUIET_PING_WINDOW
        if recently and _socket_is_quiet(dbapi_connection):
            return True
        return _guarded_ping(real_ping, guards, dbapi_connection)

    # The one place the layer replaces a library method, kept because no public mechanism
    # is as cheap: pool_pre_ping (the seed's promise) calls the dialect's do_ping, and
    # SQLAlchemy has no hook between "checked out" and "pinged". Measured (docs/
    # performance.md): the post page 1.10x faster in process, 40 interleaved pairs, than
    # with a SELECT 1 at every checkout. tests/test_bench_peers.py::
    # test_quiet_connection_skips_the_ping_and_a_spoken_one_gets_it fails if a ping
    # stops going through it; tests/db/test_layout.py lists it with this reason.
    engine.dialect.do_ping = do_ping  # type: ignore[method-assign]


def _guarded_ping(real_ping: Callable[[Any], bool], guards: list[Callable[[Any], AbstractContextManager[None]]],
                  dbapi_connection: Any) -> bool:
    if not guards:
        return real_ping(dbapi_connection)
    with ExitStack() as stack:
        for guard in guards:
            stack.enter_context(guard(dbapi_connection))
        return real_ping(dbapi_connection)


# What a real ping waits under, per dialect (an engine's own: each engine has one), in
# order: the bulkhead's slot (breaker.Guards), then deadline.Deadlines' watchdog.
_ping_guards: weakref.WeakKeyDictionary[Any, list[Callable[[Any], AbstractContextManager[None]]]] = (
    weakref.WeakKeyDictionary())


def guard_pings(engine: Engine, guard: Callable[[Any], AbstractContextManager[None]]) -> None:
    """Run the engine's real pings inside ``guard(dbapi_connection)`` too (a slot, a
    deadline), inside the guards added before it; PostgreSQL's engines only."""
    guards = _ping_guards.get(engine.dialect)
    if guards is not None:
        guards.append(guard)


_IDLE = 0  # psycopg.pq.TransactionStatus.IDLE (libpq's PQTRANS_IDLE), without importing psycopg here


def _socket_is_quiet(connection: Any) -> bool:
    """True if the psycopg connection is idle, not broken, and has nothing to read."""
    try:
        if connection.closed or connection.broken:
            return False
        if connection.info.transaction_status != _IDLE:
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
    memory = is_memory(engine.url)

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
