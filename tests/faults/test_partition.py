"""Scenario 13: the database host vanishes without a word (a silent partition).

The database runs in a network namespace of its own; taking its link down drops every
packet, with no RST and no FIN. Eight clients read through real gunicorn workers
(2 x 4 threads) while two pollers ask ``/healthz`` every 0.2 s; the link goes down for
PARTITION seconds, then comes back.

What must hold: every request gets an answer within the network timeout plus the
connect timeout (a 503 that says the action may or may not have been saved, with
Retry-After), the breaker opens and answers at once after a few failures, ``/healthz``
answers within 1 s throughout (its first seconds included, thanks to the bulkhead),
and reads succeed again within 2 s of the link coming back.

Negative controls (PostgreSQL): without network timeouts the requests in flight hang
for the whole partition; with timeouts but no breaker and no bulkhead every thread of
a worker waits on the database and ``/healthz`` misses its 1 s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from sqlalchemy import event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError

from myapp.db import engines
from tests.support.apps import make_app

from tests.topology import NamespacedMariaDB, PgNode
from tests.topology.fixtures import (  # noqa: F401 (fixtures)
    netns_mariadb, netns_mariadb_session, netns_postgres, netns_postgres_session,
)

from .conftest import escaped_errors
from .figures import record
from .servers import gunicorn

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn]

NETWORK_TIMEOUT = 3
CONNECT_TIMEOUT = 2
BEFORE, PARTITION, AFTER = 3.0, 12.0, 5.0
READERS, POLLERS = 8, 2
CLIENT_TIMEOUT = 30.0
# A request may wait for its statement to time out, then for one connect attempt.
BOUND = NETWORK_TIMEOUT + CONNECT_TIMEOUT + 1.5
APP_ENV = {
    "DATABASE_NETWORK_TIMEOUT": str(NETWORK_TIMEOUT),
    "DATABASE_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
    "DATABASE_POOL_TIMEOUT": "2",
    "DATABASE_APP_NAME": "myapp-partition",
}
MAY_HAVE_BEEN_SAVED = "may or may not have been saved"


@dataclass
class Answer:
    path: str
    started: float
    ended: float
    status: int | None  # None: no answer within CLIENT_TIMEOUT
    retry_after: str | None
    saved_warning: bool

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Run:
    answers: list[Answer] = field(default_factory=list)
    cut_at: float = 0.0
    healed_at: float = 0.0
    readyz_while_cut: list[tuple[int, dict[str, object]]] = field(default_factory=list)

    def during(self, path: str) -> list[Answer]:
        return [a for a in self.answers if a.path == path and a.ended >= self.cut_at and a.started <= self.healed_at]

    def first_read_success_after_heal(self) -> float:
        times = [a.ended for a in self.answers if a.path == "/" and a.status == 200 and a.started >= self.healed_at]
        return round(min(times) - self.healed_at, 2) if times else float("inf")


def run_partition(base_url: str, node: PgNode | NamespacedMariaDB) -> Run:
    """Readers and pollers against ``base_url`` while ``node`` is cut off, then healed."""
    run = Run()
    lock = threading.Lock()
    stop = threading.Event()

    def ask(session: requests.Session, path: str) -> None:
        begin = time.monotonic()
        try:
            response = session.get(base_url + path, timeout=CLIENT_TIMEOUT)
            answer = Answer(path, begin, time.monotonic(), response.status_code, response.headers.get("Retry-After"),
                            MAY_HAVE_BEEN_SAVED in response.text)
        except requests.RequestException:
            answer = Answer(path, begin, time.monotonic(), None, None, False)
        with lock:
            run.answers.append(answer)

    def reader() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                ask(session, "/")

    def poller() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                ask(session, "/healthz")
                time.sleep(0.2)

    threads = [threading.Thread(target=reader) for _ in range(READERS)]
    threads += [threading.Thread(target=poller) for _ in range(POLLERS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(BEFORE)
        run.cut_at = time.monotonic()
        node.partition()
        time.sleep(PARTITION / 2)
        for _ in range(4):  # a new connection each: both workers get asked
            response = requests.get(base_url + "/readyz", timeout=CLIENT_TIMEOUT)
            run.readyz_while_cut.append((response.status_code, response.json()))
        time.sleep(max(0.0, run.cut_at + PARTITION - time.monotonic()))
        node.heal()
        run.healed_at = time.monotonic()
        time.sleep(AFTER)
    finally:
        if node.netns is not None and node.netns.partitioned:
            node.heal()
        stop.set()
        for thread in threads:
            thread.join(CLIENT_TIMEOUT + 5)
    assert not any(thread.is_alive() for thread in threads), "a client did not finish"
    return run


@pytest.fixture(params=["postgresql", "mysql"])
def cut_off_server(request: pytest.FixtureRequest) -> PgNode | NamespacedMariaDB:
    name = "netns_postgres" if request.param == "postgresql" else "netns_mariadb"
    server: PgNode | NamespacedMariaDB = request.getfixturevalue(name)
    return server


@pytest.fixture
def cut_off_db(cut_off_server: PgNode | NamespacedMariaDB) -> Iterator[URL]:
    with cut_off_server.database() as url:
        yield url


def _backend(server: PgNode | NamespacedMariaDB) -> str:
    return "postgresql" if isinstance(server, PgNode) else "mysql"


def test_a_silent_partition_gets_fast_503s_and_healthz_keeps_answering(
    cut_off_server: PgNode | NamespacedMariaDB, cut_off_db: URL, tmp_path: Path
) -> None:
    with gunicorn(cut_off_db, tmp_path / "gunicorn", **APP_ENV) as server:
        run = run_partition(server.url, cut_off_server)
        log = server.log_text()
    reads, probes = run.during("/"), run.during("/healthz")
    unanswered = [a for a in run.answers if a.status is None]
    errors = [a for a in run.answers if a.status is not None and a.status >= 500 and a.status != 503]
    unavailable = [a for a in reads if a.status == 503]
    slowest_read = round(max(a.seconds for a in reads), 2)
    slowest_probe = round(max(a.seconds for a in probes), 2)
    refused_at_once = sum(a.status == 503 and a.seconds < 0.1 for a in reads)
    recovery = run.first_read_success_after_heal()
    readiness = [status for status, _ in run.readyz_while_cut]
    breaker_states = [str(body.get("reason", "")) for _, body in run.readyz_while_cut]

    backend = _backend(cut_off_server)
    scenario, injected = "13 silent partition", f"link down {PARTITION:g} s under {READERS} readers + {POLLERS} pollers"
    figures = [
        ("reads during the partition", len(reads), "-", True),
        ("503s during the partition", len(unavailable), "> 0, each with Retry-After",
         bool(unavailable) and all(a.retry_after for a in unavailable)),
        ("slowest read during the partition (s)", slowest_read, f"< {BOUND:g} (network + connect timeout)",
         slowest_read < BOUND),
        ("503s answered in < 0.1 s (breaker open)", refused_at_once, "> 0", refused_at_once > 0),
        ("slowest /healthz during the partition (s)", slowest_probe, "< 1", slowest_probe < 1),
        ("unanswered requests", len(unanswered), "0", not unanswered),
        ("500s", len(errors), "0", not errors),
        ("seconds to first read after healing", recovery, "< 2", recovery < 2),
    ]
    for figure, value, goal, met in figures:
        record(scenario, backend, injected, figure, value, goal, met)

    assert not unanswered and not errors, (unanswered[:3], errors[:3])
    assert unavailable and all(a.retry_after and a.saved_warning for a in unavailable)
    assert slowest_read < BOUND
    assert refused_at_once > 0
    # Each worker has its own breaker: not ready on every worker, and each says why (its
    # open breaker, or, asked before that worker's breaker opened, the ping's timeout).
    # That the breakers open is shown by the fast 503s above and the log below.
    assert readiness == [503] * len(readiness), run.readyz_while_cut
    assert all(state.startswith(("circuit breaker open", "circuit breaker probing")) or "timed out" in state
               or "timeout expired" in state for state in breaker_states), breaker_states
    assert slowest_probe < 1, slowest_probe
    assert recovery < 2, recovery
    assert "database circuit open" in log and "database circuit closed" in log
    assert escaped_errors(log) == 0


@pytest.mark.parametrize(
    ("control", "env"),
    [
        pytest.param("no network timeouts", {"DATABASE_NETWORK_TIMEOUT": "0"}, id="no-timeouts"),
        pytest.param("no breaker, no bulkhead", {"DATABASE_BREAKER_THRESHOLD": "0", "DATABASE_BULKHEAD": "0"},
                     id="no-breaker"),
    ],
)
def test_negative_controls(netns_postgres: PgNode, tmp_path: Path, control: str, env: dict[str, str]) -> None:
    with netns_postgres.database() as url, gunicorn(url, tmp_path / "gunicorn", **{**APP_ENV, **env}) as server:
        run = run_partition(server.url, netns_postgres)
    reads, probes = run.during("/"), run.during("/healthz")
    slowest_read = round(max(a.seconds for a in reads), 2)
    slowest_probe = round(max(a.seconds for a in probes), 2)
    scenario = "13 silent partition, negative control"
    if control == "no network timeouts":
        # Reads in flight wait for the link to come back, far past the bound.
        record(scenario, "postgresql", control, "slowest read during the partition (s)", slowest_read,
               f">= {PARTITION / 2:g} (the partition hangs)", slowest_read >= PARTITION / 2)
        assert slowest_read >= PARTITION / 2, slowest_read
    else:
        # Every thread waits on the database: /healthz waits with them.
        record(scenario, "postgresql", control, "slowest /healthz during the partition (s)", slowest_probe,
               ">= 1 (threads pile up)", slowest_probe >= 1)
        assert slowest_probe >= 1, slowest_probe


@pytest.mark.parametrize("window", ["real", "control"])
def test_a_connection_idle_past_the_window_is_pinged_not_handed_out(
    netns_postgres: PgNode, monkeypatch: pytest.MonkeyPatch, window: str
) -> None:
    """The free pre-ping applies only to a connection checked in moments ago: after a
    silent partition a pooled connection idle for longer gets a real ping, which fails,
    and the view is never given it (the request fails connecting instead). Control: with
    the shortcut applied whatever the age, the dead connection reaches the statement."""
    if window == "control":
        monkeypatch.setattr(engines, "QUIET_PING_WINDOW", 1e9)
    with netns_postgres.database() as url:
        app = make_app(url, DATABASE_NETWORK_TIMEOUT=2, DATABASE_CONNECT_TIMEOUT=2, DATABASE_BREAKER_THRESHOLD=0)
        engine = app.extensions["myapp.database"].engine
        errors: list[str] = []
        event.listen(engine, "handle_error", lambda context: errors.append(
            "pre-ping" if context.is_pre_ping else "connect" if context.connection is None else "statement"))
        with engine.connect() as connection:  # one pooled connection, then quiet
            connection.execute(text("SELECT 1"))
        netns_postgres.partition()
        try:
            time.sleep(engines.QUIET_PING_WINDOW + 0.5 if window == "real" else 1.5)
            with pytest.raises(OperationalError):
                with engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
        finally:
            netns_postgres.heal()
            engine.dispose()
    if window == "real":
        assert errors[0] == "pre-ping" and "statement" not in errors, errors
    else:
        assert errors == ["statement"], errors
