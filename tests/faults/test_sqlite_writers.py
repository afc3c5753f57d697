"""Scenario 9: SQLite under concurrent writers, over real gunicorn (2 workers x 4 threads).

Eight logged-in clients publish posts as fast as they can for a few seconds. With the
engine's ``BEGIN IMMEDIATE`` no "database is locked" reaches anyone and every
acknowledged post is in the database. The control swaps in SQLite's plain, deferred
``BEGIN``: the same read-then-write requests then fail with "database is locked".
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from flask import Flask
from sqlalchemy import select
from werkzeug.security import generate_password_hash

from myapp.db import db
from myapp.models import Post, User
from tests.support.databases import Backend
from tests.support.forms import csrf_token, post_form
from tests.support.gunicorn import stop_gunicorn

from .figures import record
from .raisingapp import serve

pytestmark = [
    pytest.mark.faults,
    pytest.mark.gunicorn,
    pytest.mark.real_commits,
    pytest.mark.backends("sqlite"),
]

CLIENTS = 8
SECONDS = 4.0
PASSWORD = "correct horse"


@dataclass
class History:
    """What the clients sent and what they were told (Jepsen-style)."""

    acknowledged: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _run_writers(app: Flask, backend: Backend, tmp_path: Path, factory: str) -> tuple[History, str]:
    """Start gunicorn with ``factory``, let the clients publish for SECONDS, stop it."""
    with app.app_context(), db.transaction() as session:
        password_hash = generate_password_hash(PASSWORD)  # one slow hash shared by all writers
        session.add_all(User(username=f"writer{i}", password_hash=password_hash) for i in range(CLIENTS))
    server = serve(backend.url.render_as_string(hide_password=False), tmp_path, factory=factory)
    history = History()
    try:
        start = threading.Barrier(CLIENTS)

        def client(i: int) -> None:
            with requests.Session() as browser:
                login = post_form(browser, f"{server.url}/auth/login", username=f"writer{i}", password=PASSWORD)
                assert login.status_code == 302
                token = csrf_token(browser.get(f"{server.url}/posts/new", timeout=30).text)
                start.wait(timeout=60)
                deadline, n = time.monotonic() + SECONDS, 0
                while time.monotonic() < deadline:
                    title = f"writer{i} post {n}"
                    response = browser.post(
                        f"{server.url}/posts/new", data={"csrf_token": token, "title": title, "body": "text"},
                        timeout=30, allow_redirects=False,
                    )
                    with history.lock:
                        history.statuses[response.status_code] += 1
                        if response.status_code == 302:
                            history.acknowledged.append(title)
                    n += 1

        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(client, range(CLIENTS)))
    finally:
        stop_gunicorn(server)
    return history, server.log_text()


def _titles(app: Flask) -> set[str]:
    with app.app_context():
        return set(db.session.scalars(select(Post.title)))


def test_concurrent_writers_never_see_database_is_locked(app: Flask, backend: Backend, tmp_path: Path) -> None:
    history, log = _run_writers(app, backend, tmp_path, "create_raising_app()")
    stored = _titles(app)
    locked = len(re.findall("database is locked", log))
    failed = sum(count for status, count in history.statuses.items() if status != 302)
    lost = len(set(history.acknowledged) - stored)
    injected = f"{CLIENTS} clients publishing for {SECONDS:g} s, gunicorn 2 workers x 4 threads"
    record("9 sqlite writers", backend.name, injected, "posts acknowledged", len(history.acknowledged),
           "> 0", len(history.acknowledged) > 0)
    record("9 sqlite writers", backend.name, injected, "'database is locked' errors", locked, "0", locked == 0)
    record("9 sqlite writers", backend.name, injected, "failed requests (500/503)", failed, "0", failed == 0)
    record("9 sqlite writers", backend.name, injected, "acknowledged posts missing", lost, "0", lost == 0)
    assert history.acknowledged, "the clients published nothing"
    assert (locked, failed, lost) == (0, 0, 0), history.statuses
    assert stored == set(history.acknowledged)  # and nothing unacknowledged either


def test_control_deferred_begin_gets_database_is_locked(app: Flask, backend: Backend, tmp_path: Path) -> None:
    history, log = _run_writers(app, backend, tmp_path, "create_raising_app(sqlite_deferred_begin=True)")
    locked = len(re.findall("database is locked", log))
    lost = len(set(history.acknowledged) - _titles(app))
    record("9 sqlite writers", backend.name, "control: plain deferred BEGIN, same load",
           "'database is locked' errors", locked, "> 0 (caught)", locked > 0)
    assert locked > 0 and history.statuses[503] > 0, history.statuses
    assert lost == 0  # a refused write is refused, never acknowledged and then lost
