"""Error pages: the site's layout, the right status, no traceback, and no database needed."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError
from werkzeug.test import TestResponse

from myapp.db import db
from myapp.errors import RETRY_AFTER_SECONDS
from myapp.models import Post, User
from tests.support.auth import AuthActions


def assert_error_page(response: TestResponse, code: int, title: str) -> str:
    """A full page in the site's layout, with the code and title, and nothing internal."""
    assert response.status_code == code
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert '<nav class="nav">' in html and 'class="brand"' in html  # the layout
    assert f'<p class="code">{code}</p>' in html and f"<h1>{title}</h1>" in html
    for leak in ("Traceback", "File &#34;", "sqlalchemy", "s3cret"):
        assert leak not in html
    return html


def test_404_for_an_unknown_url(client: FlaskClient) -> None:
    assert_error_page(client.get("/no/such/page"), 404, "Not found")


def test_404_keeps_our_own_description(client: FlaskClient) -> None:
    html = assert_error_page(client.get("/posts/999999"), 404, "Not found")
    assert "Post 999999 does not exist." in html


def test_405_for_get_on_logout(client: FlaskClient) -> None:
    response = client.get("/auth/logout")
    assert_error_page(response, 405, "Method not allowed")
    assert "POST" in response.headers["Allow"]  # RFC 9110: a 405 says what is allowed


def test_403_when_editing_someone_elses_post(app: Flask, client: FlaskClient, auth: AuthActions) -> None:
    auth.register_and_login("alice")
    created = client.post("/posts/new", data={"title": "Mine", "body": "Alice's text"})
    assert created.status_code == 302
    edit_url = created.headers["Location"] + "/edit"
    auth.logout()
    auth.register_and_login("bob")
    html = assert_error_page(client.get(edit_url), 403, "Forbidden")
    assert ">bob<" in html  # the layout still shows who is logged in
    assert_error_page(client.post(edit_url, data={"title": "Hijacked", "body": "x"}), 403, "Forbidden")
    with app.app_context():
        assert [(p.title, p.body) for p in db.session.scalars(select(Post))] == [("Mine", "Alice's text")]


@pytest.mark.parametrize(
    "app_config", [{}, {"WTF_CSRF_ENABLED": True}], ids=["csrf-off", "csrf-on"]
)
def test_413_for_a_body_over_the_limit(app: Flask, client: FlaskClient) -> None:
    limit = app.config["MAX_CONTENT_LENGTH"]
    response = client.post("/auth/login", data={"username": "alice", "password": "x" * (limit + 1)})
    assert_error_page(response, 413, "Too large")


@pytest.fixture
def app_config() -> dict[str, Any]:
    # The error handlers, not the test client, must see unhandled exceptions.
    return {"PROPAGATE_EXCEPTIONS": False}


def test_500_for_an_unexpected_error(app: Flask, client: FlaskClient) -> None:
    @app.get("/_test/boom")
    def boom() -> str:
        raise RuntimeError("secret internals of the failure")

    html = assert_error_page(client.get("/_test/boom"), 500, "Something went wrong")
    assert "secret internals" not in html and "RuntimeError" not in html


def _count_users(app: Flask) -> int:
    """Count over a connection of its own: only committed rows."""
    with app.extensions["myapp.database"].engine.connect() as connection:
        return connection.scalar(select(func.count()).select_from(User.__table__)) or 0


@pytest.mark.real_commits
def test_500_after_a_write_leaves_no_row(app: Flask, client: FlaskClient) -> None:
    @app.post("/_test/write-then-fail")
    def write_then_fail() -> str:
        db.session.add(User(username="ghost", password_hash="x"))
        db.session.flush()
        raise RuntimeError("failed after writing")

    assert_error_page(client.post("/_test/write-then-fail"), 500, "Something went wrong")
    assert _count_users(app) == 0
    assert app.extensions["myapp.database"].engine.pool.checkedout() == 0


@pytest.mark.real_commits
def test_500_for_a_database_error_after_a_write_leaves_no_row(app: Flask, client: FlaskClient) -> None:
    """A constraint violation is a bug, not an outage: 500, and the first insert is undone."""

    @app.post("/_test/duplicate")
    def duplicate() -> str:
        db.session.add(User(username="twin", password_hash="x"))
        db.session.flush()
        db.session.add(User(username="twin", password_hash="y"))
        db.session.flush()
        return "unreachable"

    response = client.post("/_test/duplicate")
    assert_error_page(response, 500, "Something went wrong")
    assert "Retry-After" not in response.headers
    assert _count_users(app) == 0
    assert app.extensions["myapp.database"].engine.pool.checkedout() == 0



def assert_unavailable_page(response: TestResponse) -> None:
    html = assert_error_page(response, 503, "Temporarily unavailable")
    assert response.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert "may or may not have been saved" in html


def test_503_when_the_database_is_down_for_an_anonymous_visitor(down_app: Flask) -> None:
    client = down_app.test_client()
    assert_unavailable_page(client.get("/"))
    login = client.post("/auth/login", data={"username": "alice", "password": "correct horse"})
    assert_unavailable_page(login)
    assert down_app.extensions["myapp.database"].engine.pool.checkedout() == 0


def test_503_when_the_database_is_down_for_a_logged_in_visitor(down_app: Flask) -> None:
    """Loading the logged-in user is what fails here; the page must still render."""
    client = down_app.test_client()
    with client.session_transaction() as session:
        session["user_id"] = 1
    assert_unavailable_page(client.get("/"))
    assert_unavailable_page(client.get("/posts/new"))
    assert_unavailable_page(client.post("/posts/new", data={"title": "t", "body": "b"}))
    assert down_app.extensions["myapp.database"].engine.pool.checkedout() == 0


def test_the_stylesheet_loads_while_the_database_is_down(down_app: Flask) -> None:
    """The 503 page of a logged-in visitor must come out styled: static files never
    load the user."""
    client = down_app.test_client()
    with client.session_transaction() as session:
        session["user_id"] = 1
    response = client.get("/static/style.css")
    assert response.status_code == 200
    assert response.mimetype == "text/css"
    response.close()


def test_503_when_the_connection_fails_mid_request(app: Flask, client: FlaskClient) -> None:
    """A statement the server cannot run because the database went away mid-request."""

    @app.get("/_test/lost")
    def lost() -> str:
        db.session.execute(text("SELECT 1"))
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))

    assert_unavailable_page(client.get("/_test/lost"))
