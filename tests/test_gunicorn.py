"""The site served by real gunicorn workers, used over HTTP like a browser would."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from flask import Flask
from sqlalchemy import select

from myapp.db import db
from myapp.models import Post, User

from .conftest import SECRET_KEY, Backend

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).with_name("gunicorn")

pytestmark = [pytest.mark.gunicorn, pytest.mark.real_commits]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_gunicorn(database_url: str, tmp_path: Path, app: str = "wsgi:app", **env: str) -> Server:
    """Start gunicorn with the project's gunicorn.conf.py on ``app`` (the fault suite
    serves its test-only apps this way) and wait until it answers."""
    port = free_port()
    log = tmp_path / f"gunicorn-{port}.log"
    environment = {
        **os.environ,
        "DATABASE_URL": database_url,
        "SECRET_KEY": SECRET_KEY,
        "FLASK_DEBUG": "0",
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "2",
        "GUNICORN_THREADS": "4",
        **env,
    }
    with log.open("wb") as sink:  # a file, not a pipe: nothing can block on a full pipe
        process = subprocess.Popen(
            # No control socket: gunicorn 27 puts it at one path in $HOME, which test
            # servers running side by side would fight over.
            [str(GUNICORN), "-c", "gunicorn.conf.py", "--no-control-socket", app],
            cwd=ROOT, env=environment, stdout=sink, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        wait_until_serving(server)
    except BaseException:
        stop_gunicorn(server)  # never leave a server behind a failed start
        raise
    return server


def wait_until_serving(server: Server, seconds: float = 60) -> None:
    """Poll /healthz; on a loaded machine a worker can take seconds to import the app."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"gunicorn exited with {server.process.returncode}:\n{server.log_text()}")
        try:
            if requests.get(f"{server.url}/healthz", timeout=5).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.1)
    raise AssertionError(f"gunicorn did not answer within {seconds:.0f} s:\n{server.log_text()}")


def stop_gunicorn(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture
def server(app: Flask, backend: Backend, tmp_path: Path) -> Iterator[Server]:
    url = backend.url.render_as_string(hide_password=False)
    running = start_gunicorn(url, tmp_path)
    try:
        yield running
    finally:
        stop_gunicorn(running)
    assert "Traceback" not in running.log_text()


def csrf_token(page: str) -> str:
    match = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page) or re.search(
        r'name="csrf_token" value="([^"]+)"', page
    )
    assert match, "no CSRF token in the page"
    return match.group(1)


def post_form(browser: requests.Session, url: str, **fields: str) -> requests.Response:
    token = csrf_token(browser.get(url, timeout=10).text)
    return browser.post(url, data={"csrf_token": token, **fields}, timeout=10, allow_redirects=False)


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
