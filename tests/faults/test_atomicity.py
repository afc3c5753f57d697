"""Scenario 7: a write is all or nothing.

A view that writes and then fails leaves no row. A gunicorn worker SIGKILLed between
its write and its commit leaves no partial row, its transaction ends on the server,
and the other worker keeps serving. The controls commit half of the work first and
show that the same checks then find the half.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from sqlalchemy import func, select

from myapp.db import db
from myapp.models import Post, User
from tests.support.databases import Backend
from tests.support.gunicorn import stop_gunicorn

from .figures import record
from .raisingapp import add_fault_routes, open_transactions, serve

pytestmark = [pytest.mark.faults, pytest.mark.real_commits]

SLEEP_SECONDS = 20  # the victim's write waits this long for its commit; it is killed long before


@pytest.fixture
def app_config() -> dict[str, Any]:
    return {"PROPAGATE_EXCEPTIONS": False}


def _rows_of(app: Flask, username: str) -> tuple[int, int]:
    """(users, posts) written under ``username``."""
    with app.app_context():
        users = db.session.scalar(select(func.count(User.id)).where(User.username == username)) or 0
        posts = db.session.scalar(
            select(func.count(Post.id)).join(Post.author).where(User.username == username)
        ) or 0
    return users, posts


@pytest.mark.parametrize("split", [False, True], ids=["atomic", "control-committed-first"])
def test_a_view_that_writes_then_fails_leaves_nothing(app: Flask, backend: Backend, split: bool) -> None:
    add_fault_routes(app)
    response = app.test_client().post(f"/_faults/write/doomed?fail=1{'&split=1' if split else ''}")
    assert response.status_code == 500
    users, _ = _rows_of(app, "doomed")
    if split:
        record("7 atomicity", backend.name, "control: the view commits, then raises", "rows left", users,
               "1 (caught)", users == 1)
        assert users == 1
    else:
        record("7 atomicity", backend.name, "a view writes, then raises", "rows left", users, "0", users == 0)
        assert users == 0


@pytest.mark.gunicorn
@pytest.mark.parametrize("split", [False, True], ids=["atomic", "control-committed-first"])
def test_a_worker_killed_mid_write_leaves_no_partial_row(
    app: Flask, backend: Backend, tmp_path: Path, split: bool
) -> None:
    app_name = f"myapp-kill-{secrets.token_hex(3)}"
    server = serve(
        backend.url.render_as_string(hide_password=False), tmp_path,
        DATABASE_APP_NAME=app_name, FAULTS_PID_DIR=str(tmp_path),
    )
    victim = "victim"
    try:
        with ThreadPoolExecutor(1) as pool:
            query = f"?seconds={SLEEP_SECONDS}{'&split=1' if split else ''}"
            pending: Future[Any] = pool.submit(
                requests.post, f"{server.url}/_faults/slow-write/{victim}{query}", timeout=SLEEP_SECONDS + 10
            )
            worker = _wait_for_pid(tmp_path / f"{victim}.pid")
            open_before_kill = open_transactions(backend.url, f"{app_name}:{worker}")
            os.kill(worker, signal.SIGKILL)
            with pytest.raises(requests.ConnectionError):
                pending.result()

        released_after = _seconds_until_no_open_transaction(backend.url, f"{app_name}:{worker}")
        after_kill = [requests.get(f"{server.url}/_faults/read", timeout=30).status_code for _ in range(20)]
        after_kill.append(requests.post(f"{server.url}/_faults/write/survivor", timeout=30).status_code)
        _wait_for_replacement(tmp_path, worker)
    finally:
        stop_gunicorn(server)

    users, posts = _rows_of(app, victim)
    partial = int(users != posts)
    failures_after = sum(status >= 400 for status in after_kill)
    if split:
        injected = "control: first half committed, worker SIGKILLed before the second"
        record("7 atomicity", backend.name, injected, "partial rows", partial, "1 (caught)", partial == 1)
        assert (users, posts) == (1, 0)
        return
    injected = "gunicorn worker SIGKILLed between its write and its commit"
    record("7 atomicity", backend.name, injected, "partial rows", partial, "0", partial == 0)
    record("7 atomicity", backend.name, injected, "failed requests after the kill", failures_after, "0",
           failures_after == 0)
    record("7 atomicity", backend.name, injected, "seconds until the server ended its transaction",
           round(released_after, 2), "< 5", released_after < 5)
    assert open_before_kill == 1, "the victim's transaction should have been open when it was killed"
    assert (users, posts) == (0, 0)
    assert after_kill == [200] * 20 + [201]
    assert _rows_of(app, "survivor") == (1, 0)


def _wait_for_pid(path: Path) -> int:
    """The pid the slow route wrote once its first half was flushed."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError("the slow write never started")


def _wait_for_replacement(pid_dir: Path, killed: int) -> None:
    """Wait until the master's new worker has loaded the app: a worker still importing
    it has no signal handlers yet and would sit out the whole graceful timeout."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len([p for p in pid_dir.glob("worker-*.ready") if p.name != f"worker-{killed}.ready"]) >= 2:
            return
        time.sleep(0.05)
    raise AssertionError("no replacement worker booted within 30 s")


def _seconds_until_no_open_transaction(url: Any, app_name: str) -> float:
    started = time.monotonic()
    while open_transactions(url, app_name):
        if time.monotonic() - started > 10:
            raise AssertionError("the killed worker's transaction is still open after 10 s")
        time.sleep(0.05)
    return time.monotonic() - started
