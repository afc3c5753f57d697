"""PostgreSQL read replicas: one engine per replica, each one's health, and the checks
that keep it current.

A replica is *healthy* when its last check connected, found it in recovery and found
it close enough to the primary (``DATABASE_REPLICA_MAX_LAG``). Lag is measured two ways:

- bytes: the primary's WAL insert position minus the replica's replay position;
- seconds: how long ago the primary first reported a WAL position that the replica
  still has not replayed. Unlike ``now() - pg_last_xact_replay_timestamp()`` this is 0
  for a replica that is caught up with an idle primary, needs no clocks to agree, and
  grows in real time when replay stops while writes go on.

Checks run at most once per ``DATABASE_REPLICA_CHECK_INTERVAL`` (jittered) in a
background thread that the first session to find the state stale starts: no request
ever waits for one, and an idle process sends none. Each check has a short deadline
(``engines.make_check_engine``). A request that meets a dead replica marks it down at
once; the next successful check brings it back. Nothing here knows about Flask.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from .engines import CHECK_STATEMENT_TIMEOUT_MS
from .errors import describe_error
from .metrics import REPLICA_IN_ROTATION, REPLICA_LAG_BYTES, REPLICA_LAG_SECONDS

log = logging.getLogger("myapp.db.replicas")

# "promoted": it answers, no longer a standby (Patroni made it the leader, say): out of
# rotation, yet read-only mode may read from it while the primary is unreachable.
State = Literal["unknown", "healthy", "lagging", "down", "promoted"]

# WAL positions as plain integers (bytes since 0/0): comparable, and small in a cookie.
PRIMARY_LSN_SQL = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"
REPLAY_LSN_SQL = "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint"
_CHECK_SQL = text("SELECT pg_is_in_recovery(), (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint")

# A replica's cached replay position is asked for again, by a session whose user must
# see a later one, at most this often: the cost of read-your-writes is one round trip
# per replica per 50 ms at most, and none while the cache is already past the position.
REPLAY_LSN_TTL = 0.05

_SAMPLES = 1024  # primary positions kept for the time lag: 17 minutes at one per second


def format_lsn(lsn: int | None) -> str | None:
    """An integer WAL position in PostgreSQL's notation, e.g. ``0/3000060``."""
    return None if lsn is None else f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass(eq=False)
class Replica:
    """One replica: its engines and what the last check (or request) learned about it."""

    number: int
    url: str  # masked
    engine: Engine  # reads: pooled, AUTOCOMMIT
    check_engine: Engine
    state: State = "unknown"
    reason: str = "not checked yet"
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    replay_lsn: int = -1
    replay_lsn_at: float = 0.0  # time.monotonic() of replay_lsn
    checked_at: float | None = None
    marked_down_at: float = float("-inf")  # a request's mark_down outranks a check begun before it
    gate: Callable[[], bool] | None = None  # its breaker's word: may a request use it now?

    @property
    def name(self) -> str:
        return f"replica {self.number}"

    def guard_with(self, gate: Callable[[], bool]) -> None:
        """Let ``gate`` (its breaker) say whether a request may use this replica now."""
        self.gate = gate

    def usable(self, state: State, excluding: Collection[str] = ()) -> bool:
        """In ``state``, not among ``excluding`` (names), and let through by its breaker."""
        return (self.state == state and (not excluding or self.name not in excluding)
                and (self.gate is None or self.gate()))

    @property
    def label(self) -> str:
        """The replica's label value in the metrics."""
        return f"replica_{self.number}"

    def ask_replay_lsn(self, connection: Connection) -> int | None:
        """The replica's replay position now, asked on ``connection`` (one of its own)."""
        value = connection.exec_driver_sql(REPLAY_LSN_SQL).scalar()
        return None if value is None else int(value)

    def status(self) -> dict[str, Any]:
        """What /readyz and ``flask db status`` show."""
        return {
            "replica": self.number,
            "url": self.url,
            "state": self.state,
            "reason": None if self.state == "healthy" else self.reason,
            "lag_bytes": self.lag_bytes,
            "lag_seconds": None if self.lag_seconds is None else round(self.lag_seconds, 3),
            "replay_lsn": format_lsn(self.replay_lsn) if self.replay_lsn >= 0 else None,
            "checked_seconds_ago": None if self.checked_at is None else round(time.monotonic() - self.checked_at, 3),
        }


@dataclass(eq=False)
class ReplicaSet:
    """The replicas of one app, their health, and the choice of one for a session."""

    replicas: list[Replica]
    primary_check_engine: Engine
    interval: float
    max_lag_seconds: float | None
    max_lag_bytes: int | None
    _samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=_SAMPLES))
    _next_check: float = 0.0
    primary_unreachable: bool = False  # the last check could not read the primary's WAL position
    _checking: threading.Lock = field(default_factory=threading.Lock)
    _changing: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        for replica in self.replicas:  # the series exist from the start: an alert sees them
            REPLICA_IN_ROTATION.labels(replica.label).set(0)
        _all_sets.add(self)
        _register_fork_hook()

    # -- the hot path: a session choosing where to read ---------------------------------

    def maybe_check(self) -> None:
        """Start a check in the background if the last one is older than the interval
        (one thread per process checks; everyone else keeps using the cached state)."""
        if time.monotonic() < self._next_check or not self._checking.acquire(blocking=False):
            return
        # Jitter below the interval: workers spread their checks, and no replica stays
        # unchecked for longer than one interval plus the check's own deadline.
        self._next_check = time.monotonic() + self.interval * random.uniform(0.75, 1.0)
        try:
            threading.Thread(target=self._check_and_release, name="myapp-replica-check", daemon=True).start()
        except BaseException:
            self._checking.release()
            raise

    def choose(self, required_lsn: int | None, ask_replay_lsn: Callable[[Replica], int | None],
               excluding: Collection[str] = ()) -> Replica | None:
        """A healthy replica that has replayed ``required_lsn``, or None (read from the primary).

        The cached replay positions decide without a round trip; only when none is past
        the position and one's cache is older than ``REPLAY_LSN_TTL`` is that one replica
        asked (``ask_replay_lsn``, on the connection the session will read from).
        """
        healthy = [replica for replica in self.replicas if replica.usable("healthy", excluding)]
        if not healthy:
            return None
        if required_lsn is None:
            return healthy[0] if len(healthy) == 1 else random.choice(healthy)
        ready = [replica for replica in healthy if replica.replay_lsn >= required_lsn]
        if ready:
            return ready[0] if len(ready) == 1 else random.choice(ready)
        now = time.monotonic()
        stale = [replica for replica in healthy if now - replica.replay_lsn_at >= REPLAY_LSN_TTL]
        if not stale:
            return None
        replica = random.choice(stale)
        lsn = ask_replay_lsn(replica)
        if lsn is None:
            return None
        self._note_replay(replica, lsn, time.monotonic())
        return replica if lsn >= required_lsn else None

    def promoted(self, excluding: Collection[str] = ()) -> Replica | None:
        """A replica the last check found promoted (and its breaker lets through): the
        newest data there is while the primary is unreachable, in the moments after a
        failover until the app reaches the new primary."""
        return next((replica for replica in self.replicas if replica.usable("promoted", excluding)), None)

    def replayed_everywhere(self, lsn: int, age_seconds: float) -> bool:
        """True once no replica can serve a read older than ``lsn``: every healthy one has
        replayed it, and it is too old for one that rejoins within the lag limit to miss it.

        Never true because *one* replica caught up (GitLab's bug #413203).
        """
        if age_seconds > self.settle_seconds:
            return True
        return all(replica.state == "healthy" and replica.replay_lsn >= lsn for replica in self.replicas)

    @property
    def settle_seconds(self) -> float:
        """How old a write must be for every replica that counts as healthy (now, or when
        it rejoins) to have it: the time limit plus up to two checks' sampling. With a
        size limit alone nothing bounds a replica's time lag; 60 s is assumed then."""
        return (self.max_lag_seconds if self.max_lag_seconds is not None else 60.0) + 2 * self.interval

    def mark_down(self, replica: Replica, why: str) -> None:
        """A request met a failure on this replica: out of the rotation until a check
        that begins after this passes (one under way may have seen it healthy)."""
        replica.marked_down_at = time.monotonic()
        self._set_state(replica, "down", why)

    # -- checks -------------------------------------------------------------------------

    def check(self) -> None:
        """Check the primary's WAL position and every replica now, in this thread (after
        a check under way in the background: they share one connection per server)."""
        with self._checking:
            self._check_now()

    def _check_now(self) -> None:
        now = time.monotonic()
        try:
            with self.primary_check_engine.connect() as connection:
                primary_lsn = int(connection.exec_driver_sql(PRIMARY_LSN_SQL).scalar_one())
            self._samples.append((now, primary_lsn))
            self.primary_unreachable = False
        except SQLAlchemyError as error:
            self.primary_unreachable = True
            # Replicas may still serve reads while the primary is away; lag is measured
            # against the last position the primary reported.
            log.warning("replica check: the primary's WAL position is unknown: %s", describe_error(error))
        for replica in self.replicas:
            self._check_replica(replica)

    def _check_and_release(self) -> None:
        try:
            self._check_now()
        except Exception:  # a bug in a check must not kill the process, nor stop later checks
            log.exception("replica check failed")
        finally:
            self._checking.release()

    def _check_replica(self, replica: Replica) -> None:
        began = time.monotonic()
        for attempt in (1, 2):
            started = time.monotonic()
            try:
                with replica.check_engine.connect() as connection:
                    in_recovery, replay_lsn = connection.execute(_CHECK_SQL).one()
                break
            except SQLAlchemyError as error:
                # A kept connection that failed at once died with a restart since the last
                # check: reconnect once. One that timed out met a silent server: out now.
                died_at_once = time.monotonic() - started < CHECK_STATEMENT_TIMEOUT_MS / 1000
                if attempt == 1 and died_at_once and isinstance(error, DBAPIError) and error.connection_invalidated:
                    continue
                replica.checked_at = time.monotonic()
                self._set_state(replica, "down", describe_error(error))
                return
        now = replica.checked_at = time.monotonic()
        if not in_recovery:  # unless a request marked it down meanwhile (a read it failed)
            self._set_state(replica, "promoted", "not a standby: promoted", checked_since=began)
            return
        if replay_lsn is None:
            self._set_state(replica, "down", "not replicating")
            return
        self._note_replay(replica, int(replay_lsn), now)
        replica.lag_bytes, replica.lag_seconds = self._lag(replica.replay_lsn, now)
        REPLICA_LAG_BYTES.labels(replica.label).set(replica.lag_bytes)
        REPLICA_LAG_SECONDS.labels(replica.label).set(replica.lag_seconds)
        too_far = []
        if self.max_lag_bytes is not None and replica.lag_bytes > self.max_lag_bytes:
            too_far.append(f"{replica.lag_bytes} bytes behind (limit {self.max_lag_bytes})")
        if self.max_lag_seconds is not None and replica.lag_seconds > self.max_lag_seconds:
            too_far.append(f"{replica.lag_seconds:.1f} s behind (limit {self.max_lag_seconds:g} s)")
        if too_far:
            self._set_state(replica, "lagging", ", ".join(too_far), checked_since=began)
        else:
            self._set_state(replica, "healthy", "", checked_since=began)

    def _lag(self, replay_lsn: int, now: float) -> tuple[int, float]:
        if not self._samples:
            return 0, 0.0
        lag_bytes = max(0, self._samples[-1][1] - replay_lsn)
        for taken_at, primary_lsn in self._samples:  # oldest first
            if primary_lsn > replay_lsn:
                return lag_bytes, now - taken_at
        return lag_bytes, 0.0

    def _note_replay(self, replica: Replica, lsn: int, at: float) -> None:
        with self._changing:  # a check and a request may both learn a position
            if lsn >= replica.replay_lsn:
                replica.replay_lsn, replica.replay_lsn_at = lsn, at

    def _set_state(self, replica: Replica, state: State, reason: str, checked_since: float | None = None) -> None:
        with self._changing:
            if checked_since is not None and replica.marked_down_at >= checked_since:
                return  # stale: a request marked it down while this check was under way
            was = replica.state
            replica.state, replica.reason = state, reason or replica.reason
        if was == state:
            return
        REPLICA_IN_ROTATION.labels(replica.label).set(1 if state == "healthy" else 0)
        if state == "healthy":
            log.warning("replica %s %s (%d bytes, %.1f s behind)", replica.url,
                        "joined" if was == "unknown" else "rejoined", replica.lag_bytes or 0, replica.lag_seconds or 0.0)
        elif was in ("healthy", "unknown"):
            log.warning("replica %s left: %s", replica.url, reason)

    def status(self) -> list[dict[str, Any]]:
        return [replica.status() for replica in self.replicas]

    def dispose(self) -> None:
        """Close every connection of the set, once a check under way has finished."""
        with self._checking:
            self._next_check = float("inf")  # no check starts after this
            for engine in [self.primary_check_engine, *(r.engine for r in self.replicas),
                           *(r.check_engine for r in self.replicas)]:
                engine.dispose()

    def _after_fork(self) -> None:
        # A check thread of the parent does not exist here: its lock must not stay held.
        self._checking = threading.Lock()
        self._next_check = 0.0


_all_sets: weakref.WeakSet[ReplicaSet] = weakref.WeakSet()
_fork_hook_registered = False


def _register_fork_hook() -> None:
    global _fork_hook_registered
    if not _fork_hook_registered:
        _fork_hook_registered = True
        os.register_at_fork(after_in_child=_after_fork_in_child)


def _after_fork_in_child() -> None:
    for replica_set in list(_all_sets):
        replica_set._after_fork()
