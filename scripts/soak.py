"""Memory soak (issue 4, scenario 5): does a gunicorn worker's RSS stay flat?

Serves the site plus the fault routes (``tests/faults/raisingapp.py``) with one
gunicorn worker (4 threads, ``max_requests`` off, so no recycling hides a leak),
sends a warm-up, then the soak, and compares the worker's resident memory before and
after. One request in ten writes and then raises; one in ten writes and commits; the
rest read pages. Prints the RSS trajectory and the growth, records the figure for
``docs/reliability.md`` when ``MYAPP_FIGURES`` is set, and exits 1 when the growth
reaches the goal (5 MB).

Usage::

    python scripts/soak.py                        # a temporary SQLite database
    python scripts/soak.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test
    MYAPP_FIGURES=figures.jsonl python scripts/soak.py --requests 50000

A server URL gets a throwaway database of its own (created, migrated, dropped).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from itertools import count
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
from sqlalchemy.engine import URL, make_url  # noqa: E402

GOAL_MB = 5.0


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` from /proc (no psutil needed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextmanager
def soak_database(url: str | None, folder: Path) -> Iterator[URL]:
    """A migrated database with one author and a page of posts; dropped afterwards."""
    from myapp.db import db
    from myapp.models import Post, User
    from tests.support.apps import make_app, migrate
    from tests.support.databases import throwaway_database

    if url is None:
        target = make_url(f"sqlite:///{folder / 'soak.sqlite'}")
        stack: ExitStack | None = None
    else:
        import os

        variable = "TEST_POSTGRES_URL" if url.startswith("postgresql") else "TEST_MYSQL_URL"
        os.environ[variable] = url
        stack = ExitStack()
        name = "postgresql" if url.startswith("postgresql") else "mysql"
        # The temp-path factory is only used for SQLite.
        target = stack.enter_context(throwaway_database(name, None))  # type: ignore[arg-type]
    try:
        migrate(target)
        app = make_app(target)
        with app.app_context():
            with db.transaction() as session:
                author = User(username="soaker", password_hash="not-a-hash")
                session.add_all(Post(title=f"Soak post {i}", body="text " * 50, author=author) for i in range(25))
        db.app_state(app).engine.dispose()
        yield target
    finally:
        if stack is not None:
            stack.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="a server to soak against (default: a temporary SQLite file)")
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--warmup", type=int, default=5_000)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()

    from tests.faults.figures import record
    from tests.faults.raisingapp import serve
    from tests.support.gunicorn import stop_gunicorn

    with tempfile.TemporaryDirectory(prefix="myapp-soak-") as scratch, soak_database(
        args.database_url, Path(scratch)
    ) as url:
        backend = url.get_backend_name()
        server = serve(url.render_as_string(hide_password=False), Path(scratch),
                       WEB_CONCURRENCY="1", GUNICORN_THREADS="4", GUNICORN_ACCESS_LOG="/dev/null")
        try:
            worker = requests.get(f"{server.url}/_faults/pool", timeout=10).json()["pid"]
            post_ids = [int(href.rsplit("/", 1)[1]) for href in _post_links(server.url)]
            numbers = count()
            lock = threading.Lock()
            statuses: Counter[int] = Counter()

            def send(total: int) -> None:
                def client(_: int) -> None:
                    with requests.Session() as browser:
                        while True:
                            with lock:
                                i = next(numbers)
                            if i >= total:
                                return
                            status = _one_request(browser, server.url, i, post_ids)
                            with lock:
                                statuses[status] += 1

                with ThreadPoolExecutor(args.clients) as pool:
                    list(pool.map(client, range(args.clients)))

            started = time.monotonic()
            send(args.warmup)
            before = rss_kib(worker)
            print(f"soak: {backend}, worker {worker}, RSS after {args.warmup:,} warm-up requests: {before / 1024:.1f} MB")
            step = max(args.requests // 10, 1)
            for done in range(step, args.requests + 1, step):
                numbers = count(args.warmup + done - step)
                send(args.warmup + done)
                print(f"soak: {done:>7,} requests  RSS {rss_kib(worker) / 1024:.1f} MB", flush=True)
            after = rss_kib(worker)
            elapsed = time.monotonic() - started
        finally:
            stop_gunicorn(server)

    growth_mb = (after - before) / 1024
    met = growth_mb < GOAL_MB
    print(f"soak: statuses {dict(sorted(statuses.items()))} in {elapsed:.0f} s")
    print(f"soak: worker RSS grew by {growth_mb:.2f} MB over {args.requests:,} requests (goal < {GOAL_MB:g} MB): "
          f"{'met' if met else 'MISSED'}")
    record("5 leaks", backend,
           f"{args.requests:,}-request soak after {args.warmup:,} warm-up, 1 worker x 4 threads, 10% failing views",
           "worker RSS growth (MB)", round(growth_mb, 2), f"< {GOAL_MB:g}", met)
    unexpected = {status: n for status, n in statuses.items() if status not in (200, 201, 500)}
    if unexpected:
        print(f"soak: unexpected statuses {unexpected}")
    return 0 if met and not unexpected else 1


def _post_links(url: str) -> list[str]:
    import re

    return re.findall(r'href="(/posts/\d+)"', requests.get(url + "/", timeout=10).text)


def _one_request(browser: requests.Session, url: str, i: int, post_ids: list[int]) -> int:
    """Request ``i`` of the mix: pages, a plain read, a failing write, a committed write."""
    kind = i % 10
    if kind == 0:
        response = browser.post(f"{url}/_faults/write/soak-fail-{i}?fail=1", timeout=30)
    elif kind == 5:
        response = browser.post(f"{url}/_faults/write/soak-ok-{i}", timeout=30)
    elif kind in (1, 2, 3, 4):
        response = browser.get(f"{url}/", timeout=30)
    elif kind in (6, 7, 8):
        response = browser.get(f"{url}/posts/{post_ids[i % len(post_ids)]}", timeout=30)
    else:
        response = browser.get(f"{url}/_faults/read", timeout=30)
    return response.status_code


if __name__ == "__main__":
    sys.exit(main())
