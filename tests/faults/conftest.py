"""Fixtures of the fault suite: throwaway servers, one per session, that tests may break.

``fault_server`` runs a test on a throwaway PostgreSQL and then on a throwaway MariaDB;
``fault_db`` gives the test a migrated database of its own on that server. The
servers start only when a selected test asks for them and are removed at the end of
the session, whatever happens. ``prometheus_server`` is a Prometheus of the test's own
that scrapes the port it picked for gunicorn's metrics exporter.
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from sqlalchemy.engine import URL

from tests.support.forms import csrf_token, post_form
from tests.support.network import free_port
from tests.support.prometheus import BINARY as PROMETHEUS, Prometheus, prometheus
from tests.support.servers import MariaDBServer, PostgresServer, ThrowawayServer, throwaway_server


PASSWORD = "correct horse battery"


def _require(binary_pattern: str) -> None:
    """Like the ``backend`` fixture: a missing server is a skip on a laptop, a failure in CI."""
    if not glob.glob(binary_pattern):
        message = f"no {binary_pattern}: the throwaway-server fault tests need it"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def throwaway_postgres() -> Iterator[ThrowawayServer]:
    _require("/usr/lib/postgresql/*/bin/initdb")
    with throwaway_server(PostgresServer) as server:
        yield server


@pytest.fixture(scope="session")
def throwaway_mariadb() -> Iterator[ThrowawayServer]:
    _require("/usr/*bin/mariadbd")
    with throwaway_server(MariaDBServer) as server:
        yield server


@pytest.fixture
def prometheus_server() -> Iterator[Prometheus]:
    """A fresh Prometheus scraping, every second, a free loopback port picked for
    gunicorn's metrics exporter: start gunicorn with ``METRICS_BIND=`` its ``targets[0]``.
    ``up`` has a value from the start: 0 until gunicorn listens there. Fresh per test, so
    that no series of an earlier test is summed in; stopped by its PID after the test."""
    _require(str(PROMETHEUS))
    with prometheus([f"127.0.0.1:{free_port()}"]) as server:
        yield server


@pytest.fixture(params=["postgresql", "mysql"])
def fault_server(request: pytest.FixtureRequest) -> ThrowawayServer:
    """A throwaway server of each backend in turn; a test may stop and restart it."""
    name = "throwaway_postgres" if request.param == "postgresql" else "throwaway_mariadb"
    server: ThrowawayServer = request.getfixturevalue(name)
    return server


@pytest.fixture
def fault_db(fault_server: ThrowawayServer) -> Iterator[URL]:
    """A migrated database of the test's own on the throwaway server, dropped after."""
    with fault_server.database() as url:
        try:
            yield url
        finally:
            # A test that failed half-way through a restart must not leave the server
            # down for the next one (nor for dropping its database).
            fault_server.ensure_running()


def escaped_errors(log: str) -> int:
    """Requests whose exception got past Flask to gunicorn (a bare 500 page).

    Not every "Traceback" in the log: SQLAlchemy's pool logs one, by design, when it
    cannot reset a connection the server already closed, and then discards it.
    """
    return log.count("Error handling request")


def new_client() -> requests.Session:
    """An HTTP client that opens a connection per request: with keep-alive, gunicorn
    may close an idle connection just as the client reuses it, and that reset would be
    counted as the app's failure."""
    client = requests.Session()
    client.headers["Connection"] = "close"
    return client


def logged_in_browser(base_url: str, username: str) -> tuple[requests.Session, str]:
    """A registered, logged-in HTTP client and its CSRF token (valid for its session)."""
    browser = new_client()
    for path in ("/auth/register", "/auth/login"):
        response = post_form(browser, base_url + path, username=username, password=PASSWORD)
        assert response.status_code == 302, f"{path} answered {response.status_code}"
    token = csrf_token(browser.get(f"{base_url}/posts/new", timeout=10).text)
    return browser, token


@dataclass
class Answer:
    """One request of a burst: what was asked and what came back."""

    path: str
    status: int | None  # None: no answer within the timeout, or the connection reset
    body: str
    headers: dict[str, str]
    seconds: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def burst(base_url: str, paths: list[str], clients: int, timeout: float = 10.0,
          browsers: list[requests.Session] | None = None) -> list[Answer]:
    """GET every path with ``clients`` concurrent clients, each with its own HTTP session
    and its share of the paths (client ``n`` takes every ``clients``-th path)."""
    sessions = browsers or [new_client() for _ in range(clients)]

    def fetch(session: requests.Session, path: str) -> Answer:
        started = time.monotonic()
        try:
            response = session.get(base_url + path, timeout=timeout)
        except requests.RequestException as error:
            return Answer(path, None, repr(error), {}, time.monotonic() - started)
        return Answer(path, response.status_code, response.text, dict(response.headers),
                      time.monotonic() - started)

    def client(number: int) -> list[Answer]:
        return [fetch(sessions[number], path) for path in paths[number::clients]]

    with ThreadPoolExecutor(max_workers=clients) as pool:
        return [answer for answers in pool.map(client, range(clients)) for answer in answers]
