"""``make bench-replicas`` (or ``make bench BENCH_REPLICAS=1``): the post page served with
0, 1 and 2 read replicas, and what read-your-writes costs per request.

It starts its own throwaway primary with two streaming standbys (tests/topology, as the
fault suite does), seeds ``myapp_bench`` there as ``make bench`` does, and then:

- serves myapp three times with gunicorn (no replica, standby 1, standbys 1 and 2) and
  loads ``GET /posts/<id>`` on each in interleaved repeats;
- in process, times the same page for a user with no WAL position in the cookie, one
  whose position every replica has replayed (decided from the cached replay position:
  no round trip), and one whose position no replica has replayed (the replica is asked
  at most every ``REPLAY_LSN_TTL``, then the primary serves), and counts the statements
  each case sends to each server.

Writes ``bench/results/replicas.json``; ``bench/report.py`` puts it in
``docs/performance.md``. All servers here share one machine: a replica adds no CPU, so
the served figures show what the routing costs, not what a real second host would add.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from flask import Flask
from sqlalchemy import event
from sqlalchemy.engine import URL

from bench import loadgen
from myapp.db.replication import Replicas

from bench.run import DATABASE, SECRET_KEY, log, migrate_and_seed, start_server, stop_server, throwaway_database

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "replicas.json"


def served(url: URL, standbys: list[URL], max_id: int, repeats: int, seconds: float, folder: Path) -> list[dict[str, Any]]:
    configurations = {
        "0 replicas": "",
        "1 replica": standbys[0].render_as_string(hide_password=False),
        "2 replicas": ",".join(standby.render_as_string(hide_password=False) for standby in standbys),
    }
    servers = [
        start_server(name, "bench.project_wsgi:app", url, folder,
                     {"DATABASE_REPLICA_URLS": urls, "DATABASE_APP_NAME": f"myapp-bench-{name[0]}r"}, tag="replicas-")
        for name, urls in configurations.items()
    ]
    route = loadgen.Route("post", max_id=max_id)
    cells = []
    try:
        for server in servers:
            loadgen.run(server.url, route, 1, 8)
        for repeat in range(repeats):
            shift = repeat % len(servers)
            for server in servers[shift:] + servers[:shift]:
                sample = loadgen.run(server.url, route, seconds, int(os.environ.get("BENCH_CONNECTIONS", "8")))
                cells.append({"app": server.name, "repeat": repeat, "rps": sample.rps, "p50_ms": sample.p50_ms,
                              "p99_ms": sample.p99_ms, "errors": sample.errors, "requests": sample.requests})
                log(f"replicas {server.name:10} #{repeat}: {sample.rps:7.0f} req/s  p50 {sample.p50_ms:6.2f} ms  "
                    f"p99 {sample.p99_ms:6.2f} ms  errors {sample.errors}")
    finally:
        for server in servers:
            stop_server(server)
    return cells


def _count_statements(app: Flask) -> Counter[str]:
    counts: Counter[str] = Counter()
    state = app.extensions["myapp.database"]
    event.listen(state.engine, "before_cursor_execute", lambda *args: counts.update(["primary"]))
    if state.feature(Replicas) is not None:
        for replica in state.feature(Replicas).replica_set.replicas:
            event.listen(replica.engine, "before_cursor_execute",
                         lambda *args, name=replica.name: counts.update([name]))
    return counts


def check_cost(url: URL, standby: URL, max_id: int, batches: int = 30, batch: int = 100) -> list[dict[str, Any]]:
    """µs per request of the post page in process, per case, batches interleaved."""
    from myapp import create_app
    from myapp.db import sticking
    from myapp.db.engines import dispose_all_engines

    base = {"DATABASE_URL": url, "SECRET_KEY": SECRET_KEY, "WTF_CSRF_ENABLED": False}
    plain = create_app(base)
    replicated = create_app({**base, "DATABASE_REPLICA_URLS": standby.render_as_string(hide_password=False)})
    replica_set = replicated.extensions["myapp.database"].feature(Replicas).replica_set
    replica_set.check()
    primary_lsn = replica_set.replicas[0].replay_lsn
    cases: dict[str, tuple[Flask, int | None]] = {
        "no replicas configured": (plain, None),
        "no replicas configured, the same cookie as below": (plain, primary_lsn),
        "replica, user with no position": (replicated, None),
        "replica, position already replayed (cached: no round trip)": (replicated, primary_lsn),
        "replica, position not replayed (asked at most every 50 ms; the primary serves)": (
            replicated, sticking.UNKNOWN_POSITION),
    }
    forget = sticking.forget_if_replayed
    sticking.forget_if_replayed = lambda replicas: None  # keep each case's position in the cookie
    try:
        clients = {}
        for name, (app, lsn) in cases.items():
            client = app.test_client()
            if lsn is not None:
                with client.session_transaction() as kept:
                    kept[sticking.KEY] = [lsn, int(time.time())]
            clients[name] = client
        rng = random.Random(11)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for turn in range(batches):
            paths = [f"/posts/{rng.randint(1, max_id)}" for _ in range(batch)]
            names = list(cases)
            rng.shuffle(names)
            for name in names:
                started = time.perf_counter()
                for path in paths:
                    assert clients[name].get(path).status_code == 200
                times[name].append((time.perf_counter() - started) / batch * 1e6)
        rows = []
        for name, (app, lsn) in cases.items():
            counts = _count_statements(app)
            for _ in range(200):
                clients[name].get(f"/posts/{rng.randint(1, max_id)}")
                time.sleep(0.001)  # spread over ~0.3 s: several 50 ms windows
            rows.append({
                "case": name, "us_per_request": round(statistics.median(times[name])),
                "statements_per_request": {server: round(count / 200, 2) for server, count in sorted(counts.items())},
            })
            log(f"{name}: {rows[-1]['us_per_request']} µs/request, statements {rows[-1]['statements_per_request']}")
        rows.append(decision_cost(replica_set, primary_lsn))
        log(f"{rows[-1]['case']}: {rows[-1]['us_per_request']} µs")
        return rows
    finally:
        sticking.forget_if_replayed = forget
        replica_set.dispose()
        dispose_all_engines()


def decision_cost(replica_set: Any, required_lsn: int, calls: int = 200_000) -> dict[str, Any]:
    """The routing decision alone, for a position the cached replay position has passed."""
    never = lambda replica: None  # noqa: E731 (a cache hit never asks)
    started = time.perf_counter()
    for _ in range(calls):
        replica_set.choose(required_lsn, never)
    return {
        "case": "the decision alone (ReplicaSet.choose, cache hit)",
        "us_per_request": round((time.perf_counter() - started) / calls * 1e6, 2),
        "statements_per_request": {},
    }


def main() -> None:
    from tests.topology import replicated_postgres

    seconds = float(os.environ.get("BENCH_SECONDS", "2"))
    repeats = int(os.environ.get("BENCH_REPEATS", "6"))
    started = time.monotonic()
    log("starting a primary and two streaming standbys")
    with replicated_postgres(standbys=2) as topology, tempfile.TemporaryDirectory(prefix="myapp-bench-") as logs:
        admin = topology.primary.url("postgres").render_as_string(hide_password=False)
        with throwaway_database("postgresql", admin) as url:
            log("migrating and seeding 1,000 users and 10,000 posts on the primary")
            seeded = migrate_and_seed(url)
            for standby in topology.standbys:
                topology.wait_for_replay(standby, timeout=60)
            standbys = [standby.url(DATABASE) for standby in topology.standbys]
            cells = served(url, standbys, seeded.max_post_id, repeats, seconds, Path(logs))
            log("in process: the cost of the read-your-writes check")
            cost = check_cost(url, standbys[0], seeded.max_post_id)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": seconds, "repeats": repeats, "load_generator": loadgen.tool(),
        "total_seconds": round(time.monotonic() - started),
        "served": cells, "check_cost": cost,
        "command": "make bench-replicas",
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    from bench import report

    report.write(json.loads(report.RESULTS.read_text()))
    log(f"done in {results['total_seconds']} s: bench/results/replicas.json, docs/performance.md")


if __name__ == "__main__":
    main()
