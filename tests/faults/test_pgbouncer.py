"""Issue 10, point 4: the app behind PgBouncer in transaction pooling mode.

Debian's PgBouncer 1.18 (``tests/topology/pgbouncer.py``, ``default_pool_size=2``) sits
in front of the fault suite's throwaway PostgreSQL; real gunicorn workers (2 x 4
threads) talk to it. In transaction pooling a client's consecutive transactions may
run on different server connections, so with ``DATABASE_PGBOUNCER=transaction`` the
app must keep no state on a server connection:

- no server-side prepared statements (psycopg prepares a query on its sixth run, and
  the next transaction may land where that statement does not exist, or where another
  client already prepared one of the same name);
- the statement timeout set per transaction (``SET LOCAL``), since PgBouncer refuses
  the startup ``options`` a direct connection uses.

What is shown, each with its negative control:

1. Every route, hundreds of times by 8 concurrent clients, answers as it should: reads,
   writes (create, edit, delete: the acknowledged ones are in the database), failed
   logins counted exactly by the rate-limit storage in the app's database, /readyz.
   Once with the read-only fast path (no statement timeout), once with a statement
   timeout (``SET LOCAL``, every unit in a transaction). Control: the same load without
   the setting meets ``prepared statement "_pg3_N" does not exist`` / ``already exists``.
2. A slow query is cancelled by the per-transaction statement timeout, which no later
   client of the same server connection inherits. Control: without the setting,
   PgBouncer refuses the connection ("unsupported startup parameter: options").
3. A PgBouncer restart, and a restart of the PostgreSQL server behind it, under load are
   survived like a direct restart (the harness of ``tests/faults/test_restart.py``):
   503s with Retry-After while down, and after it until each worker's circuit breaker
   has probed (at most DATABASE_BREAKER_RESET), no 500, nothing hung, no acknowledged
   write lost. Control: with PgBouncer's default ``server_login_retry`` (15 s), new
   clients are still refused, and a connected client's query still waits, seconds
   after the server is back.
"""

from __future__ import annotations

import os
import re
import secrets
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import requests
import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.engine import URL

from myapp.db import db
from tests.support.apps import make_app
from tests.support.servers import ThrowawayServer
from tests.topology import PgBouncer, pgbouncer
from tests.topology.fixtures import bouncer, require  # noqa: F401 (fixture)
from tests.topology.pgbouncer import BINARY as PGBOUNCER

from .conftest import PASSWORD, escaped_errors, logged_in_browser
from .figures import record
from .servers import gunicorn
from .test_restart import (
    APP_ENV, CLIENT_TIMEOUT, CLIENTS, MAY_HAVE_BEEN_SAVED, judge, logged_errors, run_load, titles_in,
)
from .test_topology_smoke import Pending

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn]

BACKEND = "postgresql"
DEFAULT_POOL_SIZE = 2
# PgBouncer waits this long after a failed server login before it tries again, and
# meanwhile refuses every new client at once and queues the queries of connected ones.
# Its default (15 s) would keep the site down for up to 15 s after the server is back.
SERVER_LOGIN_RETRY = 1

FAST_PATH = {"DATABASE_PGBOUNCER": "transaction"}
SET_LOCAL = {"DATABASE_PGBOUNCER": "transaction", "DATABASE_STATEMENT_TIMEOUT": "5000"}
PREPARED: dict[str, str] = {}  # the negative control: what a direct connection does

LOGIN_LIMIT = 5  # failed logins per username and minute
RATE_LIMITS = {
    "RATELIMIT_ENABLED": "true",
    "LOGIN_RATE_LIMIT": f"{LOGIN_LIMIT} per minute",
    # Every client is 127.0.0.1: the per-address limit must not be the one that bites.
    "LOGIN_RATE_LIMIT_PER_ADDRESS": "100000 per minute",
}

ROUNDS = 25  # per client: 8 x 25 = 200 requests per route
PER_ROUTE = 200  # "hundreds of times"
LOAD_DEADLINE = 60.0  # seconds; a slower run stops there, and fails for too few requests
ROUTES: dict[str, set[int]] = {  # what each route must answer
    "index": {200},
    "index page 2": {200},
    "post": {200},
    "user": {200},
    "create": {302},
    "edit": {302},
    "delete": {302},
    "failed login": {200, 429},
    "readyz": {200},
}
SEED_POSTS = 3  # per client before the load: with 8 clients, the index has a page 2
# This box has 2 cores shared with other test runs, and behind default_pool_size=2 a
# request waits in PgBouncer's queue while it holds its bulkhead slot: 0.5 s (the
# default) then turns a slow moment into a "busy" 503, which says nothing about
# PgBouncer. Every other setting is the default.
LOADED_BOX = {"DATABASE_BULKHEAD_TIMEOUT": "5"}
PREPARED_STATEMENT_ERROR = re.compile(r'prepared statement "_pg3_\d+" (does not exist|already exists)')


# -- the topology ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bouncer_session(throwaway_postgres: ThrowawayServer) -> Iterator[PgBouncer]:
    """PgBouncer in front of the fault suite's throwaway PostgreSQL.

    Overrides the fixture of tests/topology/fixtures.py for this module (whose
    ``bouncer`` fixture, imported above, restarts it before each test): that one hides
    its server, and these tests must restart the server and create databases on it.
    """
    require(os.access(PGBOUNCER, os.X_OK), f"no {PGBOUNCER}: apt-get install pgbouncer")
    with pgbouncer("127.0.0.1", throwaway_postgres.port, default_pool_size=DEFAULT_POOL_SIZE,
                   server_login_retry=SERVER_LOGIN_RETRY) as running:
        yield running


@dataclass
class Stack:
    server: ThrowawayServer
    bouncer: PgBouncer
    direct: URL  # the test's migrated database, straight to the server

    @property
    def url(self) -> URL:
        """The same database through PgBouncer."""
        assert self.direct.database is not None
        return self.bouncer.url(self.direct.database)


@pytest.fixture
def stack(throwaway_postgres: ThrowawayServer, bouncer: PgBouncer) -> Iterator[Stack]:  # noqa: F811
    throwaway_postgres.ensure_running()
    with throwaway_postgres.database() as direct:
        try:
            yield Stack(throwaway_postgres, bouncer, direct)
        finally:
            throwaway_postgres.ensure_running()  # a failed restart test must not leave it down


# -- every route, hundreds of times ------------------------------------------------------------


@dataclass
class Hit:
    route: str
    status: int | None  # None: no answer within the client timeout, or the connection reset
    seconds: float
    detail: str = ""  # the start of an unexpected answer


@dataclass
class Load:
    hits: list[Hit] = field(default_factory=list)
    seconds: float = 0.0
    present: set[str] = field(default_factory=set)  # titles acknowledged last: in the database
    absent: set[str] = field(default_factory=set)  # titles deleted or edited away (acknowledged)
    logins: dict[str, list[int | None]] = field(default_factory=dict)  # username: statuses in order

    def errors(self) -> list[Hit]:
        return [hit for hit in self.hits if hit.status not in ROUTES[hit.route]]

    def count(self, route: str) -> int:
        return sum(hit.route == route for hit in self.hits)


class Client:
    """One logged-in browser that runs every route in turn and keeps what it got."""

    def __init__(self, base_url: str, username: str, load: Load, lock: threading.Lock) -> None:
        self.base_url, self.username, self.load, self.lock = base_url, username, load, lock
        self.browser, self.token = logged_in_browser(base_url, username)

    def call(self, route: str, method: str, path: str, **form: str) -> requests.Response | None:
        started = time.monotonic()
        response: requests.Response | None = None
        try:
            if method == "GET":
                response = self.browser.get(self.base_url + path, timeout=CLIENT_TIMEOUT)
            else:
                response = self.browser.post(self.base_url + path, data={"csrf_token": self.token, **form},
                                             timeout=CLIENT_TIMEOUT, allow_redirects=False)
        except requests.RequestException as error:
            status, detail = None, repr(error)
        else:
            status = response.status_code
            detail = "" if status in ROUTES[route] else response.text[:300]
        with self.lock:
            self.load.hits.append(Hit(route, status, time.monotonic() - started, detail))
        return response

    def create(self, title: str) -> int | None:
        response = self.call("create", "POST", "/posts/new", title=title, body="through PgBouncer")
        match = re.search(r"/posts/(\d+)$", response.headers.get("Location", "")) if response is not None else None
        return int(match.group(1)) if match and response is not None and response.status_code == 302 else None


def route_mix(base_url: str, env_name: str, rounds: int = ROUNDS, deadline: float = LOAD_DEADLINE) -> Load:
    """``CLIENTS`` logged-in clients each run ``rounds`` rounds of every route: four
    reads, a post created and deleted, an edit of one of their own posts (versions
    followed), a failed login, /readyz."""
    run = secrets.token_hex(3)
    load, lock = Load(), threading.Lock()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        # Registering and logging in hash a password (about 0.5 s of CPU here) while the
        # request holds one of the worker's DATABASE_BULKHEAD slots (3): at most 3 at once.
        with ThreadPoolExecutor(max_workers=3) as signup:
            clients = list(signup.map(lambda n: Client(base_url, f"pgb{run}{env_name}{n}", load, lock),
                                      range(CLIENTS)))

        def seed(n: int) -> dict[int, str]:
            titles = {k: f"seed {run} {n} {k}" for k in range(SEED_POSTS)}
            return {post: title for title in titles.values() if (post := clients[n].create(title)) is not None}

        # Their answers stay in the history: a failed one is an error like any other (and
        # then the index may have no page 2: an error too, of the failed run).
        own = list(pool.map(seed, range(CLIENTS)))  # per client: post id -> its title now
        seeds = [post for posts in own for post in posts]
        assert seeds, load.errors()[:3]
        started = time.monotonic()
        stop_at = started + deadline

        def work(n: int) -> None:
            client, mine = clients[n], own[n]
            versions = dict.fromkeys(mine, 1)
            for r in range(rounds):
                if time.monotonic() > stop_at:
                    return
                client.call("index", "GET", "/")
                client.call("index page 2", "GET", "/?page=2")
                client.call("post", "GET", f"/posts/{seeds[(n + r) % len(seeds)]}")
                client.call("user", "GET", f"/users/{clients[(n + r) % CLIENTS].username}")
                title = f"pgb {run} {n} {r}"
                post = client.create(title)
                if post is not None:
                    deleted = client.call("delete", "POST", f"/posts/{post}/delete")
                    if deleted is not None and deleted.status_code == 302:
                        with lock:
                            load.absent.add(title)
                if mine:
                    target = list(mine)[r % len(mine)]
                    new_title = f"{mine[target].split(' v')[0]} v{versions[target] + 1}"
                    edited = client.call("edit", "POST", f"/posts/{target}/edit", title=new_title,
                                         body="edited through PgBouncer", version=str(versions[target]))
                    if edited is not None and edited.status_code == 302:
                        with lock:
                            load.absent.add(mine[target])
                        versions[target] += 1
                        mine[target] = new_title
                # A new username every LOGIN_LIMIT + 1 attempts: LOGIN_LIMIT counted
                # failures, then one refusal. One attempt per client checks a real wrong
                # password (a user lookup and a slow hash; in a different round for each
                # client, see above); the others leave the password empty, a failure
                # that costs no hash and still counts.
                ghost = f"ghost{run}{env_name}{n}x{r // (LOGIN_LIMIT + 1)}"
                answer = client.call("failed login", "POST", "/auth/login", username=ghost,
                                     password="wrong " + PASSWORD if r == n % rounds else "")
                with lock:
                    load.logins.setdefault(ghost, []).append(answer.status_code if answer is not None else None)
                client.call("readyz", "GET", "/readyz")

        for finished in [pool.submit(work, n) for n in range(CLIENTS)]:
            finished.result()
        load.seconds = time.monotonic() - started
        load.present = {title for posts in own for title in posts.values()}
    return load


def rate_limit_miscounts(load: Load) -> dict[str, list[int | None]]:
    """Usernames whose failed logins were not counted exactly: LOGIN_LIMIT answers 200
    (the form again), then only 429s. A storage that fails open (the limiter swallows
    its errors) lets more through; a lost count refuses too early."""
    return {
        name: statuses for name, statuses in load.logins.items()
        if statuses != ([200] * LOGIN_LIMIT + [429] * len(statuses))[:len(statuses)]
    }


def database_errors(log: str) -> list[str]:
    """The app's log lines about a failed statement (500s and 503s alike)."""
    return [line for line in log.splitlines() if "database error:" in line or "database unavailable" in line]


@pytest.mark.parametrize("env", [pytest.param(FAST_PATH, id="read-only-fast-path"),
                                 pytest.param(SET_LOCAL, id="statement-timeout-set-local")])
def test_every_route_through_pgbouncer_hundreds_of_times(stack: Stack, tmp_path: Path, env: dict[str, str]) -> None:
    with gunicorn(stack.url, tmp_path / "gunicorn", **env, **RATE_LIMITS, **LOADED_BOX) as server:
        load = route_mix(server.url, "s" if env is SET_LOCAL else "f")
        log = server.log_text()
    titles = titles_in(stack.direct)
    errors = load.errors()
    per_route = {route: load.count(route) for route in ROUTES}
    miscounted = rate_limit_miscounts(load)
    lost = load.present - titles
    resurrected = load.absent & titles
    latencies = sorted(hit.seconds for hit in load.hits)

    scenario = "12 pgbouncer routes" + (" (statement timeout, SET LOCAL)" if env is SET_LOCAL
                                        else " (read-only fast path)")
    injected = (f"PgBouncer 1.18 transaction pooling, default_pool_size={DEFAULT_POOL_SIZE}; {CLIENTS} clients, "
                f"2 workers x 4 threads, DATABASE_PGBOUNCER=transaction")
    for figure, value, goal, met in [
        ("requests sent", len(load.hits), f">= {PER_ROUTE} per route ({len(ROUTES)} routes)",
         min(per_route.values()) >= PER_ROUTE),
        ("errors", len(errors), "0", not errors),
        ("requests per second", round(len(load.hits) / load.seconds, 1), "-", True),
        ("p95 latency (s)", round(statistics.quantiles(latencies, n=20)[-1], 3), "-", True),
        ("slowest answer (s)", round(latencies[-1], 3), "-", True),
        ("failed logins miscounted", len(miscounted), "0", not miscounted),
        ("acknowledged writes lost", len(lost) + len(resurrected), "0", not lost and not resurrected),
    ]:
        record(scenario, BACKEND, injected, figure, value, goal, met)

    assert not errors, (Counter((hit.route, hit.status) for hit in errors), errors[:3], logged_errors(log)[:5])
    assert min(per_route.values()) >= PER_ROUTE, (per_route, f"{load.seconds:.1f} s")
    assert not miscounted, miscounted
    assert len(load.logins) >= CLIENTS * (ROUNDS // (LOGIN_LIMIT + 1)), len(load.logins)
    assert not lost and not resurrected, (lost, resurrected)
    assert len(load.present) == CLIENTS * SEED_POSTS and len(load.absent) == 2 * CLIENTS * ROUNDS
    assert escaped_errors(log) == 0 and not database_errors(log), (logged_errors(log), database_errors(log)[:5])
    assert not PREPARED_STATEMENT_ERROR.search(log)


def test_negative_control_prepared_statements_break_behind_pgbouncer(stack: Stack, tmp_path: Path) -> None:
    """The same load without DATABASE_PGBOUNCER: psycopg prepares what it runs often,
    and PgBouncer hands the next transaction to a server connection that does not know
    the statement, or already has one of that name from another client."""
    with gunicorn(stack.url, tmp_path / "gunicorn", **PREPARED, **RATE_LIMITS, **LOADED_BOX) as server:
        load = route_mix(server.url, "p", rounds=6)
        log = server.log_text()
    errors = load.errors()
    causes = Counter(match.group(1) for match in PREPARED_STATEMENT_ERROR.finditer(log))
    injected = "as the route load (6 rounds), without DATABASE_PGBOUNCER: psycopg prepares statements"
    record("12 pgbouncer routes, negative control", BACKEND, injected, "errors", len(errors),
           "> 0 (harness detects)", bool(errors))
    record("12 pgbouncer routes, negative control", BACKEND, injected, "prepared-statement errors logged",
           sum(causes.values()), "> 0", bool(causes))
    assert errors, f"{len(load.hits)} requests, no error"
    assert any(hit.status == 500 for hit in errors), Counter((hit.route, hit.status) for hit in errors)
    assert causes, "no prepared-statement error in the log:\n" + "\n".join(database_errors(log)[:5])


# -- the statement timeout, per transaction -----------------------------------------------------


def test_statement_timeout_is_set_per_transaction_and_cancels_a_slow_query(stack: Stack) -> None:
    app = make_app(stack.url, DATABASE_PGBOUNCER="transaction", DATABASE_STATEMENT_TIMEOUT=500)
    engine = app.extensions["myapp.database"].engine
    try:
        with app.app_context():
            started = time.monotonic()
            with pytest.raises(sqlalchemy.exc.OperationalError) as cancelled:
                with db.transaction() as session:
                    session.execute(text("SELECT pg_sleep(2)"))
            seconds = time.monotonic() - started
            with db.transaction() as session:  # the connection is still good
                assert session.scalar(text("SELECT current_setting('statement_timeout')")) == "500ms"
    finally:
        engine.dispose()
    assert getattr(cancelled.value.orig, "sqlstate", None) == "57014", cancelled.value
    assert 0.4 < seconds < 1.5, seconds
    # SET LOCAL ended with the transaction: another client, handed the server connection
    # the app used last (PgBouncer reuses the most recent one first), has no limit.
    with psycopg.connect(stack.bouncer.conninfo(str(stack.direct.database)), autocommit=True) as other:
        seen = [other.execute("SHOW statement_timeout").fetchone() for _ in range(2 * DEFAULT_POOL_SIZE)]
    assert set(seen) == {("0",)}, seen
    record("12 pgbouncer statement timeout", BACKEND, "SELECT pg_sleep(2) with DATABASE_STATEMENT_TIMEOUT=500",
           "seconds until cancelled (57014)", round(seconds, 3), "< 1.5", seconds < 1.5)


def test_negative_control_a_startup_statement_timeout_is_refused_by_pgbouncer(stack: Stack) -> None:
    app = make_app(stack.url, DATABASE_STATEMENT_TIMEOUT=500, PROPAGATE_EXCEPTIONS=False)
    engine = app.extensions["myapp.database"].engine
    try:
        with app.app_context():
            with pytest.raises(sqlalchemy.exc.OperationalError, match="unsupported startup parameter: options"):
                db.session.execute(text("SELECT 1"))
            db.rollback()
        page = app.test_client().get("/")  # what a visitor sees: the site is down
        assert page.status_code == 503 and page.headers["Retry-After"], page.status_code
    finally:
        engine.dispose()


# -- restarts under load -------------------------------------------------------------------------


def restart_pgbouncer(stack: Stack, down_seconds: float) -> Callable[[], float]:
    def inject() -> float:
        stack.bouncer.restart(down_seconds=down_seconds)
        return time.monotonic()

    return inject


def restart_server(stack: Stack, down_seconds: float) -> Callable[[], float]:
    return lambda: stack.server.restart(down_seconds)


BREAKER_RESET = 1.0  # DATABASE_BREAKER_RESET: an open breaker probes once a second
# After the database is back, a worker whose breaker opened refuses (503, Retry-After)
# until its next probe, up to BREAKER_RESET later; behind PgBouncer, a probe may also
# meet PgBouncer's own wait after a failed server login. A second more for a loaded box.
MARGIN = 1.0


@pytest.mark.parametrize(("fault", "inject"), [
    pytest.param("PgBouncer restarted", restart_pgbouncer, id="pgbouncer"),
    pytest.param("PostgreSQL restarted behind PgBouncer", restart_server, id="server-behind-pgbouncer"),
])
def test_restart_under_load_through_pgbouncer(stack: Stack, tmp_path: Path, fault: str,
                                              inject: Callable[[Stack, float], Callable[[], float]]) -> None:
    seconds, fault_at, down_seconds = 7.0, 2.5, 1.0
    env = {**APP_ENV, **SET_LOCAL, **LOADED_BOX, "DATABASE_BREAKER_RESET": str(BREAKER_RESET)}
    window = BREAKER_RESET + (SERVER_LOGIN_RETRY if inject is restart_server else 0) + MARGIN
    with gunicorn(stack.url, tmp_path / "gunicorn", **env) as server:
        # However long the restart took on a loaded box, the clients go on past the window.
        calls, outage = run_load(server.url, seconds, fault_at, inject(stack, down_seconds), quiet_outage=False,
                                 after_ready=window + 1)
        log = server.log_text()
    verdict = judge(calls, outage, titles_in(stack.direct))
    unavailable_pages = [c.body for c in calls if c.status == 503]
    late = [c for c in calls if c.started >= outage.ready_at and not c.succeeded()]
    last_refusal = round(max((c.started - outage.ready_at for c in late), default=0.0), 3)

    injected = (f"{fault} (down {down_seconds:g} s) during {seconds:g} s of {CLIENTS} clients, "
                "DATABASE_PGBOUNCER=transaction, DATABASE_STATEMENT_TIMEOUT=5000")
    for figure, value, goal, met in [
        ("requests sent", verdict.sent, "-", True),
        ("503s while down", verdict.unavailable_during_outage, "503 + Retry-After", verdict.missing_retry_after == 0),
        ("500s", verdict.server_errors, "0", verdict.server_errors == 0),
        ("hung requests", verdict.hangs, f"0 (client timeout {CLIENT_TIMEOUT} s)", verdict.hangs == 0),
        ("slowest answer while down (s)", verdict.slowest_while_down, "-", True),
        ("503s after ready (breaker not yet probed)", len(late), "503 + Retry-After",
         all(c.status == 503 and c.retry_after for c in late)),
        ("last 503 after ready (s)", last_refusal, f"< {window:g}", last_refusal < window),
        ("seconds to first success after ready", verdict.recovery_seconds, f"< {window:g}",
         verdict.recovery_seconds < window),
        ("acknowledged writes lost", verdict.lost, "0", verdict.lost == 0),
        ("rejected writes present", verdict.phantom, "0", verdict.phantom == 0),
        ("indeterminate writes", verdict.indeterminate, "either outcome", True),
    ]:
        record(f"12 pgbouncer restart ({fault})", BACKEND, injected, figure, value, goal, met)

    assert verdict.server_errors == 0 and verdict.tracebacks == 0, (verdict, logged_errors(log))
    assert verdict.hangs == 0, verdict
    assert verdict.missing_retry_after == 0, verdict
    assert verdict.unavailable_during_outage > 0, verdict  # the outage was seen
    assert all(MAY_HAVE_BEEN_SAVED in page for page in unavailable_pages)
    assert all(c.status == 503 and c.retry_after for c in late), Counter(c.status for c in late)
    assert last_refusal < window and verdict.recovery_seconds < window, (last_refusal, verdict)
    assert verdict.lost == 0 and verdict.phantom == 0, verdict
    assert verdict.acknowledged > 0 and verdict.rejected > 0, verdict
    assert escaped_errors(log) == 0, logged_errors(log)
    assert not PREPARED_STATEMENT_ERROR.search(log)


LOGIN_FAILING = "server login has been failing"
OBSERVED = 3.0  # seconds watched after the server is ready again


def test_negative_control_pgbouncer_default_login_retry_keeps_it_down_after_the_server(
    throwaway_postgres: ThrowawayServer,
) -> None:
    """Why the bouncer above sets server_login_retry: with PgBouncer's default (15 s),
    after one failed server login it refuses new clients, and holds the queries of
    connected ones, for seconds after the server is back. The app sees the first as a
    503; the second is a request that hangs, which no client-side timeout of the app
    bounds (PgBouncer itself answers keepalives)."""
    server = throwaway_postgres
    server.ensure_running()
    queued: Pending | None = None
    try:
        with pgbouncer("127.0.0.1", server.port, default_pool_size=DEFAULT_POOL_SIZE) as default:
            connected = psycopg.connect(default.conninfo(), autocommit=True)
            try:
                connected.execute("SELECT 1")
                server.stop()
                queued = Pending(lambda: connected.execute("SELECT 1").fetchone())  # its server login fails
                assert wait_for_refusal(default, LOGIN_FAILING, timeout=10), default.log_tail()
                server.start()
                ready = time.monotonic()
                refusals: list[str] = []
                while time.monotonic() - ready < OBSERVED:
                    refusals.append(new_connection_error(default))
                    time.sleep(0.2)
                still_queued = not queued.done(0)
            finally:
                default.stop()  # cuts every client off, the queued query included
                if queued is not None:
                    assert queued.done(10), "the queued query outlived PgBouncer"
                connected.close()
    finally:
        server.ensure_running()
    record("12 pgbouncer server restart, negative control", BACKEND,
           "PgBouncer's default server_login_retry (15 s), server stopped then started",
           f"new connections refused in the {OBSERVED:g} s after ready", sum(bool(r) for r in refusals),
           "> 0 (harness detects)", all(LOGIN_FAILING in r for r in refusals))
    assert refusals and all(LOGIN_FAILING in r for r in refusals), refusals
    assert still_queued, f"the queued query ended: {queued.result!r} {queued.error!r}"


def new_connection_error(bouncer: PgBouncer) -> str:
    """'' if a new client gets an answer through ``bouncer``, else the error."""
    try:
        with psycopg.connect(bouncer.conninfo(connect_timeout=2), autocommit=True) as connection:
            connection.execute("SELECT 1")
    except psycopg.OperationalError as error:
        return str(error)
    return ""


def wait_for_refusal(bouncer: PgBouncer, message: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if message in new_connection_error(bouncer):
            return True
        time.sleep(0.1)
    return False
