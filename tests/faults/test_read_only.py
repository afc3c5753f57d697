"""Scenario 19b: read-only mode under real gunicorn (issue 19, point 1).

A primary in a network namespace of its own, so that its link can be cut silently (no
RST, no FIN), and a streaming standby on loopback, which stays in recovery and keeps
answering while the primary is cut off. Replication is asynchronous: a synchronous
standby that lost its primary would hold every commit after the heal until its WAL
receiver reconnects, and the primary is never promoted here, so the writes are judged
on the primary itself.

The site runs under gunicorn (2 workers x 4 threads) on the primary, reading from the
standby, with the failover scenarios' short timeouts (tests/faults/timeline.py): a
write in flight at the cut fails after the 3 s network timeout, and the watchdog's
unanswered ping (2 s more) opens the breaker, about 5 s after the cut. Eight readers
(four visitors, three logged-in users, and one user whose last post the standby has not
replayed: replay is paused from just before that post until the heal, hence a lag limit
of 30 s), two logged-in writers posting a unique title and a multi-line body, and a
``/readyz`` poller run through tests/faults/test_restart.py's ``run_load``; the
primary's link goes down for OUTAGE seconds, then comes back.

When the breaker opened is read from the gunicorn log: the first "database circuit open
... (primary; ...)" line (a watcher notes when it appears: the first worker's). What
must hold, for the GETs started from then until the link came back, and for the rest:

- at least 99% of those GETs are 200 with the banner "Read-only for now.", logged-in
  readers still signed in, the reader the standby lags behind told so;
- every write sent while the link was down is a 503 with Retry-After and the banner;
  every write answered 503 gives back exactly the typed title and body (its textareas
  read as a browser reads them);
- 0 acknowledged writes lost (every title answered 302 is on the primary afterwards),
  no 500s, no hung request;
- read-write is back within 2 s of the link returning (first acknowledged write);
- ``/readyz`` answers 200 "degraded: read-only from replica 1" meanwhile;
- every GET started while the link was down, before the breaker opened too, is a 200:
  the requests waiting on the silent primary hold at most its share of a worker's
  bulkhead, and the last slot serves the pages the replica can
  (tests/db/test_replicas.py, "a share of the bulkhead per server").

Negative control: the same run with ``DATABASE_READ_ONLY_MODE=false``: most of those
GETs get a 503, and no page carries the banner.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from myapp.models import Post, User
from tests.db.test_replicas import replica_urls
from tests.support.forms import textareas
from tests.topology import ReplicatedPostgres, replicated_postgres
from tests.topology.fixtures import require_namespaces, require_postgres

from . import timeline
from .conftest import escaped_errors, logged_in_browser, new_client
from .figures import record
from .servers import gunicorn
from .test_restart import (
    CLIENT_TIMEOUT, Call, Client, Outage, Request, judge, logged_errors, run_load, titles_in,
)

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn, pytest.mark.timeout(90)]

CHECK_INTERVAL = 0.5  # the replica checks, which also tell whether the primary answers
MAX_LAG = 30  # s: the paused standby stays in the rotation for the whole run
APP_ENV = {  # the failover scenarios' short timeouts (2 x 4 threads, network 3 s, connect and ping 2 s)
    **timeline.APP_ENV,
    "DATABASE_REPLICA_CHECK_INTERVAL": str(CHECK_INTERVAL),
    "DATABASE_REPLICA_MAX_LAG": f"{MAX_LAG}s",
    "DATABASE_APP_NAME": "myapp-read-only",
}
WORKERS, THREADS = timeline.WORKERS, timeline.THREADS
FAULT_AT, OUTAGE, AFTER = 3.0, 8.0, 4.0  # s: load before the cut, link down, load after the heal
VISITORS, MEMBERS, WRITERS = 4, 3, 2  # and one reader behind: 8 readers
POLL_EVERY = 0.25  # s between two /readyz
READ_SHARE_GOAL = 0.99
BACK_WITHIN = 2.0  # s from the link's return to the first acknowledged write

BANNER = "Read-only for now."
NOT_YET = "Your latest changes are saved but may not show on this page yet."
DEGRADED = "degraded: read-only from replica 1"
OPENED = re.compile(rb"database circuit open after \d+ failures in a row \(primary;")  # the primary's, not a replica's
SCENARIO = "19b read-only mode"
INJECTED = (f"primary's link down {OUTAGE:g} s (silent), standby on loopback; {VISITORS + MEMBERS + 1} readers + "
            f"{WRITERS} writers, gunicorn {WORKERS}x{THREADS}")


# -- the topology ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cut_off_primary_module() -> Iterator[ReplicatedPostgres]:
    """A primary in a network namespace of its own and one asynchronous standby on
    loopback: built once for this module (no session topology has a primary that can
    be cut off and keep its standby)."""
    require_postgres()
    require_namespaces()
    with replicated_postgres(standbys=1, netns_nodes={0}) as topology:
        yield topology


@pytest.fixture
def cut_off_primary(cut_off_primary_module: ReplicatedPostgres) -> Iterator[ReplicatedPostgres]:
    """The module's topology; afterwards healed, replaying and streaming again."""
    yield cut_off_primary_module
    cut_off_primary_module.reset()


@pytest.fixture
def seeded(cut_off_primary: ReplicatedPostgres) -> Iterator[tuple[URL, int]]:
    """A migrated database of the test's own with a few posts by "seed", replayed on
    the standby; its URL and one post's id."""
    with cut_off_primary.primary.database() as url:
        engine = create_engine(url, poolclass=NullPool)
        with engine.begin() as connection:
            author = connection.execute(insert(User).values(username="seed", password_hash="x").returning(User.id))
            author_id = author.scalar_one()
            posts = connection.execute(insert(Post).returning(Post.id), [
                {"author_id": author_id, "title": f"seeded {n}", "body": "seeded", "version": 1} for n in range(10)
            ])
            post_id = posts.scalars().first()
        engine.dispose()
        assert post_id is not None
        cut_off_primary.wait_for_replay(cut_off_primary.standbys[0])
        yield url, post_id


# -- the load --------------------------------------------------------------------------------


def typed_body(title: str) -> str:
    """What a writer types: several lines, a blank first one (the newline HTML drops
    after <textarea> must not eat it), markup, entities, and a trailing space."""
    return f"\nWritten as {title}.\n  Indented: <b>not bold</b> & \"quoted\" &amp; 'single'\n\nLast line "


def _read(paths: list[str], step: int) -> Request:
    return Request("read", paths[step % len(paths)])


def _write(prefix: str, step: int) -> Request:
    title = f"{prefix}-{step}"
    return Request("write", "/posts/new", title, {"title": title, "body": typed_body(title)})


def _poll(step: int) -> Request:
    time.sleep(POLL_EVERY)  # before the request is timed
    return Request("readyz", "/readyz")


@dataclass
class Cast:
    """The clients of one run and who is who (their places in ``clients``)."""

    clients: list[Client]
    members: dict[int, str]  # logged-in readers, by place: their usernames
    behind: int  # the reader whose last post the standby has not replayed
    unreplayed: str  # that post's title


def cast(base_url: str, topology: ReplicatedPostgres, post_id: int) -> Cast:
    """Log the readers in (replayed on the standby), then pause the standby's replay and
    have the reader behind post once: its cookie then holds a position the standby lacks.
    The writers log in after that, and the /readyz poller comes last."""
    run = secrets.token_hex(3)
    pages = ["/", f"/posts/{post_id}", "/users/seed"]
    clients = [Client(new_client(), "", partial(_read, pages)) for _ in range(VISITORS)]
    members: dict[int, str] = {}
    for number in range(MEMBERS):
        name = f"member{run}{number}"
        members[len(clients)] = name
        clients.append(Client(*logged_in_browser(base_url, name), partial(_read, pages)))
    behind_name = f"behind{run}"
    browser, token = logged_in_browser(base_url, behind_name)
    topology.wait_for_replay(topology.standbys[0])
    topology.pause_replay(topology.standbys[0])
    unreplayed = f"unreplayed {run}"
    response = browser.post(f"{base_url}/posts/new", data={"csrf_token": token, "title": unreplayed, "body": "x"},
                            timeout=10, allow_redirects=False)
    assert response.status_code == 302, response.text
    behind = len(clients)
    members[behind] = behind_name
    clients.append(Client(browser, token, partial(_read, [*pages, f"/users/{behind_name}"])))
    for number in range(WRITERS):
        writer = logged_in_browser(base_url, f"writer{run}{number}")
        clients.append(Client(*writer, partial(_write, f"ro{run}w{number}")))
    clients.append(Client(new_client(), "", _poll))
    return Cast(clients, members, behind, unreplayed)


class LogWatch:
    """When each line matching ``pattern`` appeared in a growing log (looked at every 20 ms)."""

    def __init__(self, path: Path, pattern: re.Pattern[bytes]) -> None:
        self.path, self.pattern = path, pattern
        self.seen: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> LogWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _watch(self) -> None:
        offset, partial_line = self.path.stat().st_size, b""
        while not self._stop.wait(0.02):
            with self.path.open("rb") as log:
                log.seek(offset)
                chunk = log.read()
            offset += len(chunk)
            lines = (partial_line + chunk).split(b"\n")
            partial_line = lines.pop()
            now = time.monotonic()
            self.seen += [now for line in lines if self.pattern.search(line)]


@dataclass
class Outcome:
    """One run, from the client side and the log."""

    calls: list[Call]
    cut_at: float
    link_up_at: float  # `ip link set up` issued
    answered_at: float  # the primary answered a new connection of the harness again
    opened: list[float]  # each "database circuit open" line (one per worker that opened)
    titles: set[str]  # on the primary afterwards
    log: str
    cast: Cast
    readyz: list[Call]

    def window(self) -> list[Call]:
        """The GETs of pages started after the first breaker opened, before the link came back."""
        start = self.opened[0] if self.opened else float("inf")
        return [c for c in self.calls if c.kind == "read" and start <= c.started < self.link_up_at]


def run(topology: ReplicatedPostgres, database: URL, post_id: int, workdir: Path, **env: str) -> Outcome:
    primary, standby = topology.primary, topology.standbys[0]
    moments: dict[str, float] = {}

    def inject() -> float:
        began = time.monotonic()
        primary.partition()
        # Noted once the link is down: a write sent while `ip link` ran could still commit.
        moments["cut"] = time.monotonic()
        time.sleep(max(0.0, began + OUTAGE - time.monotonic()))
        moments["link up"] = time.monotonic()
        primary.heal()
        moments["answered"] = time.monotonic()
        topology.resume_replay(standby)
        return moments["link up"]

    settings = {**APP_ENV, "DATABASE_REPLICA_URLS": replica_urls(topology, database), **env}
    with gunicorn(database, workdir, **settings) as server:
        people = cast(server.url, topology, post_id)
        with LogWatch(server.log, OPENED) as opened:
            calls, outage = run_load(server.url, FAULT_AT + OUTAGE, FAULT_AT, inject, quiet_outage=False,
                                     after_ready=AFTER, clients=people.clients)
        log = server.log_text()
    assert outage.down_at <= moments["cut"] and outage.ready_at == moments["link up"]
    return Outcome(calls, moments["cut"], moments["link up"], moments["answered"], opened.seen,
                   titles_in(database), log, people, [c for c in calls if c.kind == "readyz"])


# -- judging ---------------------------------------------------------------------------------


def read_only_page(call: Call) -> bool:
    return call.status == 200 and BANNER in call.body


def gives_back_what_was_typed(call: Call) -> bool:
    assert call.title is not None
    return textareas(call.body) == {"title": call.title, "body": typed_body(call.title)}


def _reason(call: Call) -> str:
    """What a page that is not a read-only 200 says: its heading and first paragraph."""
    found = re.search(r"<h1>(.*?)</h1>\s*<p>(.*?)</p>", call.body, re.S)
    return " / ".join(found.groups()) if found else call.body[:200]


def _status(call: Call) -> str:
    try:
        return str(json.loads(call.body).get("status"))
    except ValueError:
        return call.body[:80]


def test_with_the_primary_cut_off_pages_are_read_only_and_no_typed_text_is_lost(
    cut_off_primary: ReplicatedPostgres, seeded: tuple[URL, int], tmp_path: Path
) -> None:
    database, post_id = seeded
    out = run(cut_off_primary, database, post_id, tmp_path / "gunicorn")
    verdict = judge(out.calls, _outage(out), out.titles)
    window = out.window()
    served = [c for c in window if read_only_page(c)]
    share = len(served) / len(window) if window else 0.0
    writes = [c for c in out.calls if c.kind == "write"]
    while_down = [c for c in writes if c.started >= out.cut_at and c.ended <= out.link_up_at]
    refused = [c for c in writes if c.status == 503]
    kept = [c for c in refused if gives_back_what_was_typed(c)]
    bannered = [c for c in while_down if c.status == 503 and BANNER in c.body and c.retry_after]
    back = sorted(c.ended - out.link_up_at for c in writes if c.status == 302 and c.ended > out.link_up_at)
    back_after = round(back[0], 3) if back else float("inf")
    polled = [c for c in out.readyz if c.started >= out.cut_at and c.ended <= out.link_up_at]
    degraded = [c for c in polled if c.status == 200 and _status(c) == DEGRADED]
    members = [c for c in window if c.client in out.cast.members and c.status == 200]
    signed_in = [c for c in members if f">{out.cast.members[c.client]}<" in c.body]
    # Answered before the link came back: replay resumes right after, and a page read
    # from the replica then rightly shows the post and no notice.
    behind = [c for c in members if c.client == out.cast.behind and c.ended < out.link_up_at]
    told = [c for c in behind if NOT_YET in c.body and out.cast.unreplayed not in c.body]
    others_told = [c for c in members if c.client != out.cast.behind and NOT_YET in c.body]
    outage_reads = [c for c in out.calls if c.kind == "read" and out.cut_at <= c.started < out.link_up_at]
    first_banner = min((c.ended for c in outage_reads if read_only_page(c)), default=float("inf"))
    refused_reads = sum(c.status != 200 for c in outage_reads)

    figures: list[tuple[str, float, str, bool]] = [
        ("s from the cut to the first breaker open", _since(out.opened, out.cut_at, 0), "-", bool(out.opened)),
        ("s from the cut to the last worker's breaker open", _since(out.opened, out.cut_at, -1), "-", True),
        ("s from the cut to the first page with the banner", round(first_banner - out.cut_at, 2), "-", True),
        ("GETs started while the link was down (breaker open or not)", len(outage_reads), "-", True),
        ("of them not answered 200", refused_reads, "0", refused_reads == 0),
        ("GETs started after the breaker opened", len(window), "> 0", bool(window)),
        ("share of them 200 with the banner", round(share, 4), f">= {READ_SHARE_GOAL:g}", share >= READ_SHARE_GOAL),
        ("logged-in readers' pages still signed in", len(signed_in), f"all {len(members)}",
         len(signed_in) == len(members)),
        ("pages of the reader behind saying so", len(told), f"all {len(behind)}", len(told) == len(behind) > 0),
        ("writes sent while the link was down", len(while_down), "> 0", bool(while_down)),
        ("of them 503 with Retry-After and the banner", len(bannered), f"all {len(while_down)}",
         len(bannered) == len(while_down)),
        ("503 write pages giving back exactly the typed text", len(kept), f"all {len(refused)}",
         len(kept) == len(refused)),
        ("acknowledged writes lost", verdict.lost, "0", verdict.lost == 0),
        ("500s", verdict.server_errors, "0", verdict.server_errors == 0),
        ("hung requests", verdict.hangs, f"0 (client timeout {CLIENT_TIMEOUT} s)", verdict.hangs == 0),
        ("s from the link's return to the first acknowledged write", back_after, f"<= {BACK_WITHIN:g}",
         back_after <= BACK_WITHIN),
        ("s the harness waited for the primary to answer after link up", round(out.answered_at - out.link_up_at, 2),
         "-", True),
        ("/readyz answered 200 degraded while the link was down", len(degraded), f"all {len(polled)}",
         len(degraded) == len(polled) > 0),
    ]
    for figure, value, goal, met in figures:
        record(SCENARIO, "postgresql", INJECTED, figure, value, goal, met)

    context = {figure: value for figure, value, _, _ in figures}
    failed_reads = [(c.client, round(c.started - out.cut_at, 2), c.status, _reason(c)) for c in window
                    if not read_only_page(c)][:5]
    assert verdict.server_errors == 0 and verdict.tracebacks == 0 and escaped_errors(out.log) == 0, (
        context, logged_errors(out.log)[-5:])
    assert verdict.hangs == 0 and verdict.missing_retry_after == 0, context
    assert verdict.lost == 0 and verdict.phantom == 0 and verdict.acknowledged > 0, (verdict, context)
    assert out.opened and window, context
    assert share >= READ_SHARE_GOAL, (context, failed_reads)
    assert refused_reads == 0, (context, [(round(c.started - out.cut_at, 2), c.status, _reason(c))
                                          for c in outage_reads if c.status != 200][:5])
    assert len(signed_in) == len(members) and others_told == [], context
    assert behind and len(told) == len(behind), (context, [
        (round(c.started - out.link_up_at, 2), NOT_YET in c.body, out.cast.unreplayed in c.body)
        for c in behind if c not in told][:5])
    assert while_down and len(bannered) == len(while_down), (
        context, [(c.status, c.retry_after, c.body[:300]) for c in while_down if c not in bannered][:3])
    assert len(kept) == len(refused), (context, [textareas(c.body) for c in refused if c not in kept][:3])
    assert polled and len(degraded) == len(polled), (context, [(c.status, _status(c)) for c in polled][:8])
    assert back_after <= BACK_WITHIN, context


def test_negative_control_with_read_only_mode_off_the_reads_get_503s(
    cut_off_primary: ReplicatedPostgres, seeded: tuple[URL, int], tmp_path: Path
) -> None:
    database, post_id = seeded
    out = run(cut_off_primary, database, post_id, tmp_path / "gunicorn", DATABASE_READ_ONLY_MODE="false")
    verdict = judge(out.calls, _outage(out), out.titles)
    window = out.window()
    unavailable = sum(c.status == 503 for c in window)
    share = unavailable / len(window) if window else 0.0
    served = sum(read_only_page(c) for c in window) / len(window) if window else 0.0
    scenario, injected = f"{SCENARIO}, negative control", INJECTED + "; DATABASE_READ_ONLY_MODE=false"
    record(scenario, "postgresql", injected, "GETs started after the breaker opened", len(window), "> 0", bool(window))
    record(scenario, "postgresql", injected, "share of them answered 503", round(share, 4), "> 0.5 (reads fail)",
           share > 0.5)
    record(scenario, "postgresql", injected, "share of them 200 with the banner", round(served, 4),
           f"< {READ_SHARE_GOAL:g} (harness detects)", served < READ_SHARE_GOAL)
    assert out.opened and window, (out.opened, len(out.calls))
    assert share > 0.5, f"{unavailable} of {len(window)} GETs after the breaker opened got a 503"
    assert served == 0 and not any(BANNER in c.body for c in out.calls), served
    # The rest holds without the feature too: nothing lost, no 500s.
    assert verdict.lost == 0 and verdict.server_errors == 0 and escaped_errors(out.log) == 0, verdict


def _outage(out: Outcome) -> Outage:
    return Outage(down_at=out.cut_at, ready_at=out.link_up_at)


def _since(moments: list[float], origin: float, index: int) -> float:
    return round(moments[index] - origin, 2) if moments else float("inf")
