"""The probes: /healthz never needs the database, /readyz says whether it answers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from flask import Flask

from tests.support.apps import make_app
from tests.support.queries import assert_num_queries, count_queries


def test_healthz_answers_without_the_database(app: Flask) -> None:
    with assert_num_queries(app, 0):
        response = app.test_client().get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_healthz_is_alive_while_the_database_is_down(down_app: Flask) -> None:
    engine = down_app.extensions["myapp.database"].engine
    with count_queries(down_app) as log:
        response = down_app.test_client().get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
    assert log.count == 0
    assert engine.pool.checkedout() == 0


def test_readyz_reports_latency_when_the_database_answers(app: Flask) -> None:
    response = app.test_client().get("/readyz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ready"
    assert isinstance(body["database_latency_ms"], (int, float)) and body["database_latency_ms"] >= 0


def test_readyz_is_503_with_a_reason_when_the_database_is_down(down_app: Flask) -> None:
    response = down_app.test_client().get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable"
    assert body["reason"].startswith("OperationalError: ")
    assert "\n" not in body["reason"]
    assert "s3cret" not in response.get_data(as_text=True)


def test_readyz_uses_a_fresh_connection_not_the_pool(app: Flask) -> None:
    """A pooled connection could stay green while the server refuses new ones."""
    pool = app.extensions["myapp.database"].engine.pool
    before = (pool.checkedin(), pool.checkedout())
    with count_queries(app) as log:
        assert app.test_client().get("/readyz").status_code == 200
    assert (pool.checkedin(), pool.checkedout()) == before
    assert log.count == 0  # the SELECT 1 went through the probe engine, not the app's


def test_readyz_follows_the_database_going_away(backend_file: Path) -> None:
    """SQLite: ready while the file's folder exists, unavailable once it cannot be opened."""
    app = make_app(f"sqlite:///{backend_file}")
    try:
        client = app.test_client()
        assert client.get("/readyz").status_code == 200
        shutil.rmtree(backend_file.parent)
        response = client.get("/readyz")
        assert response.status_code == 503 and "unable to open" in response.get_json()["reason"]
        assert client.get("/healthz").status_code == 200
    finally:
        app.extensions["myapp.database"].engine.dispose()


@pytest.fixture
def backend_file(tmp_path: Path) -> Path:
    folder = tmp_path / "db"
    folder.mkdir()
    return folder / "ready.sqlite"


def test_healthz_ignores_a_session_cookie_while_the_database_is_down(down_app: Flask) -> None:
    """A logged-in browser's cookie must not make the liveness probe load its user."""
    client = down_app.test_client()
    with client.session_transaction() as session:
        session["user_id"] = 1
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_healthz_makes_no_database_session_and_leaves_the_cookie_alone(app: Flask) -> None:
    """A logged-in browser's probe: no session of the database is made (the user is not
    loaded), and the cookie session is neither read nor written (no Vary, no Set-Cookie)."""
    state = app.extensions["myapp.database"]
    made: list[object] = []
    app.teardown_request(lambda exc: made.append(state.current_session()))  # before the session's removal
    client = app.test_client()
    with client.session_transaction() as session:
        session["user_id"] = 1
    made.clear()  # session_transaction's own request contexts
    probe = client.get("/healthz")
    assert probe.status_code == 200 and made == [None]
    assert "Set-Cookie" not in probe.headers and "Vary" not in probe.headers
    page = client.get("/")  # control: a page loads the user, so it makes a session
    assert page.status_code == 200 and made[1] is not None
    assert "Cookie" in page.headers.get("Vary", "")
