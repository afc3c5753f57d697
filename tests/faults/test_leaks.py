"""Scenario 5: failing views leak nothing.

10,000 requests, one in ten to a view that writes and then raises, must leave no
connection checked out, no transaction open on the server, an empty registry and no
row from the failed views. The controls (a route that keeps its connection, an app
whose registry is never torn down) prove that the same checks see a leak.
"""

from __future__ import annotations

import gc
import logging
import secrets
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.globals import app_ctx
from sqlalchemy import func, select
from sqlalchemy.util import ScopedRegistry

from myapp.db import db
from myapp.models import User
from tests.support.databases import Backend
from tests.support.gunicorn import stop_gunicorn

from .figures import record
from .raisingapp import add_fault_routes, open_transactions, registry_size, release_leaked, serve

pytestmark = [pytest.mark.faults, pytest.mark.real_commits]

REQUESTS = 10_000
GUNICORN_REQUESTS = 1_000
INJECTED = "10% of requests write, then raise"


@pytest.fixture
def app_config() -> dict[str, Any]:
    return {"PROPAGATE_EXCEPTIONS": False}  # a raising view gets the 500 page, as in production


def _path(i: int) -> tuple[str, str]:
    """Request ``i`` of the mix: 1 in 10 writes then fails, 1 in 100 writes and commits
    (proof that the writes reach the database), the rest read."""
    if i % 10 == 0:
        return "POST", f"/_faults/write/fail-{i}?fail=1"
    if i % 100 == 5:
        return "POST", f"/_faults/write/ok-{i}"
    return "GET", "/_faults/read"


def _expected_statuses(requests_sent: int) -> Counter[int]:
    failing, committing = requests_sent // 10, requests_sent // 100
    return Counter({500: failing, 201: committing, 200: requests_sent - failing - committing})


def _count_users(app: Flask, prefix: str) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count(User.id)).where(User.username.like(f"{prefix}%"))) or 0


def _app_name_prefix() -> str:
    import os

    return f"myapp-test:{os.getpid()}"


def test_failing_views_leak_no_connection_transaction_or_session(app: Flask, backend: Backend) -> None:
    add_fault_routes(app)
    client = app.test_client()
    pool = db.app_state(app).engine.pool
    statuses: Counter[int] = Counter()
    worst_checked_out = worst_registry = tracebacks = 0
    for i in range(REQUESTS):
        method, path = _path(i)
        response = client.open(path, method=method)
        statuses[response.status_code] += 1
        if response.status_code == 500 and ("Traceback" in response.text or "InjectedFault" in response.text):
            tracebacks += 1
        worst_checked_out = max(worst_checked_out, pool.checkedout())  # type: ignore[attr-defined]
        worst_registry = max(worst_registry, registry_size())

    idle_in_transaction = open_transactions(backend.url, _app_name_prefix())
    failed_rows, committed_rows = _count_users(app, "fail-"), _count_users(app, "ok-")

    figures = {
        "connections checked out after any request (max)": (worst_checked_out, "0"),
        "sessions left in the registry (max)": (worst_registry, "0"),
        "transactions left open on the server": (idle_in_transaction, "0"),
        "rows left by the failing views": (failed_rows, "0"),
        "tracebacks in error pages": (tracebacks, "0"),
    }
    for figure, (value, goal) in figures.items():
        record("5 leaks", backend.name, f"{REQUESTS:,} in-process requests, {INJECTED}", figure, value, goal, value == 0)
    assert statuses == _expected_statuses(REQUESTS), statuses
    assert {name: value for name, (value, _) in figures.items()} == dict.fromkeys(figures, 0)
    assert committed_rows == REQUESTS // 100  # the committed writes did land


def test_failing_views_over_gunicorn_leak_nothing(app: Flask, backend: Backend, tmp_path: Path) -> None:
    app_name = f"myapp-leak-{secrets.token_hex(3)}"
    # One worker, so that /_faults/pool reports on the process that served every request.
    server = serve(
        backend.url.render_as_string(hide_password=False), tmp_path, DATABASE_APP_NAME=app_name, WEB_CONCURRENCY="1"
    )
    try:
        def client(start: int) -> Counter[int]:
            seen: Counter[int] = Counter()
            with requests.Session() as browser:
                for i in range(start, GUNICORN_REQUESTS, 4):
                    method, path = _path(i)
                    seen[browser.request(method, server.url + path, timeout=30).status_code] += 1
            return seen

        with ThreadPoolExecutor(4) as pool:
            statuses = sum(pool.map(client, range(4)), Counter())
        worker = requests.get(f"{server.url}/_faults/pool", timeout=10).json()
        open_after = open_transactions(backend.url, app_name)  # before the workers close their pools
    finally:
        stop_gunicorn(server)
    failed_rows = _count_users(app, "fail-")
    injected = f"{GUNICORN_REQUESTS:,} requests over gunicorn (1 worker x 4 threads), {INJECTED}"
    figures = {
        "connections checked out in the worker": worker["checked_out"],
        "sessions left in the worker's registry": worker["registry"],
        "transactions left open on the server": open_after,
        "rows left by the failing views": failed_rows,
    }
    for figure, value in figures.items():
        record("5 leaks", backend.name, injected, figure, value, "0", value == 0)
    assert statuses == _expected_statuses(GUNICORN_REQUESTS)
    assert figures == dict.fromkeys(figures, 0)


# -- negative controls: the same checks see a leak -------------------------------------


def test_control_a_route_that_keeps_its_connection_is_caught(app: Flask, backend: Backend) -> None:
    add_fault_routes(app)
    client = app.test_client()
    pool = db.app_state(app).engine.pool
    try:
        for i in range(30):
            client.get("/_faults/leak" if i % 10 == 0 else "/_faults/read")
        checked_out = pool.checkedout()  # type: ignore[attr-defined]
        open_on_server = open_transactions(backend.url, _app_name_prefix())
    finally:
        release_leaked()
    record("5 leaks", backend.name, "control: a route keeps 3 connections", "connections checked out",
           checked_out, "3 (caught)", checked_out == 3)
    assert checked_out == 3
    if backend.is_sqlite:
        assert open_on_server == 0  # a read holds no write lock: the pool figure catches it
    else:
        assert open_on_server == 3


def test_sessions_whose_teardown_never_runs_are_closed_with_their_context(
    app: Flask, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """The registry's safety net: with its teardown removed, each session is closed when
    its context is freed (and said so in the log), so nothing stays behind."""
    add_fault_routes(app, without_teardown=True)
    client = app.test_client()
    pool = db.app_state(app).engine.pool
    with caplog.at_level(logging.WARNING, logger="myapp.db"):
        for _ in range(5):
            client.get("/_faults/read")
        gc.collect()
    left, checked_out = registry_size(), pool.checkedout()  # type: ignore[attr-defined]
    closed = caplog.text.count("outlived its app context")
    record("5 leaks", backend.name, "the registry's teardown removed", "sessions left / closed by the safety net",
           f"{left} / {closed}", "0 / 5", left == 0 and closed == 5)
    assert (left, checked_out, closed) == (0, 0, 5)


def test_control_a_registry_without_teardown_or_safety_net_is_caught(
    app: Flask, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same checks see a leak when nothing closes the sessions: a plain registry
    keyed on id() of the context, and no teardown."""
    plain = ScopedRegistry(db.session.registry.createfunc, lambda: id(app_ctx._get_current_object()))
    monkeypatch.setattr(db.session, "registry", plain)
    monkeypatch.setattr(db, "_abandon", lambda key: None)  # and no safety net either
    add_fault_routes(app, without_teardown=True)
    client = app.test_client()
    pool = db.app_state(app).engine.pool
    try:
        for _ in range(5):  # reads: on SQLite a leaked writer would block the next request
            client.get("/_faults/read")
        left, checked_out = registry_size(), pool.checkedout()  # type: ignore[attr-defined]
    finally:
        for session in list(plain.registry.values()):
            session.close()
        plain.registry.clear()
    record("5 leaks", backend.name, "control: no teardown, no safety net", "sessions left in the registry",
           left, ">0 (caught)", left > 0)
    assert left > 0 and checked_out > 0
