"""A client-side deadline on every wait on a PostgreSQL server (issue 19).

A server whose processes are frozen (SIGSTOP, a VM paused, storage stuck) never
answers, yet its kernel still acknowledges every packet: ``tcp_user_timeout`` and the
keepalives never fire, and a server-side ``statement_timeout`` cannot fire on a server
that does not run. A statement sent to it waits until it thaws.

So each wait is noted (which thread, on which socket, since when). A watchdog thread
looks at them every tenth of a second; a wait older than ``DATABASE_NETWORK_TIMEOUT``
makes it ask the server for a fresh connection and ``SELECT 1`` within the ping's
short timeout. A server that answers is alive and merely slow (a long report, a
migration): its statements keep running, and are asked about again one period later.
A server that does not answer is frozen or gone: the sockets of the waits past their
deadline are shut down, so each waiting statement fails at once as a lost connection,
which the pool discards and the breaker counts.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, event
from sqlalchemy.exc import SQLAlchemyError

from .breaker import Guards, ping_once
from .engines import guard_pings, make_engine
from .errors import describe_error

if TYPE_CHECKING:
    from flask import Flask

    from .config import DatabaseSettings
    from .state import AppState

log = logging.getLogger(__name__)

TICK = 0.1  # seconds between two looks at the waits


@dataclass(eq=False)
class _Wait:
    connection: weakref.ref[Any]  # the DBAPI connection waited on (never kept alive by this)
    fd: int
    since: float
    deadline: float

    def extend(self, until: float) -> None:
        self.deadline = until

    def still_open(self) -> bool:
        """The connection is alive, open and still on the socket noted: a descriptor
        number is reused as soon as its connection closes, by anything."""
        connection = self.connection()
        try:
            return connection is not None and not connection.closed and connection.fileno() == self.fd
        except Exception:  # closed under us
            return False


class Watchdog:
    """The waits on one server. One thread per process looks at every watchdog
    (``_watch_all``): it starts on first use, and again in a forked child."""

    def __init__(self, server: str, seconds: float, probe: Callable[[], Any],
                 on_unanswered: Callable[[BaseException], None] | None = None) -> None:
        self.server, self.seconds, self._probe, self._on_unanswered = server, seconds, probe, on_unanswered
        self._waits: dict[int, _Wait] = {}  # by thread ident; a thread waits on one thing at a time
        self.unanswered_at = float("-inf")  # when a fresh connection last went unanswered
        self.abandoned = 0
        _watchdogs.add(self)

    def begin(self, dbapi_connection: Any) -> None:
        """This thread starts waiting on ``dbapi_connection``'s server."""
        now = time.monotonic()
        self._waits[threading.get_ident()] = _Wait(weakref.ref(dbapi_connection), dbapi_connection.fileno(), now,
                                                   now + self.seconds)
        if _thread_owner[0] != os.getpid():
            _start_thread()

    def end(self, *args: Any) -> None:
        """This thread's wait is over (answered, failed, or its connection went back)."""
        self._waits.pop(threading.get_ident(), None)

    @contextmanager
    def waiting(self, dbapi_connection: Any) -> Iterator[None]:
        self.begin(dbapi_connection)
        try:
            yield
        finally:
            self.end()

    def recently_unanswered(self) -> bool:
        """The server left a fresh connection unanswered less than a period ago."""
        return time.monotonic() - self.unanswered_at < self.seconds

    def look(self) -> None:
        now = time.monotonic()
        late = {ident: wait for ident, wait in list(self._waits.items()) if wait.deadline <= now}
        for ident, wait in list(late.items()):
            if not wait.still_open():  # a wait whose end no event reported: forget it
                self._waits.pop(ident, None)
                del late[ident]
        if not late:
            return
        if self._answers():
            for wait in late.values():  # alive, only slow: ask again one period later
                wait.extend(now + self.seconds)
            return
        for ident, wait in late.items():
            if self._waits.get(ident) is wait:
                self._abandon(wait, now)

    def _answers(self) -> bool:
        try:
            self._probe()
        except SQLAlchemyError as error:
            self.unanswered_at = time.monotonic()
            log.warning("%s did not answer a fresh connection (%s) while statements waited on it over %.0f s",
                        self.server, describe_error(error), self.seconds)
            if self._on_unanswered is not None:
                self._on_unanswered(error)
            return False
        return True

    def _abandon(self, wait: _Wait, now: float) -> None:
        """Shut the socket down under the waiting thread: its read returns at once."""
        if not wait.still_open():
            return
        try:
            with socket.socket(fileno=os.dup(wait.fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # the connection ended on its own meanwhile
            return
        self.abandoned += 1
        log.warning("abandoned a wait of %.1f s on %s: the server does not answer", now - wait.since, self.server)


_watchdogs: weakref.WeakSet[Watchdog] = weakref.WeakSet()
_thread_owner = [0]  # the pid whose thread looks at the watchdogs


def _start_thread() -> None:
    _thread_owner[0] = os.getpid()
    threading.Thread(target=_watch_all, name="myapp-deadlines", daemon=True).start()


def _watch_all() -> None:
    while True:
        time.sleep(TICK)
        for watchdog in list(_watchdogs):
            try:
                watchdog.look()
            except Exception:  # the thread must outlive a bug in one look
                log.exception("the deadline watchdog of %s failed a look", watchdog.server)


class Deadlines:
    """The feature (PostgreSQL, ``DATABASE_NETWORK_TIMEOUT`` > 0): a watchdog per server
    that runs the app's statements, fed by its engine's events."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.watchdogs: dict[str, Watchdog] = {}

    @classmethod
    def build(cls, settings: DatabaseSettings) -> Deadlines | None:
        if settings.backend != "postgresql" or not settings.network_timeout:
            return None
        # A statement the server itself times out must get the chance to: the deadline
        # comes after the statement timeout.
        return cls(max(float(settings.network_timeout), settings.statement_timeout_ms / 1000 + 1))

    def install(self, state: AppState, app: Flask) -> None:
        guards = state.feature(Guards)
        breaker = guards.breaker if guards is not None else None
        self._guard(state.engine, "primary", state.probe_engine, breaker.record_failure if breaker else None)
        for number, engine in enumerate(state.replica_engines, start=1):
            url = engine.url.render_as_string(hide_password=False)
            self._guard(engine, f"replica_{number}", make_engine(state.settings, probe=True, replica_url=url))

    def _guard(self, engine: Engine, server: str, probe_engine: Engine,
               on_unanswered: Callable[[BaseException], None] | None = None) -> None:
        watchdog = Watchdog(server, self.seconds, lambda: ping_once(probe_engine), on_unanswered)
        self.watchdogs[server] = watchdog
        _watch_waits(engine, watchdog)
        guard_pings(engine, watchdog.waiting)
        _refuse_connects_while_unanswered(engine, watchdog)


def _watch_waits(engine: Engine, watchdog: Watchdog) -> None:
    """A statement, a COMMIT or a ROLLBACK (the pool's on return included) waits from
    its event until its answer, its failure, or its connection's checkin."""

    def statement(connection: Any, cursor: Any, *args: Any) -> None:
        watchdog.begin(cursor.connection)

    def transaction_end(connection: Any) -> None:
        # A connection invalidated under a statement (its server session ended) sends no
        # ROLLBACK, so there is no wait; and asking it for its DB-API connection would
        # raise PendingRollbackError in place of the error that invalidated it.
        if connection.invalidated or connection.closed:
            return
        watchdog.begin(connection.connection.dbapi_connection)

    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "after_cursor_execute", watchdog.end)
    event.listen(engine, "handle_error", watchdog.end)
    event.listen(engine, "commit", transaction_end)
    event.listen(engine, "rollback", transaction_end)
    event.listen(engine, "reset", lambda dbapi_connection, *args: watchdog.begin(dbapi_connection))  # the pool's ROLLBACK
    event.listen(engine, "checkin", watchdog.end)


def _refuse_connects_while_unanswered(engine: Engine, watchdog: Watchdog) -> None:
    """A server that just left a fresh connection unanswered is not tried again for a
    period: each connect would spend the whole connect timeout on it."""
    dbapi_error = engine.dialect.loaded_dbapi.OperationalError

    @event.listens_for(engine, "do_connect")
    def _refuse(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        if watchdog.recently_unanswered():
            raise dbapi_error(f"{watchdog.server} did not answer a fresh connection moments ago; not tried again "
                              f"for {watchdog.seconds:.0f} s")
