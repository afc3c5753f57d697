"""The circuit breaker and the bulkhead, in one process: a database that refuses
connections opens the breaker after a few failures, then requests are refused at once
without touching it; a bulkhead at its cap answers 503 instead of queueing a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import event, func, select, text

from myapp.db.breaker import Breaker, Guards
from myapp.db import db
from myapp.models import User
from tests.support.apps import make_app
from tests.support.databases import UNREACHABLE_URLS, Backend
from tests.support.metrics import Delta, sample

THRESHOLD = 3


@pytest.fixture(params=["postgresql", "mysql"])
def refused_app(request: pytest.FixtureRequest) -> Iterator[tuple[Flask, list[float]]]:
    """An app on a port where nothing listens (connects fail at once), counting its
    connect attempts."""
    app = make_app(
        UNREACHABLE_URLS[request.param], PROPAGATE_EXCEPTIONS=False,
        DATABASE_BREAKER_THRESHOLD=THRESHOLD, DATABASE_BREAKER_RESET=0.5,
    )
    attempts: list[float] = []
    for engine in (app.extensions["myapp.database"].engine, app.extensions["myapp.database"].probe_engine):
        event.listen(engine, "do_connect", lambda *args: attempts.append(time.monotonic()))
    # A refusal answered at once does not count by default (see the slow-failure tests
    # below); here every failure counts, to drive the breaker fast.
    app.extensions["myapp.database"].feature(Guards).breaker.slow_seconds = 0.0
    yield app, attempts
    app.extensions["myapp.database"].engine.dispose()


def test_breaker_opens_after_failures_in_a_row_and_refuses_at_once(
    refused_app: tuple[Flask, list[float]], caplog: pytest.LogCaptureFixture
) -> None:
    app, attempts = refused_app
    client = app.test_client()
    delta = Delta()
    for _ in range(THRESHOLD):
        assert client.get("/").status_code == 503
    assert sample("myapp_db_breaker_open", server="primary") == 1
    assert delta("myapp_db_breaker_opens_total", server="primary") == 1
    assert delta("myapp_http_unavailable_total", cause="unreachable") == THRESHOLD
    tried = len(attempts)
    assert tried >= THRESHOLD  # each of those requests tried the database

    started = time.monotonic()
    refused = [client.get("/") for _ in range(20)]
    assert all(r.status_code == 503 and r.headers["Retry-After"] == "1" for r in refused)
    assert "may or may not have been saved" in refused[0].text
    assert time.monotonic() - started < 1.0
    assert len(attempts) == tried  # not one more connect attempt while open
    assert delta("myapp_http_unavailable_total", cause="breaker") == 20
    assert "database circuit open after 3 failures in a row" in caplog.text

    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["breaker"]["state"] == "open"
    assert ready.get_json()["reason"].startswith("circuit breaker open: OperationalError")
    assert client.get("/healthz").status_code == 200


def test_one_probe_after_the_reset_period_then_open_again(refused_app: tuple[Flask, list[float]]) -> None:
    app, attempts = refused_app
    client = app.test_client()
    for _ in range(THRESHOLD):
        client.get("/")
    time.sleep(0.6)  # past DATABASE_BREAKER_RESET
    before = len(attempts)
    assert client.get("/").status_code == 503  # this request probed, and failed
    assert len(attempts) == before + 1  # exactly one connect: the probe's
    assert [client.get("/").status_code for _ in range(5)] == [503] * 5
    assert len(attempts) == before + 1


def test_refusals_answered_at_once_do_not_open_the_breaker() -> None:
    """A restart's "connection refused" ties up no thread: each request fails fast and the
    first one after the restart succeeds, so the breaker stays closed."""
    app = make_app(UNREACHABLE_URLS["postgresql"], PROPAGATE_EXCEPTIONS=False)
    client = app.test_client()
    assert [client.get("/").status_code for _ in range(10)] == [503] * 10
    assert app.extensions["myapp.database"].feature(Guards).breaker.status()["state"] == "closed"


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port whose listener accepts connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield listener.getsockname()[1]
    listener.close()


def test_slow_failures_open_the_breaker(silent_server: int, caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(f"mysql+pymysql://u:s3cret@127.0.0.1:{silent_server}/x", PROPAGATE_EXCEPTIONS=False,
                   DATABASE_CONNECT_TIMEOUT=1, DATABASE_BREAKER_RESET=30)
    client = app.test_client()
    timed = []
    for _ in range(THRESHOLD):
        started = time.monotonic()
        assert client.get("/").status_code == 503
        timed.append(time.monotonic() - started)
    assert min(timed) >= 0.9  # each waited out the connect timeout
    started = time.monotonic()
    assert client.get("/").status_code == 503
    assert time.monotonic() - started < 0.2  # refused at once: the breaker is open
    assert app.extensions["myapp.database"].feature(Guards).breaker.status()["state"] == "open"
    app.extensions["myapp.database"].engine.dispose()


@pytest.mark.backends("mysql")
def test_statements_that_time_out_open_the_breaker(backend: Backend) -> None:
    """A statement that waits past the network timeout (PyMySQL's read timeout) counts."""
    app = make_app(backend.url, DATABASE_NETWORK_TIMEOUT=1, PROPAGATE_EXCEPTIONS=False)

    @app.get("/_test/sleep")
    def sleep() -> str:
        db.session.execute(text("SELECT SLEEP(3)"))
        return "unreachable"

    client = app.test_client()
    assert [client.get("/_test/sleep").status_code for _ in range(THRESHOLD)] == [503] * THRESHOLD
    status = app.extensions["myapp.database"].feature(Guards).breaker.status()
    assert status["state"] == "open" and "2013" in status["last_error"]
    app.extensions["myapp.database"].engine.dispose()


def test_negative_control_without_breaker_every_request_tries_the_database() -> None:
    app = make_app(UNREACHABLE_URLS["postgresql"], PROPAGATE_EXCEPTIONS=False, DATABASE_BREAKER_THRESHOLD=0)
    attempts: list[float] = []
    event.listen(app.extensions["myapp.database"].engine, "do_connect", lambda *args: attempts.append(1.0))
    client = app.test_client()
    for _ in range(10):
        assert client.get("/").status_code == 503
    assert len(attempts) >= 10
    assert app.test_client().get("/readyz").get_json()["breaker"] is None


@pytest.mark.real_commits
def test_breaker_closes_when_the_probe_answers(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    """Open it by hand (three reported failures), then let the real database answer."""
    breaker = app.extensions["myapp.database"].feature(Guards).breaker
    for _ in range(THRESHOLD):
        breaker.record_failure(RuntimeError("simulated loss"))
    client = app.test_client()
    assert client.get("/").status_code == 503
    assert sample("myapp_db_breaker_open", server="primary") == 1
    breaker.reset_seconds = 0.0
    assert client.get("/").status_code == 200  # the probe answered: traffic resumes
    assert sample("myapp_db_breaker_open", server="primary") == 0
    assert breaker.status() == {"state": "closed", "failures_in_a_row": 0, "last_error": "RuntimeError: simulated loss"}
    assert "database circuit closed (primary): the probe answered" in caplog.text


@pytest.mark.real_commits
def test_a_statement_that_answers_resets_the_count(app: Flask) -> None:
    breaker = app.extensions["myapp.database"].feature(Guards).breaker
    breaker.record_failure(RuntimeError("one"))
    breaker.record_failure(RuntimeError("two"))
    assert app.test_client().get("/").status_code == 200
    assert breaker.failures == 0
    breaker.record_failure(RuntimeError("three"))
    assert breaker.state == "closed"


# -- the bulkhead ----------------------------------------------------------------------


@pytest.fixture
def app_config() -> dict[str, Any]:
    return {
        "DATABASE_BULKHEAD": 1, "DATABASE_BULKHEAD_TIMEOUT": 0.2, "DATABASE_POOL_TIMEOUT": 3,
        "PROPAGATE_EXCEPTIONS": False,
    }


def _hold_the_database(app: Flask) -> tuple[threading.Event, threading.Event]:
    """A route that queries, then keeps busy with work of its own until told to stop."""
    entered, leave = threading.Event(), threading.Event()

    @app.get("/_test/hold")
    def hold() -> str:
        db.session.scalar(select(func.count()).select_from(User))
        entered.set()
        leave.wait(10)
        return "held"

    return entered, leave


_SLEEP = {"postgresql": "SELECT pg_sleep(:seconds)", "mysql": "SELECT SLEEP(:seconds)"}


def _waiting_on_the_database(app: Flask, backend: Backend, seconds: float) -> tuple[threading.Thread, threading.Event]:
    """A request, in its own thread, whose statement waits ``seconds`` on the database."""
    entered = threading.Event()

    @app.get("/_test/stuck")
    def stuck() -> str:
        db.session.scalar(select(func.count()).select_from(User))
        entered.set()
        db.session.execute(text(_SLEEP[backend.name]), {"seconds": seconds})
        return "done"

    holder = threading.Thread(target=lambda: app.test_client().get("/_test/stuck"))
    holder.start()
    return holder, entered


@pytest.mark.real_commits
@pytest.mark.backends("postgresql", "mysql")
def test_bulkhead_refuses_at_once_when_every_holder_is_stuck_on_the_database(app: Flask, backend: Backend) -> None:
    holder, entered = _waiting_on_the_database(app, backend, 1.5)
    try:
        assert entered.wait(10)
        time.sleep(0.4)  # the holder has now waited on the database past the 0.2 s timeout
        delta = Delta()
        started = time.monotonic()
        refused = app.test_client().get("/")
        assert time.monotonic() - started < 0.15
        assert delta("myapp_db_bulkhead_refusals_total") == 1
        assert delta("myapp_http_unavailable_total", cause="bulkhead") == 1
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert "every database connection is in use" in refused.text
        assert app.test_client().get("/healthz").status_code == 200
    finally:
        holder.join(10)
    assert app.test_client().get("/").status_code == 200  # the slot came back


@pytest.mark.real_commits
@pytest.mark.backends("postgresql")
def test_bulkhead_slot_is_not_held_by_a_page_busy_after_its_reads(app: Flask) -> None:
    """A GET reading in autocommit holds nothing between statements: while it renders
    (or hashes) the next request is served at once instead of queueing behind it (a
    handoff per request, which a busy worker pays in CPU)."""
    entered, leave = _hold_the_database(app)
    holder = threading.Thread(target=lambda: app.test_client().get("/_test/hold"))
    holder.start()
    try:
        assert entered.wait(10)
        started = time.monotonic()
        assert app.test_client().get("/").status_code == 200
        assert time.monotonic() - started < 0.5  # no wait for a slot (the holder stays 10 s)
    finally:
        leave.set()
        holder.join(10)


@pytest.mark.real_commits
@pytest.mark.backends("postgresql", "mysql")
def test_bulkhead_queues_behind_a_holder_busy_inside_its_transaction(app: Flask) -> None:
    """Inside a transaction (its locks, a PgBouncer server connection) a holder keeps
    its slot while it works; it is not stuck, so the next request waits for the slot."""
    entered, leave = threading.Event(), threading.Event()

    @app.post("/_test/hold-in-transaction")
    def hold_in_transaction() -> str:
        with db.transaction() as session:
            session.scalar(select(func.count()).select_from(User))
            entered.set()
            leave.wait(10)
        return "held"

    holder = threading.Thread(target=lambda: app.test_client().post("/_test/hold-in-transaction"))
    holder.start()
    try:
        assert entered.wait(10)
        threading.Timer(0.6, leave.set).start()  # the holder finishes its own work
        started = time.monotonic()
        assert app.test_client().get("/").status_code == 200
        assert 0.5 <= time.monotonic() - started < 3  # it waited for the slot
    finally:
        leave.set()
        holder.join(10)


@pytest.mark.real_commits
@pytest.mark.backends("postgresql", "mysql")
def test_bulkhead_gives_up_after_the_pool_timeout(app: Flask, backend: Backend) -> None:
    """A holder waiting on the database, not yet stuck: the next request queues for
    the slot, at most DATABASE_POOL_TIMEOUT (3 s here), then gets a 503."""
    bulkhead = app.extensions["myapp.database"].feature(Guards).bulkhead
    bulkhead.timeout = 10  # never stuck within this test
    holder, entered = _waiting_on_the_database(app, backend, 4.5)
    try:
        assert entered.wait(10)
        started = time.monotonic()
        assert app.test_client().get("/").status_code == 503
        assert 2.9 <= time.monotonic() - started < 4.2  # DATABASE_POOL_TIMEOUT
    finally:
        holder.join(10)


@pytest.mark.real_commits
@pytest.mark.backends("postgresql", "mysql")
def test_negative_control_with_room_a_stuck_holder_does_not_refuse(app: Flask, backend: Backend) -> None:
    """The same stuck holder under a cap of two: it is the cap that refuses."""
    app.extensions["myapp.database"].feature(Guards).bulkhead.limit = 2
    holder, entered = _waiting_on_the_database(app, backend, 1.5)
    try:
        assert entered.wait(10)
        time.sleep(0.4)
        assert app.test_client().get("/").status_code == 200
    finally:
        holder.join(10)


@pytest.mark.real_commits
@pytest.mark.backends("sqlite")
def test_no_bulkhead_on_sqlite(app: Flask) -> None:
    """SQLite's writers wait for the file lock, fairly and bounded by its busy timeout;
    turning them away would fail writes that were about to succeed."""
    assert app.config["DATABASE_BULKHEAD"] == 1
    assert app.extensions["myapp.database"].feature(Guards).bulkhead is None


def test_a_probe_that_raises_a_non_database_error_leaves_the_breaker_open_and_probes_again() -> None:
    """Bug: a probe raising anything but SQLAlchemyError left the state at "probing" for
    good: every request got a 503 and no probe ever ran again."""
    calls: list[int] = []

    def probe() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a bug in the probe")

    breaker = Breaker(threshold=1, reset_seconds=0.05, probe=probe)
    breaker.record_failure(RuntimeError("down"))
    time.sleep(0.06)
    with pytest.raises(ValueError, match="a bug in the probe"):
        breaker.check()
    assert breaker.status()["state"] == "open"
    time.sleep(0.06)
    breaker.check()  # the next request after the period probes again, and it answers
    assert breaker.status()["state"] == "closed" and len(calls) == 2
