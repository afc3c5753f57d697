"""Scenario 18: what a real Prometheus scrapes from the app while the database breaks (issue 18, point 5).

A Prometheus server of the test's own (Debian's; tests/support/prometheus.py) scrapes the
gunicorn master's exporter (``METRICS_BIND``) every second, while real gunicorn workers
(2 x 4 threads) serve the site. The test reads back, in PromQL, what an operator graphs
and alerts on:

- the database link goes down without a word, as in scenario 13 (the same namespaced
  PostgreSQL, shared by the session): ``max(myapp_db_breaker_open)`` reaches 1 within a
  few scrape intervals of the breakers opening, the 503 rate rises, and the series is
  back at 0 within a few scrape intervals of the heal;
- the standby stops and starts again, as in scenario 14 (the same primary and standby):
  ``myapp_db_replica_in_rotation`` falls to 0 once every worker noticed, and is back at 1
  once it returns; its lag in bytes is exported;
- exactly N requests over fresh connections, served by both workers: Prometheus counts N.
  Negative control: a master that serves its own plain registry instead of the
  multiprocess sum (tests/faults/plainmetrics_conf.py) counts none of them;
- ``promtool check metrics`` finds nothing to say about a real scrape.

The series scraped during the partition and the standby's stop are recorded for the
report's chart (docs/reliability-prometheus.png, drawn by scripts/reliability_report.py).
"""

from __future__ import annotations

import math
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy.engine import URL

from tests.db.test_replicas import replica_urls
from tests.support.network import free_port
from tests.support.prometheus import BINARY as PROMETHEUS, Prometheus, available, prometheus, wall_clock
from tests.topology import PgNode, ReplicatedPostgres
from tests.topology.fixtures import (  # noqa: F401 (fixtures)
    netns_postgres, netns_postgres_session, replicated, replicated_session, require,
)

from . import figures
from .conftest import burst, escaped_errors, new_client
from .servers import gunicorn
from .test_replicas import Load

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn, pytest.mark.timeout(150)]

SCENARIO = "18 Prometheus"
SCRAPE = 1.0  # the scrape interval of tests/support/prometheus.py's servers
FEW_SCRAPES = 3 * SCRAPE + 1.0  # three scrape intervals, and a second of polling and margin
STEP = 0.5  # of the range queries drawn in the chart
RATE = "3s"  # rate() window: three scrapes

# Scenario 13's settings, shorter: a statement on the dead link fails after 2 s, and so
# does a connect (libpq's minimum); the pool gives up waiting after 2 s.
NETWORK_TIMEOUT = CONNECT_TIMEOUT = PING_TIMEOUT = 2
BREAKER_RESET = 1.0  # DATABASE_BREAKER_RESET's default
PARTITION_ENV = {
    "DATABASE_NETWORK_TIMEOUT": str(NETWORK_TIMEOUT),
    "DATABASE_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
    "DATABASE_PING_TIMEOUT": str(PING_TIMEOUT),
    "DATABASE_BREAKER_RESET": str(BREAKER_RESET),
    "DATABASE_POOL_TIMEOUT": "2",
    "DATABASE_APP_NAME": "myapp-prometheus",
}
# A worker's breaker opens after DATABASE_BREAKER_THRESHOLD (3) slow failures in a row:
# its three bulkhead slots time out together, or a reconnect waits its connect timeout.
BREAKER_OPENS_WITHIN = NETWORK_TIMEOUT + CONNECT_TIMEOUT + 1.5
# After the heal, a worker's next probe closes its breaker: a probe sent into the dead
# link may first have to time out, then the breaker waits its reset period.
BREAKER_CLOSES_WITHIN = PING_TIMEOUT + BREAKER_RESET + 0.5
PARTITION = 6.0  # the link stays down at least this long, and until the series showed 1
READERS = 6
BREAKER_REFUSAL_SECONDS = 0.1  # a 503 this fast came from an open breaker or the bulkhead, not a timeout
BUSY = "every database connection is in use"  # the bulkhead's 503 page says so (myapp/errors.py)

REPLICA_CHECK_INTERVAL = 0.5  # scenario 14's DATABASE_REPLICA_CHECK_INTERVAL
STOPPED = 3.0  # the standby stays down at least this long, and until the series showed 0
STOP_SECONDS = 2.0  # pg_ctl stop -m fast, on an idle throwaway server, with a margin
CATCH_UP_SECONDS = 1.0  # a restarted standby replays what it missed before it counts as healthy

COUNTED = 300  # requests sent to one endpoint
CLIENTS = 6
PLAIN_CONFIG = "tests/faults/plainmetrics_conf.py"

MAX_BREAKER = "max(myapp_db_breaker_open)"
BREAKER_SERIES = "count(myapp_db_breaker_open)"
UNAVAILABLE_RATE = f"sum(rate(myapp_http_unavailable_total[{RATE}]))"
IN_ROTATION = 'max(myapp_db_replica_in_rotation{replica="replica_1"})'
LAG_BYTES = 'max(myapp_db_replica_lag_bytes{replica="replica_1"})'

# The chart's panels: (title, query, unit). A recording that lacks one shows "not recorded".
BREAKER_PANEL = ("breaker open (per worker)", "max by (pid) (myapp_db_breaker_open)", "1 = open")
# No 503 at all: one line at 0 ("all") rather than an empty panel.
UNAVAILABLE_PANEL = ("503s by cause", f"sum by (cause) (rate(myapp_http_unavailable_total[{RATE}])) or on() vector(0)",
                     "per s")
ROTATION_PANEL = ("replica in rotation", "max by (replica) (myapp_db_replica_in_rotation)", "1 = in")
LAG_PANEL = ("replica lag", "max by (replica) (myapp_db_replica_lag_bytes)", "bytes")
READS_PANEL = ("reads by target", f"sum by (target) (rate(myapp_db_reads_total[{RATE}]))", "per s")


def _seconds(value: float | None) -> float:
    """A measured delay for a figure: None (never seen within the bound) becomes infinity."""
    return float("inf") if value is None else round(value, 2)


def _lint(scrape: str) -> str:
    """What ``promtool check metrics`` says about an exposition (empty: nothing); a
    missing promtool is a skip on a laptop, a failure under CI."""
    require(Path("/usr/bin/promtool").exists(), "no /usr/bin/promtool (Debian's prometheus package)")
    result = subprocess.run(["/usr/bin/promtool", "check", "metrics"], input=scrape, capture_output=True,
                            text=True, timeout=30)
    report = (result.stdout + result.stderr).strip()
    return report or ("" if result.returncode == 0 else f"exit status {result.returncode}")


def _record_chart(server: Prometheus, recording: str, since: float, until: float,
                  panels: list[tuple[str, str, str]], events: list[tuple[float, str]]) -> None:
    """The series Prometheus holds from ``since`` to ``until`` (monotonic readings), for the report."""
    start, end = wall_clock(since), wall_clock(until)
    figures.record_series(recording, "postgresql", start, [
        figures.panel(title, query, server.query_range(query, start, end, step=STEP), start, unit)
        for title, query, unit in panels
    ], events=[(wall_clock(at), label) for at, label in events])


@pytest.fixture(scope="module")
def database(netns_postgres_session: PgNode) -> Iterator[URL]:
    """A migrated database on scenario 13's namespaced PostgreSQL, for this module's tests."""
    with netns_postgres_session.database() as url:
        yield url


@pytest.fixture(scope="module")
def replica_database(replicated_session: ReplicatedPostgres) -> Iterator[URL]:
    """A migrated database on scenario 14's primary, replayed by its standby."""
    with replicated_session.replayed_database() as url:
        yield url


# -- a silent partition: the breaker series -------------------------------------------------------


@dataclass
class Answer:
    started: float
    ended: float
    status: int | None  # None: no answer (a timeout or a reset)
    busy: bool = False  # the bulkhead's 503 ("every database connection is in use"), not the breaker's


@dataclass
class Readers:
    """Anonymous clients reading the index over fresh connections, until ``stop()``."""

    base_url: str
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Readers:
        self._threads = [threading.Thread(target=self._read) for _ in range(READERS)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in self._threads), "a reader did not finish"

    def _read(self) -> None:
        client = new_client()
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = client.get(f"{self.base_url}/", timeout=15)
                answer = Answer(started, time.monotonic(), response.status_code, BUSY in response.text)
            except requests.RequestException:
                answer = Answer(started, time.monotonic(), None)
            self.answers.append(answer)
            self._stop.wait(0.05)

    def first_refusal(self, after: float) -> float | None:
        """When the first request that an open breaker refused at once was sent: a 503
        in less than a statement's round trip, and not the bulkhead's (which refuses at
        once too, when every slot's holder has waited on the dead link half a second)."""
        fast = [answer.started for answer in self.answers if answer.started >= after and answer.status == 503
                and not answer.busy and answer.ended - answer.started < BREAKER_REFUSAL_SECONDS]
        return min(fast) if fast else None


def test_the_breaker_series_follows_a_silent_partition(
    prometheus_server: Prometheus, netns_postgres: PgNode, database: URL, tmp_path: Path
) -> None:
    bind = prometheus_server.targets[0]
    with gunicorn(database, tmp_path, METRICS_BIND=bind, **PARTITION_ENV) as server:
        # Each worker sets its breaker's series to 0 as it builds the app: two series.
        both = prometheus_server.wait_until(BREAKER_SERIES, lambda count: count == 2, time.monotonic(), FEW_SCRAPES)
        assert both is not None, prometheus_server.query("myapp_db_breaker_open")
        readers = Readers(server.url).start()
        began = time.monotonic()
        to_one = to_zero = None
        try:
            time.sleep(2.0)
            closed_before = prometheus_server.value(MAX_BREAKER)
            cut_at = time.monotonic()
            netns_postgres.partition()
            to_one = prometheus_server.wait_until(MAX_BREAKER, lambda value: value == 1, cut_at,
                                                  BREAKER_OPENS_WITHIN + FEW_SCRAPES)
            time.sleep(max(0.0, cut_at + PARTITION - time.monotonic()))
            link_up_at = time.monotonic()
            netns_postgres.heal()
            healed_at = time.monotonic()  # the server answers a new connection again
            to_zero = prometheus_server.wait_until(MAX_BREAKER, lambda value: value == 0, healed_at,
                                                   BREAKER_CLOSES_WITHIN + FEW_SCRAPES)
            time.sleep(2.0)  # the 503 rate's window empties, for the chart
        finally:
            if netns_postgres.netns is not None and netns_postgres.netns.partitioned:
                netns_postgres.heal()
            readers.stop()
        ended = time.monotonic()
        scrape = requests.get(server.metrics_url, timeout=10).text
        log = server.log_text()

    unavailable_before = prometheus_server.value(UNAVAILABLE_RATE, at=wall_clock(cut_at))
    during = prometheus_server.query_range(UNAVAILABLE_RATE, wall_clock(cut_at), wall_clock(link_up_at) + SCRAPE,
                                           step=STEP)
    peak_rate = max((value for _, points in during for _, value in points if math.isfinite(value)), default=0.0)
    refused_at = readers.first_refusal(cut_at)
    seen_at = None if to_one is None else cut_at + to_one
    after_refusal = None if seen_at is None or refused_at is None else seen_at - refused_at
    _record_chart(prometheus_server, f"{SCENARIO} (database link down)", began - 1.0, ended,
                  [BREAKER_PANEL, UNAVAILABLE_PANEL],
                  [(cut_at, "link down"), (link_up_at, "link up")])

    injected = f"link down {PARTITION:g} s under {READERS} readers; 2 workers; scraped every {SCRAPE:g} s"
    opens_bound = BREAKER_OPENS_WITHIN + FEW_SCRAPES
    closes_bound = BREAKER_CLOSES_WITHIN + FEW_SCRAPES
    checks = [
        ("seconds from link down to max(breaker_open) = 1", _seconds(to_one),
         f"<= {opens_bound:g} (breakers open, then 3 scrapes)", to_one is not None),
        ("seconds from the first breaker 503 to max(breaker_open) = 1", _seconds(after_refusal),
         f"<= {FEW_SCRAPES:g} (3 scrapes)", after_refusal is not None and after_refusal <= FEW_SCRAPES),
        ("seconds from the heal (the server answers again) to max(breaker_open) = 0", _seconds(to_zero),
         f"<= {closes_bound:g} (a probe, then 3 scrapes)", to_zero is not None),
        ("peak 503 rate during the partition (1/s)", round(peak_rate, 2), "> 0 (0 before)",
         peak_rate > 0 and not unavailable_before),
    ]
    for figure, value, goal, met in checks:
        figures.record(SCENARIO, "postgresql", injected, figure, value, goal, met)

    assert closed_before == 0, closed_before
    assert to_one is not None, f"max(breaker_open) did not reach 1 within {opens_bound:g} s of the link going down"
    assert refused_at is not None, "no client saw an open breaker's fast 503"
    assert after_refusal is not None and after_refusal <= FEW_SCRAPES, after_refusal
    assert to_zero is not None, f"max(breaker_open) was not back at 0 within {closes_bound:g} s of the heal"
    assert not unavailable_before, f"503s before the partition: {unavailable_before}"
    assert peak_rate > 0, during
    assert "database circuit open" in log and escaped_errors(log) == 0
    assert _lint(scrape) == ""


# -- a stopped standby: the replica series ------------------------------------------------------


def test_the_replica_series_follows_a_stopped_standby(
    prometheus_server: Prometheus, replicated: ReplicatedPostgres, replica_database: URL, tmp_path: Path
) -> None:
    standby = replicated.standbys[0]
    env = {
        "DATABASE_REPLICA_URLS": replica_urls(replicated, replica_database),
        "DATABASE_REPLICA_CHECK_INTERVAL": str(REPLICA_CHECK_INTERVAL),
        "DATABASE_REPLICA_MAX_LAG": "1s",
        "DATABASE_APP_NAME": "myapp-prometheus",
        "METRICS_BIND": prometheus_server.targets[0],
    }
    joined_bound = REPLICA_CHECK_INTERVAL + FEW_SCRAPES
    out_bound = STOP_SECONDS + REPLICA_CHECK_INTERVAL + FEW_SCRAPES
    back_bound = CATCH_UP_SECONDS + REPLICA_CHECK_INTERVAL + FEW_SCRAPES
    with gunicorn(replica_database, tmp_path, **env) as server:
        load = Load(server.url).start()  # readers and a writer, as in scenario 14
        began = time.monotonic()
        out = back = None
        try:
            # The workers check their replica as reads come in: it joins, on each of them.
            joined = prometheus_server.wait_until(IN_ROTATION, lambda value: value == 1, began, joined_bound)
            assert joined is not None, prometheus_server.query("myapp_db_replica_in_rotation")
            time.sleep(1.0)
            stop_at = time.monotonic()
            replicated.stop(standby)
            out = prometheus_server.wait_until(IN_ROTATION, lambda value: value == 0, stop_at, out_bound)
            time.sleep(max(0.0, stop_at + STOPPED - time.monotonic()))
            replicated.start(standby)
            started_at = time.monotonic()  # it accepts connections again
            back = prometheus_server.wait_until(IN_ROTATION, lambda value: value == 1, started_at, back_bound)
            time.sleep(2.5)  # the series back at 1 for a while, for the chart
        finally:
            load.stop()  # the replicated fixture restarts a standby a failure left stopped
        ended = time.monotonic()
        lag_bytes = prometheus_server.value(LAG_BYTES)
        lag_seconds = prometheus_server.value('max(myapp_db_replica_lag_seconds{replica="replica_1"})')
        scrape = requests.get(server.metrics_url, timeout=10).text
        log = server.log_text()

    _record_chart(prometheus_server, f"{SCENARIO} (standby stopped)", began - 1.0, ended,
                  [BREAKER_PANEL, UNAVAILABLE_PANEL, ROTATION_PANEL, LAG_PANEL, READS_PANEL],
                  [(stop_at, "standby stopped"), (started_at, "standby started")])

    injected = f"standby stopped {STOPPED:g} s (pg_ctl stop -m fast) under reads and writes; 2 workers"
    checks = [
        ("seconds from the stop to max(replica_in_rotation) = 0", _seconds(out),
         f"<= {out_bound:g} (the stop, a check, 3 scrapes)", out is not None),
        ("seconds from the start to max(replica_in_rotation) = 1", _seconds(back),
         f"<= {back_bound:g} (catching up, a check, 3 scrapes)", back is not None),
    ]
    for figure, value, goal, met in checks:
        figures.record(SCENARIO, "postgresql", injected, figure, value, goal, met)

    assert out is not None, f"replica_1 still in rotation {out_bound:g} s after the stop"
    assert back is not None, f"replica_1 not back in rotation {back_bound:g} s after the start"
    assert lag_bytes is not None and lag_bytes >= 0, "myapp_db_replica_lag_bytes is not exported"
    assert lag_seconds is not None and lag_seconds >= 0, "myapp_db_replica_lag_seconds is not exported"
    assert " left: " in log and " rejoined " in log and escaped_errors(log) == 0, log[-3000:]
    assert _lint(scrape) == ""


# -- the counts add up across workers ------------------------------------------------------------


def _served_per_worker(folder: Path, endpoint: str) -> dict[str, float]:
    """Requests to ``endpoint`` in each worker's own file of the multiprocess folder."""
    served = {}
    for path in sorted(folder.glob("counter_*.db")):
        merged = MultiProcessCollector.merge([str(path)], accumulate=False)  # type: ignore[no-untyped-call]
        served[path.stem.removeprefix("counter_")] = sum(
            sample.value for metric in merged for sample in metric.samples
            if sample.name == "myapp_http_requests_total" and sample.labels.get("endpoint") == endpoint)
    return served


def test_prometheus_counts_every_request_of_every_worker(database: URL, tmp_path: Path) -> None:
    """One Prometheus scrapes two masters: the project's (multiprocess sum of the workers)
    and the negative control's (the master's own registry). Each server gets exactly
    COUNTED requests to the index, over fresh connections that both workers accept."""
    require(available(), f"no {PROMETHEUS}: apt-get install prometheus")
    summed, plain = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    folder = tmp_path / "multiprocess"
    endpoint = "posts.index"

    def counted(instance: str) -> str:
        return f'sum(myapp_http_requests_total{{instance="{instance}",endpoint="{endpoint}"}})'

    with (prometheus([summed, plain]) as server,
          gunicorn(database, tmp_path / "summed", METRICS_BIND=summed, PROMETHEUS_MULTIPROC_DIR=str(folder)) as app,
          gunicorn(database, tmp_path / "plain", config=PLAIN_CONFIG, METRICS_BIND=plain) as control):
        answers = burst(control.url, ["/"] * COUNTED, CLIENTS) + burst(app.url, ["/"] * COUNTED, CLIENTS)
        sent_at, sent_wall = time.monotonic(), time.time()
        served = _served_per_worker(folder, endpoint)
        settled = server.wait_until(counted(summed), lambda value: value == COUNTED, sent_at, FEW_SCRAPES)
        # The control's last request was answered before the other server's first: once
        # Prometheus has scraped the control after ``sent_at``, its count is final.
        control_scraped = server.wait_until(f'timestamp(up{{instance="{plain}"}})',
                                            lambda at: at is not None and at > sent_wall, sent_at, FEW_SCRAPES)
        total, control_total = server.value(counted(summed)), server.value(counted(plain))
        control_up = server.value(f'up{{instance="{plain}"}}')
        control_serves = server.value(f'count({{instance="{plain}",__name__=~"process_.*"}})')
        logs = app.log_text() + control.log_text()

    injected = f"{COUNTED} requests to / over fresh connections, {CLIENTS} clients, 2 workers"
    fewest = min(served.values(), default=0.0)
    control_injected = f"{injected} (control: the master serves its own registry, no multiprocess folder)"
    for scenario, shown, figure, value, goal, met in [
        (SCENARIO, injected, "requests Prometheus counted (sum over workers)", total or 0.0, f"= {COUNTED}",
         total == COUNTED),
        (SCENARIO, injected, "requests the less busy worker served", fewest, "> 0", fewest > 0),
        (SCENARIO, injected, "seconds from the last request until Prometheus counted all", _seconds(settled),
         f"<= {FEW_SCRAPES:g} (3 scrapes)", settled is not None),
        (f"{SCENARIO}, negative control", control_injected, "requests Prometheus counted", control_total or 0.0,
         f"!= {COUNTED} (control)", control_total != COUNTED),
    ]:
        figures.record(scenario, "postgresql", shown, figure, value, goal, met)

    assert [answer.status for answer in answers] == [200] * (2 * COUNTED), {a.status for a in answers}
    assert escaped_errors(logs) == 0
    assert len(served) == 2 and fewest > 0 and sum(served.values()) == COUNTED, served
    assert settled is not None and total == COUNTED, total
    # The control's exporter answered every scrape (process metrics of the master), yet
    # the workers' requests are nowhere in it.
    assert control_up == 1 and control_serves, (control_up, control_serves)
    assert control_scraped is not None and control_total != COUNTED, (control_scraped, control_total)


# -- promtool ---------------------------------------------------------------------------------------


def test_promtool_finds_nothing_wrong_in_a_real_scrape(database: URL, tmp_path: Path) -> None:
    """The scrape a Prometheus would take from the master, after requests that fill in
    the labelled families, passes ``promtool check metrics``. The check is not blind: the
    same scrape with one family named against the conventions is reported."""
    with gunicorn(database, tmp_path) as server:
        client = new_client()
        statuses = [client.get(f"{server.url}{path}", timeout=10).status_code
                    for path in ("/", "/", "/healthz", "/readyz", "/no-such-page", "/auth/login")]
        scrape = requests.get(server.metrics_url, timeout=10).text
        public = requests.get(f"{server.url}/metrics", timeout=10).status_code
    families = {line.split()[2] for line in scrape.splitlines() if line.startswith("# TYPE ")}
    expected = {"myapp_http_requests_total", "myapp_http_request_duration_seconds", "myapp_db_statements_per_request",
                "myapp_db_statement_duration_seconds", "myapp_db_pool_wait_seconds", "myapp_db_pool_checked_out",
                "myapp_db_breaker_open", "myapp_db_connections_opened_total"}
    assert statuses == [200, 200, 200, 200, 404, 200] and public == 404, (statuses, public)
    assert expected <= families, sorted(expected - families)
    assert _lint(scrape) == ""

    misnamed = "# HELP myapp_probe_wait_milliseconds A wait, in the wrong unit.\n" \
               "# TYPE myapp_probe_wait_milliseconds gauge\nmyapp_probe_wait_milliseconds 3.0\n"
    assert "myapp_probe_wait_milliseconds" in _lint(scrape + misnamed)
