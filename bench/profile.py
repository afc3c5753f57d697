"""Where a request's time goes: pyinstrument over many in-process requests of one
route, for myapp or a peer, against a seeded database.

    python -m bench.profile DATABASE_URL [app] [route] [requests]

``app`` is myapp (default) or a peer module name (fsa, scoped, psycopg_raw, bare);
``route`` is post (default), index, healthz or create. Prints the call tree and the
mean time per request; no server, so no network or gunicorn costs are in it.
"""

from __future__ import annotations

import importlib
import os
import random
import sys
import time

from flask import Flask
from pyinstrument import Profiler


def load(app_name: str, url: str) -> Flask:
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("SECRET_KEY", "profile-" + "x" * 32)
    if app_name == "myapp":
        from myapp import create_app

        return create_app({"DATABASE_URL": url, "WTF_CSRF_ENABLED": False})
    return importlib.import_module(f"bench.peers.{app_name}").app  # type: ignore[no-any-return]


def main() -> None:
    url = sys.argv[1]
    app_name = sys.argv[2] if len(sys.argv) > 2 else "myapp"
    route = sys.argv[3] if len(sys.argv) > 3 else "post"
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 2000
    app = load(app_name, url)
    client = app.test_client()
    if route == "create":
        with client.session_transaction() as cookie:
            cookie["user_id"] = 1
    rng = random.Random(1)

    def one() -> None:
        if route == "post":
            response = client.get(f"/posts/{rng.randint(1, 10_000)}")
        elif route == "index":
            response = client.get(f"/?page={rng.randint(1, 500)}")
        elif route == "create":
            response = client.post("/posts/new", data={"title": "Profiled", "body": "Profiled body"})
        else:
            response = client.get("/healthz")
        assert response.status_code in (200, 302), response.status_code

    for _ in range(200):  # warm-up
        one()
    profiler = Profiler(interval=0.0002)
    started = time.perf_counter()
    with profiler:
        for _ in range(count):
            one()
    elapsed = time.perf_counter() - started
    print(profiler.output_text(unicode=True, color=False, show_all=False))
    print(f"{app_name} {route}: {elapsed / count * 1e6:.0f} us per request (profiled, in process)")


if __name__ == "__main__":
    main()
