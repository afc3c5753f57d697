"""A circuit breaker and a bulkhead in front of the database, one of each per process.

When the database stops answering, each request that needs it waits out a timeout,
and once every thread of a worker waits, nothing is left to answer ``/healthz``: a
load balancer then declares the whole site dead. So:

- the **bulkhead** caps how many threads may use the database at once; a request over
  the cap waits a moment for a slot, then gets a 503, and a thread stays free for
  requests that need no database;
- the **breaker** counts failures to answer (connect attempts and statements that waited
  at least ``SLOW_FAILURE_SECONDS`` and then failed: timeouts, lost connections) in a
  row; past the threshold it *opens*: requests that need the database
  get a 503 with ``Retry-After`` at once, and after ``reset_seconds`` a single request
  probes the database with a fresh connection. Its success closes the breaker; its
  failure keeps it open for another period.

The lifecycle asks both when a context first uses ``db.session``; the engine's events
report each statement's outcome.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from sqlalchemy import Engine, event
from sqlalchemy.exc import SQLAlchemyError

from .errors import describe_error

log = logging.getLogger(__name__)

State = Literal["closed", "open", "probing"]

# A failure counts only if it kept its thread waiting at least this long. A server that
# refuses at once (a restart's "connection refused", a killed connection) ties up no
# thread, and the next request may already succeed: opening the breaker would only
# turn that request away.
SLOW_FAILURE_SECONDS = 0.5


class DatabaseUnavailable(SQLAlchemyError):
    """The request was refused before it reached the database (a 503 page)."""

    def __init__(self, reason: Literal["unreachable", "busy"], detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.reason = reason
        self.retry_after = max(1, math.ceil(retry_after))


class Breaker:
    """Closed, open or probing; thread-safe; a closed breaker costs one attribute read."""

    def __init__(self, threshold: int, reset_seconds: float, probe: Callable[[], Any]) -> None:
        self.threshold = threshold
        self.reset_seconds = reset_seconds
        self.slow_seconds = SLOW_FAILURE_SECONDS
        self._probe = probe
        self._lock = threading.Lock()
        self.state: State = "closed"
        self.failures = 0
        self.last_error = ""
        self.opened_at = 0.0

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
            with self._lock:
                self.state, self.opened_at = "open", time.monotonic()
                self.last_error = describe_error(error)
            log.warning("database probe failed (%s); circuit stays open", self.last_error)
            raise self._refusal(self.reset_seconds) from None
        self._close("the probe answered")

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
        log.warning(
            "database circuit open after %d failures in a row (last: %s): requests get a 503 "
            "for %.1f s, then one probe", self.failures, self.last_error, self.reset_seconds,
        )

    def status(self) -> dict[str, Any]:
        """What /readyz and ``flask db status`` show."""
        return {"state": self.state, "failures_in_a_row": self.failures, "last_error": self.last_error or None}

    def _close(self, why: str) -> None:
        with self._lock:
            was, self.state, self.failures = self.state, "closed", 0
        if was != "closed":
            log.warning("database circuit closed: %s", why)

    def _refusal(self, retry_after: float) -> DatabaseUnavailable:
        return DatabaseUnavailable(
            "unreachable", f"circuit open after {self.threshold} failures in a row; last: {self.last_error}",
            retry_after,
        )


class _Slot:
    """One holder of the bulkhead: since when it waits on the database (None: it is busy
    with something else, a template or a password hash)."""

    __slots__ = ("waiting_since",)

    def __init__(self) -> None:
        self.waiting_since: float | None = time.monotonic()  # on its way: ping, connect


class Bulkhead:
    """At most ``limit`` threads of this process use the database at once.

    A request over the cap waits for a slot (at most ``max_wait``), unless every holder
    has been waiting on the database for ``timeout`` or more: then the database is
    stuck, and the request is refused at once instead of taking the thread kept free
    for /healthz. A holder that is busy with work of its own (hashing a password,
    rendering) is not stuck, so a burst of slow requests queues instead of failing.
    ``watch`` keeps each holder's waiting time from the engine's events.
    """

    def __init__(self, limit: int, timeout: float, max_wait: float) -> None:
        self.limit = limit
        self.timeout = timeout
        self.max_wait = max_wait
        self._changed = threading.Condition()
        self._held: dict[int, _Slot] = {}
        self._tokens = itertools.count()
        self._mine = threading.local()

    def acquire(self) -> Callable[[], None]:
        """Take a slot; return the function that gives it back (once)."""
        deadline = time.monotonic() + self.max_wait
        with self._changed:
            while len(self._held) >= self.limit:
                now = time.monotonic()
                if self._all_stuck(now) or now >= deadline:
                    raise DatabaseUnavailable(
                        "busy", f"all {self.limit} database slots of this worker stayed busy", 1
                    )
                self._changed.wait(min(0.05, deadline - now))
            token = next(self._tokens)
            slot = self._held[token] = self._mine.slot = _Slot()

        def release() -> None:
            with self._changed:
                if self._held.pop(token, None) is not None:
                    self._changed.notify()
            if getattr(self._mine, "slot", None) is slot:
                self._mine.slot = None

        return release

    def waiting(self, on_the_database: bool) -> None:
        """Note whether this thread's holder now waits on the database."""
        slot = getattr(self._mine, "slot", None)
        if slot is not None:
            slot.waiting_since = (slot.waiting_since or time.monotonic()) if on_the_database else None

    def _all_stuck(self, now: float) -> bool:
        return all(
            slot.waiting_since is not None and now - slot.waiting_since >= self.timeout
            for slot in self._held.values()
        )




def watch_waits(engine: Engine, bulkhead: Bulkhead) -> None:
    """Tell the bulkhead when its holders wait on the database and when they are back."""

    def waiting(*args: Any) -> None:
        bulkhead.waiting(True)

    def answered(*args: Any) -> None:
        bulkhead.waiting(False)

    for name in ("do_connect", "before_cursor_execute", "commit", "rollback"):
        event.listen(engine, name, waiting)
    event.listen(engine, "after_cursor_execute", answered)


def watch(engine: Engine, breaker: Breaker) -> None:
    """Report each statement's outcome, and each slow failure to connect or to get an
    answer, to the breaker."""
    # When this thread began its current wait: a connect attempt or a statement.
    began = threading.local()

    def _waiting(*args: Any) -> None:
        began.at = time.monotonic()

    event.listen(engine, "do_connect", _waiting)
    event.listen(engine, "before_cursor_execute", _waiting)

    @event.listens_for(engine, "after_cursor_execute")
    def _answered(*args: Any) -> None:
        breaker.record_success()

    @event.listens_for(engine, "handle_error")
    def _failed(context: Any) -> None:
        # A lost connection (a network timeout included) or a failed connect; not a
        # constraint, a deadlock or a statement timeout: the server answered those. A
        # failed pre-ping is followed by a connect attempt, which is what counts.
        if context.is_pre_ping or not (context.is_disconnect or context.connection is None):
            return
        started = getattr(began, "at", None)
        if started is not None and time.monotonic() - started >= breaker.slow_seconds:
            breaker.record_failure(context.original_exception)
