"""A/B of one database-layer change, in process and finely interleaved: batches of
requests alternate between two apps on the same seeded database, and the median of
the per-pair ratios is reported. Less noisy than the served benchmark on a busy
machine, because both sides of each pair run within a fraction of a second.

    python -m bench.ab DATABASE_URL   (a database seeded by ``flask seed``)
"""

from __future__ import annotations

import random
import statistics
import sys
import time

from flask import Flask

from myapp import create_app
from myapp.db import db

SECRET_KEY = "ab-" + "x" * 40


def app_with(url: str, full_ping: bool = False, **config: object) -> Flask:
    app = create_app({"DATABASE_URL": url, "SECRET_KEY": SECRET_KEY, "WTF_CSRF_ENABLED": False, **config})
    if full_ping:
        with app.app_context():
            dialect = db.get_engine().dialect
            if "do_ping" in vars(dialect):
                del dialect.do_ping
    return app


def per_request_us(app: Flask, paths: list[str]) -> float:
    client = app.test_client()
    started = time.perf_counter()
    for path in paths:
        assert client.get(path).status_code == 200
    return (time.perf_counter() - started) / len(paths) * 1e6


def compare(name: str, after: Flask, before: Flask, route: str, pairs: int = 40, batch: int = 100) -> dict[str, object]:
    rng = random.Random(7)
    ratios, a_times, b_times = [], [], []
    for pair in range(pairs):
        paths = [route.format(rng.randint(1, 10_000) if "posts" in route else rng.randint(1, 500)) for _ in range(batch)]
        order = [(after, a_times), (before, b_times)] if pair % 2 else [(before, b_times), (after, a_times)]
        for app, times in order:
            times.append(per_request_us(app, paths))
        ratios.append(b_times[-1] / a_times[-1])
    result = {
        "change": name, "route": route, "after_us": round(statistics.median(a_times)),
        "before_us": round(statistics.median(b_times)), "ratio": round(statistics.median(ratios), 3), "pairs": pairs,
    }
    print(f"{name} {route}: after {result['after_us']} us, before {result['before_us']} us per request; "
          f"throughput after/before {result['ratio']:.2f}x (median of {pairs} pairs)", flush=True)
    return result


def peer(name: str, url: str) -> Flask:
    """A peer app of bench/peers/, built from the environment like under gunicorn."""
    import importlib
    import os

    os.environ.update(DATABASE_URL=url, SECRET_KEY=SECRET_KEY)
    return importlib.import_module(f"bench.peers.{name}").app  # type: ignore[no-any-return]


def run_peers(url: str) -> list[dict[str, object]]:
    """myapp against each database peer, in process, on the two read pages."""
    now = app_with(url)
    rows = []
    for name, label in (("fsa", "Flask-SQLAlchemy"), ("scoped", "Flask docs pattern"), ("psycopg_raw", "psycopg")):
        other = peer(name, url)
        per_request_us(other, ["/posts/1"] * 50)
        rows.append(compare(f"myapp vs {label}", now, other, "/posts/{}", pairs=20))
        rows.append(compare(f"myapp vs {label}", now, other, "/?page={}", pairs=10, batch=20))
    return rows


def run_all(url: str) -> list[dict[str, object]]:
    """The database-layer changes of docs/performance.md, each against its "before"."""
    from myapp.db.engines import dispose_all_engines

    now, full_ping = app_with(url), app_with(url, full_ping=True)
    transactional = app_with(url, DATABASE_READ_ONLY_AUTOCOMMIT=False)
    for warm in (now, full_ping, transactional):
        per_request_us(warm, ["/posts/1"] * 50)
    results = [
        compare("free pre-ping on a quiet socket", now, full_ping, "/posts/{}"),
        compare("GET requests read in autocommit", now, transactional, "/posts/{}"),
        compare("free pre-ping on a quiet socket", now, full_ping, "/?page={}", pairs=20, batch=20),
    ]
    dispose_all_engines()
    return results


def main() -> None:
    run_all(sys.argv[1])
    run_peers(sys.argv[1])


if __name__ == "__main__":
    main()
