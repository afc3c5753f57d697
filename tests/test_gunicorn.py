"""The site served by real gunicorn workers, used over HTTP like a browser would."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from flask import Flask
from sqlalchemy import select

from myapp.db import db
from myapp.models import Post, User
from tests.support.databases import Backend
from tests.support.forms import post_form
from tests.support.gunicorn import Server, start_gunicorn, stop_gunicorn

pytestmark = [pytest.mark.gunicorn, pytest.mark.real_commits]


@pytest.fixture
def server(app: Flask, backend: Backend, tmp_path: Path) -> Iterator[Server]:
    """Gunicorn on the test's database; its log must hold no traceback afterwards."""
    url = backend.url.render_as_string(hide_password=False)
    running = start_gunicorn(url, tmp_path)
    try:
        yield running
    finally:
        stop_gunicorn(running)
    assert "Traceback" not in running.log_text()


def test_register_login_and_post_over_http(server: Server, app: Flask) -> None:
    browser = requests.Session()
    response = post_form(browser, f"{server.url}/auth/register", username="Gunnar", password="long enough")
    assert response.status_code == 302 and response.headers["Location"].endswith("/auth/login")

    response = post_form(browser, f"{server.url}/auth/login", username="gunnar", password="long enough")
    assert response.status_code == 302

    response = post_form(browser, f"{server.url}/posts/new", title="Served by gunicorn", body="Hello")
    assert response.status_code == 302
    post_url = server.url + response.headers["Location"]

    assert "Served by gunicorn" in browser.get(post_url, timeout=10).text
    index = browser.get(f"{server.url}/", timeout=10).text
    assert "Served by gunicorn" in index and "gunnar" in index

    with app.app_context():
        user = db.session.scalar(select(User).where(User.username == "gunnar"))
        assert user is not None
        assert [p.title for p in db.session.scalars(select(Post).where(Post.author_id == user.id))] == [
            "Served by gunicorn"
        ]


def test_post_without_csrf_token_is_refused(server: Server, app: Flask) -> None:
    response = requests.post(
        f"{server.url}/auth/register", data={"username": "nocsrf", "password": "long enough"}, timeout=10
    )
    assert response.status_code == 400
    assert "myapp" in response.text and "Traceback" not in response.text
    with app.app_context():
        assert db.session.scalar(select(User).where(User.username == "nocsrf")) is None


def test_readyz_and_healthz(server: Server) -> None:
    assert requests.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{server.url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
