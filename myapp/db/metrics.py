"""What the database layer tells Prometheus, and what it tells the request's log line.

The metrics are prometheus_client's, module-level as that library expects. Under
gunicorn each worker writes them to a file of its own in ``PROMETHEUS_MULTIPROC_DIR``
and the master sums the files at each scrape (``myapp.metrics``); elsewhere they live
in this process. Names follow Prometheus's conventions, and every label value comes
from the settings (a server's role, a host of the URL), never from a request.

Two kinds of recording:

- rare events (a breaker opening, a refusal, a retry, a replica leaving) are recorded
  where they happen, always: they cost nothing while nothing goes wrong;
- the hot path (each statement, each checkout, each request's counts) is recorded by
  the ``Metrics`` feature's listeners (``statement_metrics``), only when ``METRICS`` is on.
"""

from __future__ import annotations

import os
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

# A folder named in the environment (by gunicorn's master, or by hand for a command)
# may not exist yet: prometheus_client would fail at the first metric.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

from prometheus_client import Counter, Gauge, Histogram  # noqa: E402
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import QueuePool


# Seconds: from a cached primary-key read on loopback (~0.2 ms) to a statement timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

STATEMENT_SECONDS = Histogram(
    "myapp_db_statement_duration_seconds", "Time from sending a statement to its answer, by server.",
    ["server"], buckets=LATENCY_BUCKETS)
STATEMENTS_PER_REQUEST = Histogram(
    "myapp_db_statements_per_request", "Statements one request sent (an N+1 query shows here).",
    buckets=(0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89))
POOL_WAIT = Histogram(
    "myapp_db_pool_wait_seconds", "Time to get a pooled connection (its ping, or a connect, included).",
    ["server"], buckets=LATENCY_BUCKETS)
POOL_TIMEOUTS = Counter(
    "myapp_db_pool_timeouts", "Requests for a connection that waited DATABASE_POOL_TIMEOUT and gave up.", ["server"])
POOL_SIZE = Gauge("myapp_db_pool_size", "Connections each pool keeps (DATABASE_POOL_SIZE), summed over workers.",
                  ["server"], multiprocess_mode="livesum")
POOL_CHECKED_OUT = Gauge("myapp_db_pool_checked_out", "Pooled connections in use, summed over workers.",
                         ["server"], multiprocess_mode="livesum")
POOL_OVERFLOW = Gauge("myapp_db_pool_overflow", "Connections open beyond the pool's size, summed over workers.",
                      ["server"], multiprocess_mode="livesum")
CONNECTIONS_OPENED = Counter(
    "myapp_db_connections_opened", "New database connections, by server and host: a failover shows here.",
    ["server", "host"])

BREAKER_OPEN = Gauge("myapp_db_breaker_open", "1 while this worker's circuit breaker is open (or probing).",
                     ["server"], multiprocess_mode="liveall")
BREAKER_OPENS = Counter("myapp_db_breaker_opens", "Times a circuit breaker opened.", ["server"])
BULKHEAD_REFUSALS = Counter("myapp_db_bulkhead_refusals", "Requests the bulkhead turned away (a 503).")

RETRIES = Counter("myapp_db_retries", "Units of work run again after a failure a retry may cure.", ["reason"])
RETRY_REASONS = ("serialization", "deadlock", "certification", "locked")
UNITS_GIVEN_UP = Counter("myapp_db_units_given_up", "Units of work that failed on their last attempt.")
LOST_WRITES = Counter("myapp_db_lost_writes", "Sessions that ended with writes nobody committed.")

READS = Counter("myapp_db_reads", "Reads of read-only requests, by where they went and why.", ["target", "reason"])
PRIMARY_READ_REASONS = ("sticky", "no_healthy_replica", "replica_failed", "use_primary", "write_unit")
REPLICA_IN_ROTATION = Gauge("myapp_db_replica_in_rotation", "1 while a replica serves reads (on any worker).",
                            ["replica"], multiprocess_mode="livemax")
REPLICA_LAG_BYTES = Gauge("myapp_db_replica_lag_bytes", "WAL a replica has yet to replay, at its last check.",
                          ["replica"], multiprocess_mode="livemax")
REPLICA_LAG_SECONDS = Gauge("myapp_db_replica_lag_seconds", "How long a replica has been behind, at its last check.",
                            ["replica"], multiprocess_mode="livemax")

GALERA_NODE_STATE = Gauge(
    "myapp_db_galera_node_state", "wsrep_local_state of the node this worker's pool points at "
    "(4 Synced, 2 Donor/Desynced; 0: no longer this worker's node).", ["node"], multiprocess_mode="liveall")
GALERA_CLUSTER_SIZE = Gauge("myapp_db_galera_cluster_size", "wsrep_cluster_size, as the last node reached said.",
                            multiprocess_mode="livemax")


# A labelled series exists once its child is made. Made at 0 up front, the first event
# of each kind is a rise that rate() and increase() see, not the start of a series.
for _reason in RETRY_REASONS:
    RETRIES.labels(_reason)


# -- what one request did: counted for its log line and its histograms -----------------


@dataclass(eq=False)
class RequestStats:
    """One request's database work, filled in by the statement listeners."""

    statements: int = 0
    db_seconds: float = 0.0
    reads: list[str] = field(default_factory=list)  # where its reads went, in order

    def add_statement(self, seconds: float) -> None:
        self.statements += 1
        self.db_seconds += seconds

    def note_read(self, target: str) -> None:
        if target not in self.reads:
            self.reads.append(target)


current_request: ContextVar[RequestStats | None] = ContextVar("myapp_request_stats", default=None)


def count_read(target: str, reason: str) -> None:
    """A read-only request's read went to ``target`` (primary, replica_N) for ``reason``."""
    _read_counter(target, reason).inc()
    stats = current_request.get()
    if stats is not None:
        stats.note_read(target)


_read_counters: dict[tuple[str, str], Any] = {}


def _read_counter(target: str, reason: str) -> Any:
    counter = _read_counters.get((target, reason))
    if counter is None:
        counter = _read_counters[(target, reason)] = READS.labels(target, reason)
    return counter


def expect_reads(replica_labels: list[str]) -> None:
    """Replicas are configured: every series of the reads counter starts at 0."""
    for reason in PRIMARY_READ_REASONS:
        _read_counter("primary", reason)
    for label in replica_labels:
        _read_counter(label, "replica")


# -- the feature: the hot path's listeners ---------------------------------------------------


class MeasuredPool(QueuePool):
    """A QueuePool that times each wait for a connection and counts the waits that
    time out. ``engines.make_engine`` uses it for every pooled engine; it measures once
    the Metrics feature names its server, and costs one attribute read until then."""

    _wait: Any = None
    _timeouts: Any = None

    def measure(self, server: str) -> None:
        self._wait, self._timeouts = POOL_WAIT.labels(server), POOL_TIMEOUTS.labels(server)
        POOL_SIZE.labels(server).set(self.size())

    def connect(self) -> Any:
        if self._wait is None:
            return super().connect()
        started = time.perf_counter()
        try:
            connection = super().connect()
        except PoolTimeout:
            self._timeouts.inc()
            raise
        self._wait.observe(time.perf_counter() - started)
        return connection
