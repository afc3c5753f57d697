"""Scenario 14: read replicas under load, served by real gunicorn workers (issue 11).

A primary and a streaming standby (tests/topology). Readers load the index while a
logged-in writer publishes a post every 100 ms; each read records where it was served
(``X-Read-From``) and the newest post it showed, so that its staleness can be judged
against the writer's acknowledged posts:

- with no writes of their own, readers are served by the replica;
- replay paused while writes go on: the replica is taken out once past
  ``DATABASE_REPLICA_MAX_LAG``, no read is staler than that bound (plus one check
  interval), no request fails, and it rejoins after replay resumes;
- the standby stopped and started again: no request fails, and it rejoins within one
  check interval of accepting connections again.

Negative controls: without replicas no read lands on one; with no lag limit a paused
replica serves ever staler pages; without the re-run on the primary a stopped replica
fails requests.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import create_engine, insert
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from myapp.db import replication as replication_module
from myapp.models import Post, User
from tests.db.test_replicas import replica_app, replica_urls, replicas_of, wait_until
from tests.topology import ReplicatedPostgres, replicated_postgres
from tests.topology.fixtures import (  # noqa: F401 (fixtures)
    replicated, replicated_session, require_namespaces, require_postgres,
)

from .conftest import escaped_errors, logged_in_browser, new_client
from .figures import record
from .servers import gunicorn
from .test_topology_smoke import Pending

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn]

INTERVAL = 0.5  # DATABASE_REPLICA_CHECK_INTERVAL of these servers
MAX_LAG = 1.0  # seconds
READERS = 4


@pytest.fixture(scope="module")
def database(replicated_session: ReplicatedPostgres) -> Iterator[URL]:
    """A migrated database with one author and a few posts, replicated."""
    with replicated_session.primary.database() as url:
        engine = create_engine(url, poolclass=NullPool)
        with engine.begin() as connection:
            author = connection.execute(insert(User).values(username="seed", password_hash="x").returning(User.id))
            author_id = author.scalar_one()
            connection.execute(insert(Post), [
                {"author_id": author_id, "title": f"seeded {n}", "body": "seeded", "version": 1} for n in range(30)
            ])
        engine.dispose()
        for standby in replicated_session.standbys:
            replicated_session.wait_for_replay(standby)
        yield url


def server_env(topology: ReplicatedPostgres, database: URL, **overrides: str) -> dict[str, str]:
    return {
        "DATABASE_REPLICA_URLS": replica_urls(topology, database),
        "DATABASE_REPLICA_CHECK_INTERVAL": str(INTERVAL),
        "DATABASE_REPLICA_MAX_LAG": f"{MAX_LAG}s",
        "DATABASE_READ_FROM_HEADER": "1",
        "DATABASE_APP_NAME": "myapp-faults",
        **overrides,
    }


@dataclass
class Read:
    started: float
    status: int | None
    served: str
    newest: int | None  # the highest number among this load's posts on the page


@dataclass
class Load:
    """Readers (anonymous) and one writer, until ``stop()``."""

    base_url: str
    writes: bool = True
    reads: list[Read] = field(default_factory=list)
    acknowledged: dict[int, float] = field(default_factory=dict)  # tick -> time its redirect came back
    failed_writes: int = 0
    tag: str = field(default_factory=lambda: secrets.token_hex(3))  # this load's posts among earlier ones
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        if self.writes:
            browser, token = logged_in_browser(self.base_url, f"ticker{int(time.time() * 1000) % 10**8}")
            self._threads.append(threading.Thread(target=self._write, args=(browser, token)))
        self._threads += [threading.Thread(target=self._read) for _ in range(READERS)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _write(self, browser: requests.Session, token: str) -> None:
        number = 0
        while not self._stop.is_set():
            number += 1
            try:
                response = browser.post(f"{self.base_url}/posts/new", allow_redirects=False, timeout=10,
                                        data={"csrf_token": token, "title": f"tick {self.tag} {number}",
                                              "body": "tick"})
                if response.status_code == 302:
                    self.acknowledged[number] = time.monotonic()
                else:
                    self.failed_writes += 1
            except requests.RequestException:
                self.failed_writes += 1
            self._stop.wait(0.1)

    def _read(self) -> None:
        client = new_client()
        tick = re.compile(rf"tick {self.tag} (\d+)")
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = client.get(f"{self.base_url}/", timeout=10)
            except requests.RequestException:
                self.reads.append(Read(started, None, "", None))
                continue
            ticks = [int(number) for number in tick.findall(response.text)]
            self.reads.append(Read(started, response.status_code, response.headers.get("X-Read-From", ""),
                                   max(ticks) if ticks else None))

    # -- judging the history -------------------------------------------------------------

    def failed_reads(self) -> list[Read]:
        return [read for read in self.reads if read.status != 200]

    def staleness(self, read: Read) -> float:
        """How long before this read started the oldest acknowledged post it misses was
        acknowledged (0: it showed everything acknowledged before it started)."""
        missed = [at for number, at in self.acknowledged.items()
                  if at < read.started and (read.newest is None or number > read.newest)]
        return read.started - min(missed) if missed else 0.0


def _log_checks(log: str) -> tuple[int, int]:
    return log.count(" left: "), log.count(" rejoined ")


# -- reads land on the replica ---------------------------------------------------------------


@pytest.mark.parametrize("with_replicas", [True, False], ids=["replica", "control-no-replicas"])
def test_reads_without_recent_writes_are_served_by_the_replica(
    replicated: ReplicatedPostgres, database: URL, tmp_path: Path, with_replicas: bool
) -> None:
    env = server_env(replicated, database, **({} if with_replicas else {"DATABASE_REPLICA_URLS": ""}))
    with gunicorn(database, tmp_path, **env) as server:
        client = new_client()
        client.get(f"{server.url}/", timeout=10)  # each worker's first read starts its first check
        time.sleep(INTERVAL)
        load = Load(server.url, writes=False).start()
        time.sleep(3)
        load.stop()
        log = server.log_text()
    on_replica = sum(read.served == "replica 1" for read in load.reads) / max(1, len(load.reads))
    scenario = "14 replicas: reads without recent writes"
    control = "" if with_replicas else " (control: no replicas)"
    met = on_replica > 0.9 if with_replicas else on_replica == 0
    record(scenario, "postgresql", "none" + control, "share of reads served by the replica", on_replica,
           "> 0.9" if with_replicas else "0 (control)", met)
    assert not load.failed_reads() and escaped_errors(log) == 0
    assert met, f"{on_replica:.0%} of {len(load.reads)} reads served by the replica"


# -- a paused replica --------------------------------------------------------------------------


def _pause_under_load(topology: ReplicatedPostgres, base_url: str) -> tuple[Load, float, float]:
    standby = topology.standbys[0]
    load = Load(base_url).start()
    time.sleep(2)
    paused_at = time.monotonic()
    topology.pause_replay(standby)
    time.sleep(5)
    resumed_at = time.monotonic()
    topology.resume_replay(standby)
    time.sleep(3)
    load.stop()
    return load, paused_at, resumed_at


@pytest.mark.parametrize("lag_limit", [True, False], ids=["limit", "control-no-limit"])
def test_a_paused_replica_leaves_past_the_lag_limit_and_rejoins(
    replicated: ReplicatedPostgres, database: URL, tmp_path: Path, lag_limit: bool
) -> None:
    env = server_env(replicated, database, **({} if lag_limit else {"DATABASE_REPLICA_MAX_LAG": "1h, 1TB"}))
    with gunicorn(database, tmp_path, **env) as server:
        load, paused_at, resumed_at = _pause_under_load(replicated, server.url)
        log = server.log_text()
    paused = [read for read in load.reads if paused_at <= read.started < resumed_at]
    on_replica = [read for read in paused if read.served == "replica 1"]
    stalest = max((load.staleness(read) for read in load.reads), default=0.0)
    bound = MAX_LAG + INTERVAL + 1.0  # the limit, one check interval, and a second of margin
    scenario = "14 replicas: replay paused for 5 s under writes"
    control = "" if lag_limit else " (control: no lag limit)"
    record(scenario, "postgresql", f"pg_wal_replay_pause(){control}", "stalest read (s)", round(stalest, 2),
           f"<= {bound:g}" if lag_limit else f"> {bound:g} (control)", stalest <= bound if lag_limit else stalest > bound)
    record(scenario, "postgresql", f"pg_wal_replay_pause(){control}", "failed requests",
           len(load.failed_reads()) + load.failed_writes, "0", not load.failed_reads() and not load.failed_writes)
    assert not load.failed_reads() and load.failed_writes == 0 and escaped_errors(log) == 0
    if not lag_limit:
        assert stalest > bound, f"the paused replica served pages only {stalest:.2f} s stale"
        return
    left_after = max((read.started for read in on_replica), default=paused_at) - paused_at
    back = [read.started for read in load.reads if read.started >= resumed_at and read.served == "replica 1"]
    rejoined_after = min(back) - resumed_at if back else float("inf")
    record(scenario, "postgresql", "pg_wal_replay_pause()", "last replica read after the pause (s)",
           round(left_after, 2), f"<= {bound:g}", left_after <= bound)
    record(scenario, "postgresql", "pg_wal_replay_pause()", "first replica read after the resume (s)",
           round(rejoined_after, 2), f"<= {INTERVAL + 1.5:g}", rejoined_after <= INTERVAL + 1.5)
    assert stalest <= bound, f"a read was {stalest:.2f} s stale"
    assert left_after <= bound
    assert rejoined_after <= INTERVAL + 1.5
    assert _log_checks(log)[0] >= 1 and _log_checks(log)[1] >= 1, log[-3000:]


# -- a stopped replica -------------------------------------------------------------------------


def _stop_under_load(topology: ReplicatedPostgres, base_url: str) -> tuple[Load, float]:
    standby = topology.standbys[0]
    load = Load(base_url, writes=False).start()
    time.sleep(1.5)
    topology.stop(standby)
    time.sleep(2)
    topology.start(standby)
    started_at = time.monotonic()
    time.sleep(2.5)
    load.stop()
    return load, started_at


@pytest.mark.parametrize("fallback", [True, False], ids=["fallback", "control-no-fallback"])
def test_a_stopped_replica_fails_no_request_and_rejoins(
    replicated: ReplicatedPostgres, database: URL, tmp_path: Path, fallback: bool
) -> None:
    env = server_env(replicated, database, FAULTS_REPLICA_FALLBACK="1" if fallback else "0")
    with gunicorn(database, tmp_path, fault_app=True, **env) as server:
        load, started_at = _stop_under_load(replicated, server.url)
        log = server.log_text()
    failed = len(load.failed_reads())
    scenario = "14 replicas: standby stopped for 2 s under reads"
    control = "" if fallback else " (control: no re-run on the primary)"
    record(scenario, "postgresql", f"pg_ctl stop -m fast{control}", "failed requests", failed,
           "0" if fallback else "> 0 (control)", failed == 0 if fallback else failed > 0)
    if not fallback:
        assert failed > 0, "no request failed although nothing re-ran the replica's reads"
        return
    back = [read.started for read in load.reads if read.started >= started_at and read.served == "replica 1"]
    rejoined_after = min(back) - started_at if back else float("inf")
    record(scenario, "postgresql", "pg_ctl stop -m fast", "first replica read after the start (s)",
           round(rejoined_after, 2), f"<= {INTERVAL + 1:g}", rejoined_after <= INTERVAL + 1)
    assert failed == 0 and escaped_errors(log) == 0, [read for read in load.failed_reads()][:5]
    assert rejoined_after <= INTERVAL + 1, f"rejoined {rejoined_after:.2f} s after the start"
    assert _log_checks(log)[0] >= 1 and _log_checks(log)[1] >= 1, log[-3000:]


# -- a replica that stops answering without a word -----------------------------------------------


@pytest.fixture(scope="module")
def silent_topology() -> Iterator[ReplicatedPostgres]:
    """A primary on the host and a standby in a network namespace of its own."""
    require_postgres()
    require_namespaces()
    with replicated_postgres(standbys=1, netns_nodes={1}) as topology:
        yield topology


@pytest.mark.parametrize("deadlines", [True, False], ids=["deadlines", "control-no-deadlines"])
def test_a_silent_replica_is_taken_out_within_the_check_deadline(
    silent_topology: ReplicatedPostgres, deadlines: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    standby = silent_topology.standbys[0]
    if not deadlines:
        def without_deadlines(config: Any, url: Any, label: str) -> Any:
            return create_engine(url, isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=0)

        monkeypatch.setattr(replication_module, "make_check_engine", without_deadlines)
    with silent_topology.primary.database() as database:
        silent_topology.wait_for_replay(standby)
        with replica_app(silent_topology, database, DATABASE_NETWORK_TIMEOUT=2) as app:
            replicas = replicas_of(app)
            client = app.test_client()
            assert client.get("/_test/where").headers["X-Read-From"] == "replica 1"
            standby.partition()
            try:
                check = Pending(replicas.check)
                finished = check.done(6)
                scenario = "14 replicas: standby cut off silently (network namespace link down)"
                if not deadlines:
                    record(scenario, "postgresql", "partition (control: checks without deadlines)",
                           "check finished within 6 s", float(finished), "0 (control)", not finished)
                    assert not finished, "a check without deadlines returned from a silent replica"
                    return
                assert finished and check.error is None, check.error
                assert check.seconds is not None
                record(scenario, "postgresql", "partition", "seconds until the replica is out", round(check.seconds, 2),
                       "<= 2 (the kept connection's 1 s tcp_user_timeout, and a margin)", check.seconds <= 2)
                assert replicas.replicas[0].state == "down"
                assert check.seconds <= 2
                started = time.monotonic()
                answers = [client.get("/_test/where") for _ in range(10)]
                assert [answer.headers["X-Read-From"] for answer in answers] == ["primary"] * 10
                assert time.monotonic() - started < 2
            finally:
                standby.heal()
                if not deadlines:
                    check.done(60)
            if deadlines:
                wait_until(lambda: (replicas.check(), replicas.replicas[0].state)[1] == "healthy", 10,
                           "the replica to rejoin after the heal", 0.2)
