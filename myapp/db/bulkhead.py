"""The bulkhead: at most so many threads of a process use the database at once, so
that a thread stays free for requests that need no database (``/healthz``) when the
database stops answering. ``breaker.Guards`` switches it on and feeds it the waits."""

from __future__ import annotations

import threading
import time

from .config import BulkheadSettings
from .errors import DatabaseUnavailable
from .metrics import BULKHEAD_REFUSALS


class _Holder:
    """One thread's place in the bulkhead: whether it holds a slot, and since when it
    waits on the database (None while it does anything else: a template, a hash)."""

    __slots__ = ("held", "waiting_since")

    def __init__(self) -> None:
        self.held = False
        self.waiting_since: float | None = None


class Bulkhead:
    """At most ``limit`` threads of this process use the database at once.

    A thread is admitted when its unit of work begins (before the checkout, its ping
    and connect) and keeps its slot while it holds what others may wait for: a
    transaction, its locks, a PgBouncer server connection. It gives the slot back when
    its connection goes back to the pool, or as soon as a statement is answered while
    it reads in autocommit (it then holds nothing), and is admitted again at its next
    statement. So a page that renders after its reads holds no slot, and under a normal
    load nobody hands one over (a handoff wakes a waiting thread: CPU a busy worker pays).

    A thread over the cap waits for a slot (at most ``max_wait``), unless every holder
    has been waiting on the database for ``timeout`` or more: then the database is
    stuck, and it is refused at once. A holder busy with its own work is not stuck.
    """

    def __init__(self, limit: int, timeout: float, max_wait: float) -> None:
        self.limit = limit
        self.timeout = timeout
        self.max_wait = max_wait
        self._changed = threading.Condition(threading.Lock())
        self._held: set[_Holder] = set()
        self._mine = threading.local()

    @classmethod
    def from_settings(cls, settings: BulkheadSettings) -> Bulkhead:
        return cls(settings.limit, settings.timeout, settings.max_wait)

    def holder(self) -> _Holder:
        """This thread's holder (made on first use)."""
        holder: _Holder | None = getattr(self._mine, "holder", None)
        if holder is None:
            holder = self._mine.holder = _Holder()
        return holder

    def admit(self, force: bool = False) -> None:
        """This thread is about to wait on the database: take a slot unless it holds
        one; raise DatabaseUnavailable if refused. ``force``: a COMMIT or ROLLBACK,
        which takes one at once (refusing it would only keep its connection longer)."""
        holder = self.holder()
        if not holder.held:
            with self._changed:
                if len(self._held) >= self.limit and not force:
                    self._wait_for_room()
                holder.held = True
                self._held.add(holder)
        holder.waiting_since = holder.waiting_since or time.monotonic()

    def answered(self, release: bool) -> None:
        """This thread's wait is over; ``release``: it holds nothing others wait for."""
        holder = self.holder()
        holder.waiting_since = None
        if release:
            self.release(holder)

    def release(self, holder: _Holder | None = None) -> None:
        """Give back the slot of this thread (or of ``holder``), if it holds one."""
        holder = holder if holder is not None else self.holder()
        holder.waiting_since = None
        if holder.held:
            with self._changed:
                holder.held = False
                self._held.discard(holder)
                self._changed.notify()

    def _wait_for_room(self) -> None:
        deadline = time.monotonic() + self.max_wait
        while len(self._held) >= self.limit:
            now = time.monotonic()
            if self._all_stuck(now) or now >= deadline:
                BULKHEAD_REFUSALS.inc()
                raise DatabaseUnavailable("busy", f"all {self.limit} database slots of this worker stayed busy", 1)
            self._changed.wait(min(0.05, deadline - now))

    def _all_stuck(self, now: float) -> bool:
        return all(
            holder.waiting_since is not None and now - holder.waiting_since >= self.timeout
            for holder in self._held
        )
