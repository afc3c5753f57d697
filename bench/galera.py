"""``make bench-galera``: MariaDB Galera with connections pinned to one writer node or
spread over the cluster, and what causal reads cost.

It starts its own throwaway three-node cluster (tests/topology/galera.py, as the fault
suite does), creates and migrates a database there, and then, in process (Flask test
clients in threads, no gunicorn: the figures are the database's, not HTTP's):

- conflicting writes: ``BENCH_GALERA_THREADS`` threads (3) edit one post at once (the
  edit form, then its POST with the version read), ``BENCH_GALERA_EDITS`` (100) each;
- non-conflicting writes: the same threads publish ``BENCH_GALERA_POSTS`` (100) posts
  each, one author per thread;

each with ``DATABASE_GALERA=pinned`` (every connection on node 1) and ``spread``
(connections rotate over the three nodes: the pool's connections, handed out in turn,
put concurrent requests on different nodes; the node of every checkout is counted),
in ``BENCH_GALERA_ROUNDS`` (3) rounds whose mode order alternates, every cell capped
at ``BENCH_GALERA_CELL_SECONDS`` (20). Certification failures and brute-force aborts
are the nodes' ``wsrep_local_cert_failures`` / ``wsrep_local_bf_aborts`` deltas,
retries the "retrying" records of ``myapp.db.units``.

- causal reads: ``GET /posts/<id>`` pinned, ``DATABASE_GALERA_SYNC_WAIT=1`` against
  ``0`` and against a plain URL to the same node (no Galera handling), batches
  interleaved in random order (``BENCH_GALERA_READ_BATCHES`` of
  ``BENCH_GALERA_READ_BATCH``: 20 of 40); median µs per request, on an idle cluster
  and while a thread publishes posts through node 2.

Writes ``bench/results/galera.json``; ``bench/report.py`` puts it in
``docs/performance.md``. The three nodes share this machine's two cores with the
benchmark itself: spread mode gains no capacity here, so read its figures as the cost
of the conflicts, not as what three hosts would give.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event, select
from sqlalchemy.engine import URL

from bench.run import SECRET_KEY, log
from myapp.db import galera as galera_module
from myapp.models import Post

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "galera.json"
MODES = ("pinned", "spread")
PASSWORD = "correct horse battery"
_VERSION = re.compile(r'name="version" type="hidden" value="(\d+)"')


def _setting(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


# -- apps and what they do ------------------------------------------------------------


def galera_app(url: URL, mode: str, threads: int, sync_wait: int = 1) -> Flask:
    """myapp on the cluster URL, a pool with a connection per thread (so that spread
    connections reach every node); the login limiter stays on, as in production."""
    from myapp import create_app

    return create_app({
        "DATABASE_URL": url, "SECRET_KEY": SECRET_KEY, "WTF_CSRF_ENABLED": False,
        "DATABASE_GALERA": mode, "DATABASE_GALERA_SYNC_WAIT": sync_wait,
        "DATABASE_POOL_SIZE": threads, "DATABASE_MAX_OVERFLOW": 2, "DATABASE_APP_NAME": f"myapp-bench-{mode}",
    })


def register(app: Flask, username: str) -> int:
    """A new user, logged in once; its id, for the session cookies of other clients."""
    client = app.test_client()
    client.post("/auth/register", data={"username": username, "password": PASSWORD})
    response = client.post("/auth/login", data={"username": username, "password": PASSWORD})
    if response.status_code != 302:
        raise RuntimeError(f"logging in {username} answered {response.status_code}")
    with client.session_transaction() as session:
        return int(session["user_id"])


def client_of(app: Flask, user_id: int) -> FlaskClient:
    """A test client logged in as ``user_id`` (the apps share one secret key)."""
    client = app.test_client()
    with client.session_transaction() as session:
        session["user_id"] = user_id
    return client


def publish(client: FlaskClient, title: str) -> tuple[int, int | None]:
    """The status of ``POST /posts/new`` and, when acknowledged, the new post's id."""
    response = client.post("/posts/new", data={"title": title, "body": "Written by bench/galera.py"})
    if response.status_code != 302:
        return response.status_code, None
    return 302, int(response.headers["Location"].rsplit("/", 1)[1])


def dispose(app: Flask) -> None:
    state = app.extensions["myapp.database"]
    state.engine.dispose()
    state.probe_engine.dispose()


class NodeCount:
    """The node of every connection checked out of the app's pool: proof of where the
    requests of a cell really went."""

    def __init__(self, app: Flask) -> None:
        self.nodes: Counter[str] = Counter()
        self._lock = threading.Lock()
        event.listen(app.extensions["myapp.database"].engine, "checkout", self._count)

    def _count(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        with self._lock:
            self.nodes[str(record.info.get(galera_module.NODE_KEY))] += 1

    def take(self) -> dict[str, int]:
        with self._lock:
            taken = dict(sorted(self.nodes.items()))
            self.nodes.clear()
        return taken


class RetryCount(logging.Handler):
    """Counts ``db.retrying()``'s "retrying ..." records; anything else at WARNING or
    above is shown, since the logger no longer propagates while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("retrying"):
            with self._lock:
                self.count += 1
        elif record.levelno >= logging.WARNING:
            log(f"{record.name}: {record.getMessage()}")


# -- one cell -----------------------------------------------------------------------------


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    acknowledged: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, status: int) -> None:
        with self.lock:
            self.statuses[status] += 1
            self.acknowledged += status == 302


def edit_loop(client: FlaskClient, post_id: int, count: int, label: str, deadline: float, tally: Tally) -> None:
    """Edit one post ``count`` times: the form (its hidden version), then the save."""
    for n in range(count):
        if time.monotonic() > deadline:
            return
        form = client.get(f"/posts/{post_id}/edit")
        if form.status_code != 200:
            tally.add(form.status_code)
            continue
        found = _VERSION.search(form.get_data(as_text=True))
        if found is None:
            raise RuntimeError("no version field in the edit form")
        title = f"{label} {n}"
        tally.add(client.post(f"/posts/{post_id}/edit",
                              data={"title": title, "body": title, "version": found.group(1)}).status_code)


def publish_loop(client: FlaskClient, count: int, label: str, deadline: float, tally: Tally) -> None:
    for n in range(count):
        if time.monotonic() > deadline:
            return
        tally.add(publish(client, f"{label} {n}")[0])


@dataclass
class Bench:
    cluster: Any  # tests.topology.GaleraCluster
    apps: dict[str, Flask]
    nodes: dict[str, NodeCount]
    retries: RetryCount
    editor: int  # user ids
    writers: list[int]
    threads: int
    cell_seconds: float
    published: list[int] = field(default_factory=list)  # post ids, for the read cost

    def counters(self) -> tuple[int, int]:
        cert = bf = 0
        for node in self.cluster.nodes:
            cert += int(node.status("wsrep_local_cert_failures") or 0)
            bf += int(node.status("wsrep_local_bf_aborts") or 0)
        return cert, bf

    def cell(self, test: str, mode: str, repeat: int,
             work: Callable[[float, Tally], list[threading.Thread]]) -> dict[str, Any]:
        """Run the threads ``work`` makes; what the app answered and what the nodes saw."""
        tally = Tally()
        self.nodes[mode].take()
        cert_before, bf_before = self.counters()
        retries_before = self.retries.count
        started = time.monotonic()
        threads = work(started + self.cell_seconds, tally)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.monotonic() - started
        cert_after, bf_after = self.counters()
        answers = sum(tally.statuses.values())
        row = {
            "test": test, "mode": mode, "repeat": repeat, "threads": self.threads, "seconds": round(seconds, 3),
            "answers": answers, "acknowledged": tally.acknowledged,
            "acknowledged_per_second": round(tally.acknowledged / seconds, 1),
            "conflicts_409": tally.statuses[409],
            "server_errors": sum(n for status, n in tally.statuses.items() if status >= 500),
            "statuses": {str(status): n for status, n in sorted(tally.statuses.items())},
            "cert_failures": cert_after - cert_before, "bf_aborts": bf_after - bf_before,
            "retries": self.retries.count - retries_before,
            "checkouts_by_node": self.nodes[mode].take(),
        }
        log(f"{test:18} {mode:6} #{repeat}: {row['acknowledged_per_second']:6.1f} acknowledged/s "
            f"({tally.acknowledged} in {seconds:.1f} s), 409 {row['conflicts_409']}, cert failures "
            f"{row['cert_failures']}, bf aborts {row['bf_aborts']}, retries {row['retries']}, "
            f"5xx {row['server_errors']}, nodes {row['checkouts_by_node']}")
        return row

    def conflicting(self, mode: str, repeat: int, edits: int) -> dict[str, Any]:
        app = self.apps[mode]
        status, post_id = publish(client_of(self.apps["pinned"], self.editor), f"edited {mode} {repeat}")
        if post_id is None:
            raise RuntimeError(f"publishing the post to edit answered {status}")

        def work(deadline: float, tally: Tally) -> list[threading.Thread]:
            return [threading.Thread(target=edit_loop, args=(client_of(app, self.editor), post_id, edits,
                                                             f"thread {n}", deadline, tally))
                    for n in range(self.threads)]

        row = self.cell("conflicting edits", mode, repeat, work)
        # Every acknowledged edit bumped the version once: none lost, none doubled.
        with app.app_context():
            engine = app.extensions["myapp.database"].engine
            with engine.connect() as connection:  # a causal read (wsrep_sync_wait=1)
                version = connection.scalar(select(Post.version).where(Post.id == post_id))
        row["final_version"] = version
        row["versions_match"] = version == 1 + row["acknowledged"]
        if not row["versions_match"]:
            log(f"!! post {post_id}: version {version} after {row['acknowledged']} acknowledged edits")
        return row

    def non_conflicting(self, mode: str, repeat: int, posts: int) -> dict[str, Any]:
        app = self.apps[mode]

        def work(deadline: float, tally: Tally) -> list[threading.Thread]:
            return [threading.Thread(target=publish_loop, args=(client_of(app, writer), posts,
                                                                f"{mode} {repeat}.{n}", deadline, tally))
                    for n, writer in enumerate(self.writers)]

        return self.cell("new posts", mode, repeat, work)


# -- causal reads -------------------------------------------------------------------------


READ_CASES = ("sync_wait=1", "sync_wait=0", "node URL, no Galera handling")


def _timed_batches(clients: dict[str, FlaskClient], post_ids: list[int], batches: int, batch: int,
                   rng: random.Random) -> dict[str, list[float]]:
    """µs per request of each client over the same random ids, batch after batch, the
    clients' order shuffled each time."""
    times: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(batches):
        paths = [f"/posts/{rng.choice(post_ids)}" for _ in range(batch)]
        order = list(clients)
        rng.shuffle(order)
        for name in order:
            started = time.perf_counter()
            for path in paths:
                status = clients[name].get(path).status_code
                if status != 200:
                    raise RuntimeError(f"{path} answered {status} ({name})")
            times[name].append((time.perf_counter() - started) / batch * 1e6)
    return times


def write_until(client: FlaskClient, stop: threading.Event, deadline: float, tally: Tally) -> None:
    n = 0
    while not stop.is_set() and time.monotonic() < deadline:
        n += 1
        tally.add(publish(client, f"background {n}")[0])


def _median_ratio(slow: list[float], fast: list[float]) -> float:
    return round(statistics.median(a / b for a, b in zip(slow, fast)), 3)


def read_cost(cluster: Any, database: str, writer: int, post_ids: list[int], batches: int,
              batch: int) -> dict[str, Any]:
    """µs per ``GET /posts/<id>`` on node 1, pinned, with and without causal reads, and
    through a plain URL to node 1 (no readiness check at checkout) as the reference;
    on an idle cluster, then while a thread publishes posts through node 2 (the reads
    then have writesets to wait for)."""
    from myapp import create_app

    first, second = cluster.nodes[0], cluster.nodes[1]
    url = cluster.url(database)
    apps = {
        READ_CASES[0]: galera_app(url, "pinned", 1, 1),
        READ_CASES[1]: galera_app(url, "pinned", 1, 0),
        READ_CASES[2]: create_app({"DATABASE_URL": first.url(database), "SECRET_KEY": SECRET_KEY,
                                   "WTF_CSRF_ENABLED": False, "DATABASE_APP_NAME": "myapp-bench-plain"}),
    }
    writing = galera_app(cluster.url(database, second, first, cluster.nodes[2]), "pinned", 1)
    try:
        clients = {name: app.test_client() for name, app in apps.items()}
        rng = random.Random(12)
        _timed_batches(clients, post_ids, 1, 20, rng)  # connect and warm the templates
        conditions = []
        for condition in ("idle cluster", "while a thread publishes posts through node 2"):
            stop, tally = threading.Event(), Tally()
            background = None
            if condition != "idle cluster":
                # Bounded even if the reads were to hang.
                background = threading.Thread(target=write_until, args=(client_of(writing, writer), stop,
                                                                          time.monotonic() + 120, tally))
                background.start()
            try:
                times = _timed_batches(clients, post_ids, batches, batch, rng)
            finally:
                stop.set()
                if background is not None:
                    background.join()
            row: dict[str, Any] = {
                "condition": condition,
                "cases": [{"case": name, "us_per_request": round(statistics.median(times[name])),
                           "batch_us": [round(t) for t in times[name]]} for name in READ_CASES],
                "ratio": _median_ratio(times[READ_CASES[0]], times[READ_CASES[1]]),
                "ratio_to_plain": _median_ratio(times[READ_CASES[0]], times[READ_CASES[2]]),
                "background_writes": tally.acknowledged,
                "background_errors": sum(tally.statuses.values()) - tally.acknowledged,
            }
            conditions.append(row)
            log(f"post page, {condition}: " + ", ".join(f"{c['case']} {c['us_per_request']} µs" for c in row["cases"])
                + f"; sync_wait 1/0 {row['ratio']}, 1/plain {row['ratio_to_plain']}"
                + (f"; {tally.acknowledged} posts written meanwhile" if background is not None else ""))
        return {"batches": batches, "batch": batch, "conditions": conditions}
    finally:
        for app in (*apps.values(), writing):
            dispose(app)


# -- the run ------------------------------------------------------------------------------


def main() -> None:
    from myapp.db.engines import dispose_all_engines
    from tests.topology import galera_cluster

    threads = _setting("BENCH_GALERA_THREADS", 3)
    edits, posts = _setting("BENCH_GALERA_EDITS", 100), _setting("BENCH_GALERA_POSTS", 100)
    rounds = _setting("BENCH_GALERA_ROUNDS", 3)
    cell_seconds = float(_setting("BENCH_GALERA_CELL_SECONDS", 20))
    batches, batch = _setting("BENCH_GALERA_READ_BATCHES", 20), _setting("BENCH_GALERA_READ_BATCH", 40)
    load_before = os.getloadavg()
    started = time.monotonic()
    units_log = logging.getLogger("myapp.db.units")
    retries = RetryCount()
    log("starting a three-node Galera cluster")
    with galera_cluster() as cluster, cluster.database() as database:
        up = time.monotonic() - started
        versions = {"server": str(cluster.nodes[0].query("SELECT VERSION()")[0][0]),
                    "galera": cluster.nodes[0].status("wsrep_provider_version")}
        log(f"cluster up and database {database} migrated in {up:.0f} s ({versions})")
        url = cluster.url(database)
        apps = {mode: galera_app(url, mode, threads) for mode in MODES}
        level, propagate = units_log.level, units_log.propagate
        units_log.setLevel(logging.INFO)
        units_log.propagate = False  # thousands of "retrying" lines are counted, not shown
        units_log.addHandler(retries)
        try:
            bench = Bench(cluster, apps, {mode: NodeCount(app) for mode, app in apps.items()}, retries,
                          editor=register(apps["pinned"], "bench-editor"),
                          writers=[register(apps["pinned"], f"bench-writer-{n}") for n in range(threads)],
                          threads=threads, cell_seconds=cell_seconds)
            cells = []
            for repeat in range(rounds):
                order = MODES if repeat % 2 == 0 else MODES[::-1]
                for mode in order:
                    cells.append(bench.conflicting(mode, repeat, edits))
                for mode in order:
                    cells.append(bench.non_conflicting(mode, repeat, posts))
            with apps["pinned"].app_context():
                engine = apps["pinned"].extensions["myapp.database"].engine
                with engine.connect() as connection:
                    post_ids = list(connection.scalars(select(Post.id)))
            log(f"in process: causal reads on the post page ({len(post_ids)} posts)")
            reads = read_cost(cluster, database, bench.writers[0], post_ids, batches, batch)
        finally:
            units_log.removeHandler(retries)
            units_log.setLevel(level)
            units_log.propagate = propagate
            for app in apps.values():
                dispose(app)
            dispose_all_engines()
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "make bench-galera",
        "total_seconds": round(time.monotonic() - started),
        "cluster_start_seconds": round(up),
        "versions": versions,
        "load_average": {"start": [round(x, 2) for x in load_before], "end": [round(x, 2) for x in os.getloadavg()]},
        "threads": threads, "rounds": rounds, "edits_per_thread": edits, "posts_per_thread": posts,
        "cell_seconds_cap": cell_seconds,
        "cells": cells, "reads": reads,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    from bench import report

    report.write(json.loads(report.RESULTS.read_text()), main_chart=False)
    log(f"done in {results['total_seconds']} s: bench/results/galera.json, docs/performance.md")


if __name__ == "__main__":
    main()
