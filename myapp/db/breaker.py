"""A circuit breaker and a bulkhead in front of the database, one of each per process.

When the database stops answering, each request that needs it waits out a timeout,
and once every thread of a worker waits, nothing is left to answer ``/healthz``: a
load balancer then declares the whole site dead. So:

- the **bulkhead** caps how many threads may use the database at once (a unit of work
  holds its slot until its connection goes back, a read in autocommit until its
  answer); a request over the cap waits a moment for a slot, then gets a 503, and a
  thread stays free for requests that need no database;
- the **breaker** counts failures to answer (connect attempts and statements that waited
  at least ``SLOW_FAILURE_SECONDS`` and then failed: timeouts, lost connections) in a
  row; past the threshold it *opens*: requests that need the database
  get a 503 with ``Retry-After`` at once, and after ``reset_seconds`` a single request
  probes the database with a fresh connection. Its success closes the breaker; its
  failure keeps it open for another period.

``Guards`` is the feature: a context's session is admitted to the bulkhead and asks the
breaker when it is born (the slot first: a probe waits on the database too); each later
unit of work is admitted as it begins, and the engine's events give the slot back and
report each wait and each statement's outcome. ``HealthMethods`` gives ``db`` its ping and breaker status.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from .bulkhead import Bulkhead
from .engines import guard_pings, make_engine
from .errors import DatabaseUnavailable, describe_error
from .metrics import BREAKER_OPEN, BREAKER_OPENS
from .session import AUTOCOMMIT_KEY, AppSession, state_of
from .state import AppState, StateAccess

if TYPE_CHECKING:
    from flask import Flask

    from .config import DatabaseSettings

log = logging.getLogger(__name__)

State = Literal["closed", "open", "probing"]

# A failure counts only if it kept its thread waiting at least this long. A server that
# refuses at once (a restart's "connection refused", a killed connection) ties up no
# thread, and the next request may already succeed: opening the breaker would only
# turn that request away.
SLOW_FAILURE_SECONDS = 0.5


class Breaker:
    """Closed, open or probing; thread-safe; a closed breaker costs one attribute read."""

    def __init__(self, threshold: int, reset_seconds: float, probe: Callable[[], Any],
                 server: str = "primary") -> None:
        self.server = server
        self.threshold = threshold
        self.reset_seconds = reset_seconds
        self.slow_seconds = SLOW_FAILURE_SECONDS
        self._probe = probe
        self._lock = threading.Lock()
        self.state: State = "closed"
        self.failures = 0
        self.last_error = ""
        self.opened_at = 0.0
        self._open_gauge = BREAKER_OPEN.labels(server)
        self._opens = BREAKER_OPENS.labels(server)
        self._open_gauge.set(0)  # the series exists from the start: an alert sees it at 0

    def check(self) -> None:
        """Return if the database may be used; raise DatabaseUnavailable if not.

        The first caller after the open period runs the probe itself (a fresh
        connection with the ping's short timeout), so at most one thread waits on it.
        """
        if self.state == "closed":
            return
        with self._lock:
            waited = time.monotonic() - self.opened_at
            if self.state == "probing" or waited < self.reset_seconds:
                raise self._refusal(self.reset_seconds - waited)
            self.state = "probing"
        try:
            self._probe()
        except SQLAlchemyError as error:
            self._reopen(describe_error(error))
            raise self._refusal(self.reset_seconds) from None
        except BaseException as error:  # a bug or an interrupt: the next request probes again
            self._reopen(f"the probe raised {type(error).__name__}: {error}")
            raise
        self._close("the probe answered")

    def allows(self) -> bool:
        """``check`` without the exception: may this server be used now? (A replica's
        breaker is asked when a replica is chosen; it probes as ``check`` does.)"""
        if self.state == "closed":
            return True
        try:
            self.check()
        except DatabaseUnavailable:
            return False
        return True

    def _reopen(self, why: str) -> None:
        with self._lock:
            self.state, self.opened_at, self.last_error = "open", time.monotonic(), why
        log.warning("database probe failed (%s; %s); circuit stays open", self.server, why)

    def record_success(self) -> None:
        if self.failures:
            self._close("a statement succeeded")

    def record_failure(self, error: BaseException) -> None:
        with self._lock:
            self.failures += 1
            self.last_error = describe_error(error)
            if self.state != "closed" or self.failures < self.threshold:
                return
            self.state, self.opened_at = "open", time.monotonic()
        self._open_gauge.set(1)
        self._opens.inc()
        log.warning(
            "database circuit open after %d failures in a row (%s; last: %s): requests get a 503 "
            "for %.1f s, then one probe", self.failures, self.server, self.last_error, self.reset_seconds,
        )

    def status(self) -> dict[str, Any]:
        """What /readyz and ``flask db status`` show."""
        return {"state": self.state, "failures_in_a_row": self.failures, "last_error": self.last_error or None}

    def _close(self, why: str) -> None:
        with self._lock:
            was, self.state, self.failures = self.state, "closed", 0
        if was != "closed":
            self._open_gauge.set(0)
            log.warning("database circuit closed (%s): %s", self.server, why)

    def _refusal(self, retry_after: float) -> DatabaseUnavailable:
        return DatabaseUnavailable(
            "unreachable", f"circuit open after {self.threshold} failures in a row; last: {self.last_error}",
            retry_after,
        )


def ping_once(engine: Engine) -> None:
    """``SELECT 1`` over a connection of ``engine`` (the probe engine: a fresh one)."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


class Guards:
    """The feature: the breaker and the bulkhead, either of which may be off."""

    def __init__(self, settings: DatabaseSettings) -> None:
        self.breaker_settings = settings.breaker
        servers = 1 + (len(settings.replicas.urls) if settings.replicas is not None else 0)
        self.bulkhead = Bulkhead.from_settings(settings.bulkhead, servers) if settings.bulkhead else None
        # With one server the bulkhead has no shares to keep: its waits stay unnamed.
        self.name_servers = servers > 1
        self.breaker: Breaker | None = None  # the primary's
        self.replica_breakers: dict[str, Breaker] = {}  # by replica label
        # With replicas, a read-only request may go on while the primary's breaker is open.
        self.read_only_mode = settings.replicas is not None and settings.replicas.read_only_mode

    @classmethod
    def build(cls, settings: DatabaseSettings) -> Guards | None:
        return cls(settings) if settings.breaker or settings.bulkhead else None

    def install(self, state: AppState, app: Flask) -> None:
        if self.breaker_settings is not None:
            self.breaker = self._breaker("primary", state.probe_engine)
            for replica in state.replicas:  # one each: a failing replica never opens the primary's
                url = replica.engine.url.render_as_string(hide_password=False)
                breaker = self._breaker(replica.label, make_engine(state.settings, probe=True, replica_url=url))
                self.replica_breakers[replica.label] = breaker
                replica.guard_with(breaker.allows)
        connects_only = counts_only_connects(state)
        for number, engine in enumerate(state.serving):  # a replica's statement waits on a database too
            server = "primary" if number == 0 else f"replica_{number}"
            watching = self.breaker if number == 0 else self.replica_breakers.get(server)
            _watch(engine, watching, self.bulkhead, connects_only=connects_only and number == 0,
                   server=server if self.name_servers else None)
        if self.bulkhead is not None:
            _admit_units(state.sessionmaker, self.bulkhead)
        state.openers.insert(0, self._admit)  # before anything else a session's birth does

    def _admit(self, session: AppSession, reading: bool) -> None:
        """Ask the breaker (its probe waits in a slot of the primary's share), then let
        the session's units be admitted as they begin; should a slot outlive its events
        (an interrupt), the session's end gives it back. An open breaker refuses the
        session, unless it only reads and replicas may serve it."""
        if self.bulkhead is not None:
            state_of(session).release_slot = partial(self.bulkhead.release, self.bulkhead.holder())
        if self.breaker is not None:
            try:
                self.breaker.check()
            except DatabaseUnavailable:
                if not (reading and self.read_only_mode):
                    raise
                state_of(session).primary_unreachable = True  # routing reads from a replica

    def _breaker(self, server: str, probe_engine: Engine) -> Breaker:
        settings = self.breaker_settings
        assert settings is not None
        probe: Callable[[], Any] = partial(ping_once, probe_engine)
        if self.bulkhead is not None:  # a probe of a silent server waits on it too
            probe = partial(self.bulkhead.probing, server if self.name_servers else None, probe)
        return Breaker(settings.threshold, settings.reset_seconds, probe=probe, server=server)

    def primary_is_down(self) -> bool:
        """The primary's breaker is open (or probing); without a breaker, never."""
        return self.breaker is not None and self.breaker.state != "closed"


def counts_only_connects(state: AppState) -> bool:
    """On a Galera cluster a lost connection is its node's failure (galera.py counts it
    on the node's breaker); the cluster's breaker counts the connects no node took."""
    return state.settings.galera is not None


def _admit_units(maker: sessionmaker[Any], bulkhead: Bulkhead) -> None:
    """A session's unit of work is admitted as it begins, before its checkout, whose
    ping or connect may hang on a database that stopped answering."""

    @event.listens_for(maker, "after_transaction_create")
    def _admit_unit(session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:
            bulkhead.admit()


def _watch(engine: Engine, breaker: Breaker | None, bulkhead: Bulkhead | None, connects_only: bool = False,
           server: str | None = None) -> None:
    """Tell the bulkhead when a thread waits on ``server`` and when it is answered,
    and the breaker each statement's outcome and each slow failure to connect or to get
    an answer. Waits are timed per thread: a dead connection's info cannot be read."""
    began = threading.local()

    def waiting(*args: Any) -> None:
        if breaker is not None:
            began.at = time.monotonic()
        if bulkhead is not None:
            bulkhead.admit(server)

    def answered(connection: Connection, *args: Any) -> None:
        if breaker is not None:
            breaker.record_success()
        if bulkhead is not None:
            bulkhead.answered(release=AUTOCOMMIT_KEY in connection.info)

    event.listen(engine, "do_connect", waiting)
    event.listen(engine, "before_cursor_execute", waiting)
    event.listen(engine, "after_cursor_execute", answered)
    if bulkhead is not None:
        _watch_transaction_ends(engine, bulkhead, server)
        if server is not None:  # a ping of a silent server waits on it: in its share (PostgreSQL)
            guard_pings(engine, partial(bulkhead.pinging, server))
    if breaker is not None:
        _count_failures(engine, breaker, began, connects_only)


def _watch_transaction_ends(engine: Engine, bulkhead: Bulkhead, server: str | None) -> None:
    """COMMIT and ROLLBACK wait on the database too; their events fire before the call.
    The connection handed out ends the wait of its checkout; handed back, the slot goes
    back. A failed statement's wait ends where it fails."""

    def ending(*args: Any) -> None:
        bulkhead.admit(server, force=True)

    def checked_out(*args: Any) -> None:
        bulkhead.answered(release=False)

    def checked_in(*args: Any) -> None:
        bulkhead.release()

    def failed(context: Any) -> None:
        connection = context.connection
        bulkhead.answered(release=connection is None or AUTOCOMMIT_KEY in connection.info)

    event.listen(engine, "commit", ending)
    event.listen(engine, "rollback", ending)
    event.listen(engine, "checkout", checked_out)
    event.listen(engine, "checkin", checked_in)
    event.listen(engine, "handle_error", failed)


def _count_failures(engine: Engine, breaker: Breaker, began: threading.local, connects_only: bool) -> None:
    @event.listens_for(engine, "handle_error")
    def _failed(context: Any) -> None:
        # A lost connection (a network timeout included) or a failed connect; not a
        # constraint, a deadlock or a statement timeout: the server answered those. A
        # failed pre-ping is followed by a connect attempt, which is what counts.
        if context.is_pre_ping or not (context.is_disconnect or context.connection is None):
            return
        if connects_only and context.connection is not None:
            return
        started = getattr(began, "at", None)
        if started is not None and time.monotonic() - started >= breaker.slow_seconds:
            breaker.record_failure(context.original_exception)


class HealthMethods(StateAccess):
    """The ``db`` methods that tell whether the database answers."""

    def ping(self) -> float:
        """Run ``SELECT 1`` over a fresh connection with a short connect timeout.

        Return the round trip in seconds; raise the database error otherwise.
        """
        started = time.perf_counter()
        ping_once(self.app_state().probe_engine)
        return time.perf_counter() - started

    def breaker_status(self) -> dict[str, Any] | None:
        """This process's circuit breaker on the primary (None when it is switched off)."""
        guards = self.app_state().feature(Guards)
        breaker = guards.breaker if guards is not None else None
        return breaker.status() if breaker is not None else None

    def breakers_status(self) -> dict[str, dict[str, Any]]:
        """Every breaker of this process, by server: the primary's, each replica's."""
        guards = self.app_state().feature(Guards)
        if guards is None or guards.breaker is None:
            return {}
        return {"primary": guards.breaker.status(),
                **{label: breaker.status() for label, breaker in guards.replica_breakers.items()}}
