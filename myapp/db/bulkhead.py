"""The bulkhead: at most so many threads of a process use the database at once, so
that a thread stays free for requests that need no database (``/healthz``) when the
database stops answering. ``breaker.Guards`` switches it on and feeds it the waits."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

from .config import BulkheadSettings
from .errors import DatabaseUnavailable


class _Slot:
    """One thread holding the bulkhead (through one or more nested app contexts): since
    when it waits on the database (None: it is busy with something else, a template or
    a password hash)."""

    __slots__ = ("token", "holds", "waiting_since")

    def __init__(self, token: int) -> None:
        self.token = token
        self.holds = 1
        self.waiting_since: float | None = time.monotonic()  # on its way: ping, connect


class Bulkhead:
    """At most ``limit`` threads of this process use the database at once.

    A request over the cap waits for a slot (at most ``max_wait``), unless every holder
    has been waiting on the database for ``timeout`` or more: then the database is
    stuck, and the request is refused at once instead of taking the thread kept free
    for /healthz. A holder that is busy with work of its own (hashing a password,
    rendering) is not stuck, so a burst of slow requests queues instead of failing.
    A thread holds one slot however many app contexts it nests.
    """

    def __init__(self, limit: int, timeout: float, max_wait: float) -> None:
        self.limit = limit
        self.timeout = timeout
        self.max_wait = max_wait
        self._changed = threading.Condition()
        self._held: dict[int, _Slot] = {}
        self._tokens = itertools.count()
        self._mine = threading.local()

    @classmethod
    def from_settings(cls, settings: BulkheadSettings) -> Bulkhead:
        return cls(settings.limit, settings.timeout, settings.max_wait)

    def acquire(self) -> Callable[[], None]:
        """Take a slot (or join this thread's); return the function that gives it back (once)."""
        slot: _Slot | None = getattr(self._mine, "slot", None)
        if slot is not None and slot.token in self._held:
            slot.holds += 1
        else:
            slot = self._take()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._give_back(slot)

        return release

    def _take(self) -> _Slot:
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
            slot = self._held[token] = self._mine.slot = _Slot(token)
        return slot

    def _give_back(self, slot: _Slot) -> None:
        slot.holds -= 1
        if slot.holds:
            return
        with self._changed:
            if self._held.pop(slot.token, None) is not None:
                self._changed.notify()
        if getattr(self._mine, "slot", None) is slot:
            self._mine.slot = None

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
