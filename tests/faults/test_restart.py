"""Scenario 1: the database restarts under load, and no acknowledged write is lost.

Eight logged-in clients read and write against real gunicorn workers while the
throwaway server is stopped (fast), kept down, and started again. Every request and
its answer is kept, and the writes are judged like a Jepsen history: a write answered
with a redirect must be in the database, a write refused with a form error must not,
and a write answered 503 (or not at all) may be either.

Negative control: the same harness, with the pool's pre-ping off and the clients quiet
while the server is down, sees dead pooled connections reach requests after recovery.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, select
from sqlalchemy.engine import URL

from myapp.models import Post
from tests.support.servers import ThrowawayServer

from .conftest import escaped_errors, logged_in_browser
from .figures import record
from .servers import gunicorn

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn]

POOL_TIMEOUT = 2
CONNECT_TIMEOUT = 2
# A request may wait for the pool, then for a connect attempt; more than that plus a
# margin is a hang.
CLIENT_TIMEOUT = POOL_TIMEOUT + CONNECT_TIMEOUT + 6
APP_ENV = {
    "DATABASE_POOL_TIMEOUT": str(POOL_TIMEOUT),
    "DATABASE_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
    "DATABASE_APP_NAME": "myapp-faults",
}
CLIENTS = 8
MAY_HAVE_BEEN_SAVED = "may or may not have been saved"


@dataclass
class Call:
    """One request of the history and what came back."""

    kind: str  # "read", "write" (valid form) or "invalid" (a form the app must refuse)
    title: str | None
    started: float
    ended: float
    status: int | None  # None: no answer (timeout or reset)
    retry_after: str | None
    body: str
    client: int = -1  # which client of the load sent it (its place in run_load's ``clients``)

    def succeeded(self) -> bool:
        expected = 302 if self.kind == "write" else 200
        return self.status == expected


@dataclass
class Outage:
    down_at: float = 0.0
    ready_at: float = 0.0


@dataclass(frozen=True)
class Request:
    """What a client of the load sends next: a GET of ``path``, or, with ``form``, a POST
    of those fields (and the client's CSRF token) that is not redirected."""

    kind: str  # Call.kind
    path: str
    title: str | None = None  # a write's unique title, as Call.title
    form: dict[str, str] | None = None


@dataclass
class Client:
    """One client of the load: its HTTP session, its CSRF token ("" for a visitor who
    never posts), and the request it sends at each step (1, 2, ...)."""

    browser: requests.Session
    token: str
    plan: Callable[[int], Request]


def mixed_clients(base_url: str) -> list[Client]:
    """The default load: ``CLIENTS`` logged-in clients; each reads the index two steps in
    three and writes a post the third, every twelfth step a form the app must refuse."""
    run = secrets.token_hex(3)
    clients = []
    for number in range(CLIENTS):
        browser, token = logged_in_browser(base_url, f"load{run}{number}")
        clients.append(Client(browser, token, partial(_mixed_step, f"h{run}-{number}")))
    return clients


def _mixed_step(prefix: str, step: int) -> Request:
    if step % 3:
        return Request("read", "/")
    kind = "invalid" if step % 12 == 0 else "write"
    title = f"{prefix}-{step}"
    body = "" if kind == "invalid" else "written under fault"
    return Request(kind, "/posts/new", title, {"title": title, "body": body})


def run_load(
    base_url: str,
    seconds: float,
    fault_at: float,
    inject: Callable[[], float],
    quiet_outage: bool,
    after_ready: float = 0.0,
    clients: list[Client] | None = None,
) -> tuple[list[Call], Outage]:
    """Run the ``clients`` (by default ``mixed_clients``) for ``seconds``; at ``fault_at``
    call ``inject``, which returns when the server is ready again. With ``quiet_outage``
    the clients hold their requests from just before the fault until the server is back.
    The load goes on for at least ``after_ready`` seconds after that, however slowly the
    server came back: a recovery is judged on what followed it."""
    clients = mixed_clients(base_url) if clients is None else clients
    calls: list[Call] = []
    lock = threading.Lock()
    gate = threading.Event()
    gate.set()
    outage = Outage()
    started = time.monotonic()
    deadline = started + seconds

    def going_on() -> bool:
        now = time.monotonic()
        return now < deadline or not outage.ready_at or now < outage.ready_at + after_ready

    def client(number: int) -> None:
        sender = clients[number]
        step = 0
        while going_on():
            gate.wait(timeout=30)
            step += 1
            request = sender.plan(step)
            begin = time.monotonic()
            try:
                if request.form is None:
                    response = sender.browser.get(base_url + request.path, timeout=CLIENT_TIMEOUT)
                else:
                    response = sender.browser.post(
                        base_url + request.path,
                        data={"csrf_token": sender.token, **request.form},
                        timeout=CLIENT_TIMEOUT,
                        allow_redirects=False,
                    )
                status, retry_after, text = (
                    response.status_code, response.headers.get("Retry-After"), response.text
                )
            except requests.RequestException as error:
                status, retry_after, text = None, None, repr(error)
            with lock:
                calls.append(Call(request.kind, request.title, begin, time.monotonic(), status, retry_after, text,
                                  number))

    def injector() -> None:
        time.sleep(max(0.0, started + fault_at - time.monotonic()))
        if quiet_outage:
            gate.clear()
            time.sleep(0.5)  # let requests in flight finish: the pool is idle when it dies
        outage.down_at = time.monotonic()
        try:
            outage.ready_at = inject()
        finally:
            gate.set()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(len(clients))]
    threads.append(threading.Thread(target=injector))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 120)
    assert not any(thread.is_alive() for thread in threads), "the load did not finish"
    return calls, outage


@dataclass
class Verdict:
    """What the history says, in the figures the report shows."""

    sent: int
    during_outage: int
    unavailable_during_outage: int
    server_errors: int
    hangs: int
    missing_retry_after: int
    tracebacks: int
    slowest_while_down: float
    failures_after_recovery: int
    recovery_seconds: float
    acknowledged: int
    rejected: int
    indeterminate: int
    lost: int
    phantom: int


def judge(calls: list[Call], outage: Outage, titles_in_database: set[str]) -> Verdict:
    overlapping = [c for c in calls if c.ended >= outage.down_at and c.started <= outage.ready_at]
    after = [c for c in calls if c.started >= outage.ready_at]
    recovered = [c.ended for c in after if c.succeeded()]
    writes = [c for c in calls if c.title is not None]
    acknowledged = {c.title for c in writes if c.status == 302}
    rejected = {c.title for c in writes if c.status is not None and c.status < 500 and c.status != 302}
    return Verdict(
        sent=len(calls),
        during_outage=len(overlapping),
        unavailable_during_outage=sum(c.status == 503 for c in overlapping),
        server_errors=sum(c.status is not None and c.status >= 500 and c.status != 503 for c in calls),
        hangs=sum(c.status is None for c in calls),
        missing_retry_after=sum(c.status == 503 and not c.retry_after for c in calls),
        tracebacks=sum("Traceback" in c.body for c in calls),
        slowest_while_down=round(max((c.ended - c.started for c in overlapping), default=0.0), 2),
        failures_after_recovery=sum(not c.succeeded() for c in after),
        recovery_seconds=round(min(recovered) - outage.ready_at, 3) if recovered else float("inf"),
        acknowledged=len(acknowledged),
        rejected=len(rejected),
        indeterminate=len(writes) - len(acknowledged) - len(rejected),
        lost=len(acknowledged - titles_in_database),
        phantom=len(rejected & titles_in_database),
    )


def logged_errors(log: str) -> list[str]:
    """The last line of every exception gunicorn logged: what escaped the error handlers."""
    return [line for line in log.splitlines() if re.match(r"^[\w.]+(Error|Exception)\b", line)]


def titles_in(url: URL) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return set(connection.scalars(select(Post.title)))
    finally:
        engine.dispose()


def restart(server: ThrowawayServer, down_seconds: float) -> Callable[[], float]:
    return lambda: server.restart(down_seconds)


@pytest.mark.parametrize(
    ("quiet_outage", "seconds", "fault_at", "down_seconds"),
    [pytest.param(False, 15.0, 5.0, 3.0, id="under-load"), pytest.param(True, 6.0, 2.0, 1.0, id="quiet")],
)
def test_restart_under_load_loses_nothing(
    fault_server: ThrowawayServer, fault_db: URL, tmp_path: Path,
    quiet_outage: bool, seconds: float, fault_at: float, down_seconds: float,
) -> None:
    with gunicorn(fault_db, tmp_path / "gunicorn", **APP_ENV) as server:
        calls, outage = run_load(server.url, seconds, fault_at, restart(fault_server, down_seconds), quiet_outage,
                                 after_ready=2.0)
        log = server.log_text()
    verdict = judge(calls, outage, titles_in(fault_db))
    unavailable_pages = [c.body for c in calls if c.status == 503]

    scenario = "1 restart under load" + (" (quiet outage)" if quiet_outage else "")
    injected = f"server stopped (fast) for {down_seconds:g} s during {seconds:g} s of {CLIENTS} clients" + (
        ", clients paused while it is down" if quiet_outage else ""
    )
    figures = [
        ("requests sent", verdict.sent, "-", True),
        ("503s while down", verdict.unavailable_during_outage, "503 + Retry-After", verdict.missing_retry_after == 0),
        ("500s", verdict.server_errors, "0", verdict.server_errors == 0),
        ("hung requests", verdict.hangs, f"0 (client timeout {CLIENT_TIMEOUT} s)", verdict.hangs == 0),
        ("slowest answer while down (s)", verdict.slowest_while_down,
         f"< {POOL_TIMEOUT + CONNECT_TIMEOUT + 1} (pool + connect timeout + 1 s)",
         verdict.slowest_while_down < POOL_TIMEOUT + CONNECT_TIMEOUT + 1),
        ("failures after recovery", verdict.failures_after_recovery, "0", verdict.failures_after_recovery == 0),
        ("seconds to first success after ready", verdict.recovery_seconds, "< 1", verdict.recovery_seconds < 1),
        ("acknowledged writes lost", verdict.lost, "0", verdict.lost == 0),
        ("rejected writes present", verdict.phantom, "0", verdict.phantom == 0),
        ("indeterminate writes", verdict.indeterminate, "either outcome", True),
    ]
    if quiet_outage:  # nobody asked while the server was down
        figures = [f for f in figures if f[0] not in ("503s while down", "slowest answer while down (s)")]
    for figure, value, goal, met in figures:
        record(scenario, fault_server.name, injected, figure, value, goal, met)

    assert verdict.server_errors == 0 and verdict.tracebacks == 0, (verdict, logged_errors(log))
    assert verdict.hangs == 0, verdict
    assert verdict.missing_retry_after == 0, verdict
    assert verdict.failures_after_recovery == 0, (verdict, Counter((c.status, c.body[:300]) for c in calls if c.started >= outage.ready_at and not c.succeeded()).most_common(3))
    assert verdict.lost == 0 and verdict.phantom == 0, verdict
    assert verdict.acknowledged > 0 and verdict.rejected > 0, verdict
    assert escaped_errors(log) == 0, logged_errors(log)
    if not quiet_outage:
        # The outage was seen, and its page tells a writer the truth.
        assert verdict.unavailable_during_outage > 0, verdict
        assert all(MAY_HAVE_BEEN_SAVED in page for page in unavailable_pages)


def test_negative_control_restart_without_pre_ping(
    fault_server: ThrowawayServer, fault_db: URL, tmp_path: Path
) -> None:
    """Without pre-ping the harness must see dead connections handed to requests."""
    env = {**APP_ENV, "FAULTS_PRE_PING": "0"}
    with gunicorn(fault_db, tmp_path / "gunicorn", fault_app=True, **env) as server:
        calls, outage = run_load(server.url, 6.0, 2.0, restart(fault_server, 1.0), quiet_outage=True)
    verdict = judge(calls, outage, titles_in(fault_db))
    record(
        "1 restart, negative control", fault_server.name, "as the quiet outage, pool_pre_ping off",
        "failures after recovery", verdict.failures_after_recovery, "> 0 (harness detects)",
        verdict.failures_after_recovery > 0,
    )
    assert verdict.failures_after_recovery > 0, verdict
    # Even the dead connections end as a 503 page, and the history still holds.
    assert verdict.server_errors == 0 and verdict.lost == 0 and verdict.phantom == 0, verdict


def test_negative_control_history_checker_flags_lost_and_phantom_writes() -> None:
    """The Jepsen-style judge must fail a history that lost or invented a write."""
    outage = Outage(down_at=10.0, ready_at=13.0)
    calls = [
        Call("write", "acknowledged", 1.0, 1.1, 302, None, ""),
        Call("invalid", "refused", 2.0, 2.1, 200, None, "This field is required."),
        Call("write", "indeterminate", 11.0, 11.1, 503, "5", MAY_HAVE_BEEN_SAVED),
        Call("write", "after", 14.0, 14.1, 500, None, "Internal Server Error"),
    ]
    # The acknowledged write is missing; the refused one is present; the 503 one is free.
    verdict = judge(calls, outage, {"refused", "indeterminate"})
    # A 500 on a write is as indeterminate as a 503 (and fails the run on its own).
    assert (verdict.lost, verdict.phantom, verdict.indeterminate) == (1, 1, 2)
    assert verdict.server_errors == 1 and verdict.failures_after_recovery == 1
    assert verdict.unavailable_during_outage == 1 and verdict.recovery_seconds == float("inf")
