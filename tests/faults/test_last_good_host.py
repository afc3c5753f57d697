"""Scenario 19c: a URL that lists two PostgreSQL hosts, the first gone silent (its link
is down: no refusal, no reset), as after an unplanned failover whose old primary is
still listed first. Each new connection after the first must go straight to the host
that answered (myapp/db/hosts.py), not spend the connect timeout on the silent one.

Negative control: the ordering removed; every new connection waits out the timeout.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import URL, text

import myapp.db.engines
from tests.support.apps import make_app
from tests.support.servers import ThrowawayServer
from tests.topology import PgNode
from tests.topology.fixtures import netns_postgres, netns_postgres_session  # noqa: F401 (fixtures)

from .figures import record

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]

CONNECT_TIMEOUT = 2  # libpq's shortest
ROUNDS = 5


def _new_connection_seconds(silent: PgNode, live: ThrowawayServer) -> list[float]:
    """Seconds for each of ROUNDS new connections (the pool emptied before each)."""
    url = URL.create("postgresql+psycopg", username="postgres", database="postgres",
                     query={"host": [f"{silent.address}:{silent.port}", f"127.0.0.1:{live.port}"],
                            "target_session_attrs": "read-write"})
    app = make_app(url, DATABASE_CONNECT_TIMEOUT=CONNECT_TIMEOUT, DATABASE_BREAKER_THRESHOLD=0)
    engine = app.extensions["myapp.database"].engine
    times = []
    try:
        for _ in range(ROUNDS):
            engine.dispose()
            started = time.monotonic()
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            times.append(time.monotonic() - started)
    finally:
        engine.dispose()
    return times


def test_new_connections_go_to_the_host_that_answered_last(
    netns_postgres: PgNode, throwaway_postgres: ThrowawayServer  # noqa: F811
) -> None:
    netns_postgres.partition()
    times = _new_connection_seconds(netns_postgres, throwaway_postgres)
    later = max(times[1:])
    scenario, injected = "19c last good host", "the first listed host's link down (silent)"
    record(scenario, "postgresql", injected, "first new connection (s)", round(times[0], 2),
           f">= {CONNECT_TIMEOUT} (it meets the silent host once)", times[0] >= CONNECT_TIMEOUT - 0.1)
    record(scenario, "postgresql", injected, f"slowest of the next {ROUNDS - 1} new connections (s)",
           round(later, 3), "< 0.5", later < 0.5)
    assert times[0] >= CONNECT_TIMEOUT - 0.1 and later < 0.5, times


def test_negative_control_in_the_listed_order_each_connection_waits(
    netns_postgres: PgNode, throwaway_postgres: ThrowawayServer, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    monkeypatch.setattr(myapp.db.engines, "prefer_the_last_good_host", lambda engine: None)
    netns_postgres.partition()
    times = _new_connection_seconds(netns_postgres, throwaway_postgres)
    record("19c last good host, negative control", "postgresql", "listed order kept",
           f"fastest of the {ROUNDS} new connections (s)", round(min(times), 2),
           f">= {CONNECT_TIMEOUT} (each waits)", min(times) >= CONNECT_TIMEOUT - 0.1)
    assert min(times) >= CONNECT_TIMEOUT - 0.1, times
