"""Scenario 9: SQLite under concurrent writers, over real gunicorn (2 workers x 4 threads).

Eight logged-in clients each publish a post, then edit it as fast as they can for a
few seconds: an edit is a read-then-write unit (the post and its version are read, then
updated, in one transaction). With the engine's ``BEGIN IMMEDIATE`` no "database is
locked" reaches anyone and every post holds its last acknowledged edit. The control
swaps in SQLite's plain, deferred ``BEGIN``: the same requests then fail with
"database is locked" (a reader's snapshot cannot become a writer once another commit
went in).
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
    """What the clients sent and what they were told (Jepsen-style): the title of each
    writer's post after its last acknowledged edit."""

    last_acknowledged: dict[int, str] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _edit_for(browser: requests.Session, base: str, i: int, history: History, start: threading.Barrier) -> None:
    """Publish one post, then edit it until the time is up, keeping its version."""
    login = post_form(browser, f"{base}/auth/login", username=f"writer{i}", password=PASSWORD)
    assert login.status_code == 302
    title = f"writer{i} post"
    created = post_form(browser, f"{base}/posts/new", title=title, body="text")
    assert created.status_code == 302, created.status_code
    post_id = int(created.headers["Location"].rsplit("/", 1)[1])
    token = csrf_token(browser.get(f"{base}/posts/{post_id}/edit", timeout=30).text)
    with history.lock:
        history.last_acknowledged[post_id] = title
    start.wait(timeout=60)
    deadline, version, n = time.monotonic() + SECONDS, 1, 0
    while time.monotonic() < deadline:
        title, n = f"writer{i} edit {n}", n + 1
        response = browser.post(
            f"{base}/posts/{post_id}/edit",
            data={"csrf_token": token, "title": title, "body": "text", "version": str(version)},
            timeout=30, allow_redirects=False,
        )
        with history.lock:
            history.statuses[response.status_code] += 1
            if response.status_code == 302:
                history.last_acknowledged[post_id] = title
                version += 1


def _run_writers(app: Flask, backend: Backend, tmp_path: Path, factory: str) -> tuple[History, str]:
    """Start gunicorn with ``factory``, let the clients edit for SECONDS, stop it."""
    with app.app_context(), db.transaction() as session:
        password_hash = generate_password_hash(PASSWORD)  # one slow hash shared by all writers
        session.add_all(User(username=f"writer{i}", password_hash=password_hash) for i in range(CLIENTS))
    server = serve(backend.url.render_as_string(hide_password=False), tmp_path, factory=factory)
    history = History()
    try:
        start = threading.Barrier(CLIENTS)

        def client(i: int) -> None:
            with requests.Session() as browser:
                _edit_for(browser, server.url, i, history, start)

        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(client, range(CLIENTS)))
    finally:
        stop_gunicorn(server)
    return history, server.log_text()


def _titles(app: Flask) -> dict[int, str]:
    with app.app_context():
        return {post_id: title for post_id, title in db.session.execute(select(Post.id, Post.title))}


def test_concurrent_writers_never_see_database_is_locked(app: Flask, backend: Backend, tmp_path: Path) -> None:
    history, log = _run_writers(app, backend, tmp_path, "create_raising_app()")
    stored = _titles(app)
    locked = len(re.findall("database is locked", log))
    failed = sum(count for status, count in history.statuses.items() if status != 302)
    lost = sum(stored.get(post_id) != title for post_id, title in history.last_acknowledged.items())
    injected = f"{CLIENTS} clients editing their posts for {SECONDS:g} s, gunicorn 2 workers x 4 threads"
    record("9 sqlite writers", backend.name, injected, "edits acknowledged", history.statuses[302],
           "> 0", history.statuses[302] > 0)
    record("9 sqlite writers", backend.name, injected, "'database is locked' errors", locked, "0", locked == 0)
    record("9 sqlite writers", backend.name, injected, "failed requests (500/503)", failed, "0", failed == 0)
    record("9 sqlite writers", backend.name, injected, "posts not at their last acknowledged edit", lost, "0",
           lost == 0)
    assert history.statuses[302] > 0, "the clients edited nothing"
    assert (locked, failed, lost) == (0, 0, 0), history.statuses


def test_control_deferred_begin_gets_database_is_locked(app: Flask, backend: Backend, tmp_path: Path) -> None:
    history, log = _run_writers(app, backend, tmp_path, "create_raising_app(sqlite_deferred_begin=True)")
    locked = len(re.findall("database is locked", log))
    stored = _titles(app)
    lost = sum(stored.get(post_id) != title for post_id, title in history.last_acknowledged.items())
    record("9 sqlite writers", backend.name, "control: plain deferred BEGIN, same load",
           "'database is locked' errors", locked, "> 0 (caught)", locked > 0)
    assert locked > 0 and history.statuses[503] > 0, history.statuses
    assert lost == 0  # a refused edit is refused, never acknowledged and then lost
