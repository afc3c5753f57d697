"""The ``Metrics`` feature (``METRICS``): the hot path's Prometheus metrics, recorded by
listeners on every engine that serves the app's statements: each statement's latency
by server and the request's totals, the pool's waits and connections in use, new
connections by the host that answered. The metrics themselves live in ``metrics``."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, event

from .metrics import (
    CONNECTIONS_OPENED, POOL_CHECKED_OUT, POOL_OVERFLOW, STATEMENT_SECONDS, MeasuredPool, current_request,
)
from .statements import TRANSACTION_CONTROL

if TYPE_CHECKING:
    from flask import Flask

    from .config import DatabaseSettings
    from .state import AppState


class Metrics:
    """The feature (``METRICS``): statement latency and counts, pool use, new
    connections by host, on every engine that serves the app's statements."""

    @classmethod
    def build(cls, settings: DatabaseSettings) -> Metrics | None:
        return cls() if settings.metrics else None

    def install(self, state: AppState, app: Flask) -> None:
        for number, engine in enumerate(state.serving):
            _measure_engine(engine, "primary" if number == 0 else f"replica_{number}")


def _measure_engine(engine: Engine, server: str) -> None:
    pool = engine.pool
    if isinstance(pool, MeasuredPool):
        pool.measure(server)
        _count_checked_out(engine, pool, server)
    _time_statements(engine, STATEMENT_SECONDS.labels(server))
    _count_connections(engine, server)


def _time_statements(engine: Engine, histogram: Any) -> None:
    """Each statement's time to its answer, by server, and the request's totals
    (transaction control aside, as the query budget counts). A thread sends one
    statement at a time, so its start time is kept per thread."""
    clock = threading.local()
    perf_counter = time.perf_counter

    def sending(*args: Any) -> None:
        clock.started = perf_counter()

    def answered(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        elapsed = perf_counter() - clock.started
        histogram.observe(elapsed)
        stats = current_request.get()
        if stats is not None and not statement.startswith(TRANSACTION_CONTROL):
            stats.add_statement(elapsed)

    event.listen(engine, "before_cursor_execute", sending)
    event.listen(engine, "after_cursor_execute", answered)


def _count_checked_out(engine: Engine, pool: MeasuredPool, server: str) -> None:
    """Counted by the events themselves: the pool's own count still includes a
    connection while its checkin event runs. The overflow is written when it changes
    (rarely): each write is a locked write to the worker's metrics file."""
    checked_out, overflow = POOL_CHECKED_OUT.labels(server), POOL_OVERFLOW.labels(server)
    last_overflow = [0]

    def out(*args: Any) -> None:
        checked_out.inc()
        now = max(0, pool.overflow())
        if now != last_overflow[0]:
            last_overflow[0] = now
            overflow.set(now)

    def back(*args: Any) -> None:
        checked_out.dec()

    event.listen(engine, "checkout", out)
    event.listen(engine, "checkin", back)


def _count_connections(engine: Engine, server: str) -> None:
    counters: dict[str, Any] = {}

    def connected(dbapi_connection: Any, record: Any) -> None:
        host = connection_host(dbapi_connection)
        counter = counters.get(host)
        if counter is None:
            counter = counters[host] = CONNECTIONS_OPENED.labels(server, host)
        counter.inc()

    event.listen(engine, "connect", connected)


def connection_host(dbapi_connection: Any) -> str:
    """``address:port`` of the server a DBAPI connection reached (psycopg, PyMySQL);
    ``local`` for SQLite. Taken from the connection, so a multi-host URL shows which."""
    info: Any = getattr(dbapi_connection, "info", None)
    host = getattr(info, "host", None)
    if host is not None:  # psycopg
        return f"{host}:{info.port}"
    host = getattr(dbapi_connection, "host", None)
    if host is not None:  # PyMySQL
        return f"{host}:{dbapi_connection.port}"
    return "local"
