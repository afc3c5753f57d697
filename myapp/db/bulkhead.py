"""The bulkhead: at most so many threads of a process use the database at once, so
that a thread stays free for requests that need no database (``/healthz``) when the
database stops answering; and, with replicas, no one server may take every slot, so
that a primary that stops answering leaves a slot for the pages a replica serves (and
the reverse). ``breaker.Guards`` switches it on and feeds it the waits."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .config import BulkheadSettings
from .errors import DatabaseUnavailable
from .metrics import BULKHEAD_REFUSALS


class _Holder:
    """One thread's place in the bulkhead: whether it holds a slot, the server it uses
    (None until its first wait on one: a unit is admitted before its checkout), and
    since when it waits on the database (None while it does anything else)."""

    __slots__ = ("held", "server", "waiting_since")

    def __init__(self) -> None:
        self.held = False
        self.server: str | None = None
        self.waiting_since: float | None = None


class Bulkhead:
    """At most ``limit`` threads of this process use the database at once, and at most
    ``share`` of them one server.

    A thread is admitted when its unit of work begins (before the checkout, its ping
    and connect) and keeps its slot while it holds what others may wait for: a
    transaction, its locks, a PgBouncer server connection. It gives the slot back when
    its connection goes back to the pool, or as soon as a statement is answered while
    it reads in autocommit (it then holds nothing), and is admitted again at its next
    statement. So a page that renders after its reads holds no slot, and under a normal
    load nobody hands one over (a handoff wakes a waiting thread: CPU a busy worker pays).

    Its first wait on a server (a ping, a connect, a statement) names the server. With
    one server the share is the limit. With several (the primary and its replicas) it
    is ``limit - 1``: threads stuck on a primary that went silent, before any breaker
    opens, hold at most that many, and the last slot still serves a page from a
    replica. A thread that finds its server's share taken gives back the slot it was
    admitted with while it waits, so that it blocks nobody else.

    A thread over the cap waits for room (at most ``max_wait``), unless every holder in
    its way has been waiting on the database for ``timeout`` or more: then the database
    is stuck, and it is refused at once. A holder busy with its own work is not stuck.
    """

    def __init__(self, limit: int, timeout: float, max_wait: float, servers: int = 1) -> None:
        self.limit = limit
        self.share = max(1, limit - 1) if servers > 1 else limit
        self.timeout = timeout
        self.max_wait = max_wait
        self._changed = threading.Condition(threading.Lock())
        self._held: set[_Holder] = set()
        self._mine = threading.local()

    @classmethod
    def from_settings(cls, settings: BulkheadSettings, servers: int = 1) -> Bulkhead:
        return cls(settings.limit, settings.timeout, settings.max_wait, servers)

    def holder(self) -> _Holder:
        """This thread's holder (made on first use)."""
        holder: _Holder | None = getattr(self._mine, "holder", None)
        if holder is None:
            holder = self._mine.holder = _Holder()
        return holder

    def admit(self, server: str | None = None, force: bool = False) -> None:
        """This thread is about to wait on the database (on ``server``, when known):
        take a slot unless it holds one there; raise DatabaseUnavailable if refused.
        ``force``: a COMMIT or ROLLBACK, which takes one at once (refusing it would only
        keep its connection longer)."""
        holder = self.holder()
        if not holder.held or (server is not None and holder.server != server):
            with self._changed:
                self._take(holder, server, force)
        holder.waiting_since = holder.waiting_since or time.monotonic()

    @contextmanager
    def pinging(self, server: str, dbapi_connection: Any) -> Iterator[None]:
        """A pool's ping of a connection to ``server`` waits on it (``engines.guard_pings``);
        the checkout that follows ends the wait, a failed ping its handle_error."""
        self.admit(server)
        yield

    def probing(self, server: str | None, probe: Callable[[], Any]) -> None:
        """Run a breaker's probe of ``server`` (a fresh connection of its own) in a slot
        of that server's share; the slot goes back after it unless held before."""
        held = self.holder().held
        self.admit(server)
        try:
            probe()
        finally:
            self.answered(release=not held)

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
                self._give_back(holder)

    def _take(self, holder: _Holder, server: str | None, force: bool) -> None:
        """Under the lock: admit ``holder`` (held or not) on ``server``."""
        if holder.held:  # admitted before it knew its server, or moving to another one
            if force or server is None or len(self._on(server)) < self.share:
                holder.server = server
                return
            self._give_back(holder)
        if not force:
            self._wait_for_room(server)
        holder.held, holder.server = True, server
        self._held.add(holder)

    def _give_back(self, holder: _Holder) -> None:
        holder.held, holder.server = False, None
        self._held.discard(holder)
        self._changed.notify_all()  # a waiter for another server may have room now

    def _on(self, server: str) -> set[_Holder]:
        return {holder for holder in self._held if holder.server == server}

    def _in_the_way(self, server: str | None) -> tuple[set[_Holder], str]:
        """The holders a thread admitted on ``server`` must wait for, and why (empty: room)."""
        if len(self._held) >= self.limit:
            return self._held, f"all {self.limit} database slots of this worker stayed busy"
        if server is not None:
            on_it = self._on(server)
            if len(on_it) >= self.share:
                return on_it, f"{server} kept all {self.share} of its database slots in this worker busy"
        return set(), ""

    def _wait_for_room(self, server: str | None) -> None:
        deadline = time.monotonic() + self.max_wait
        while True:
            holders, why = self._in_the_way(server)
            if not holders:
                return
            now = time.monotonic()
            stuck = self._all_stuck(holders, now)
            if stuck or now >= deadline:
                BULKHEAD_REFUSALS.inc()
                servers = {holder.server for holder in holders}
                only = servers.pop() if stuck and len(servers) == 1 else None
                raise DatabaseUnavailable("busy", why, 1, stuck_on=only)
            self._changed.wait(min(0.05, deadline - now))

    def _all_stuck(self, holders: set[_Holder], now: float) -> bool:
        return all(
            holder.waiting_since is not None and now - holder.waiting_since >= self.timeout
            for holder in holders
        )
