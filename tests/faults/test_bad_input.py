"""Scenario 10: bad input never gets a 500.

Hypothesis sends every form field (``username``, ``password``, ``title``, ``body``,
``version``) and every URL parameter (``page``, post ids, user names) huge, empty,
unicode, NUL-laden, negative, overflowing or non-numeric values, on every backend.
The answer may be a form error, a 404 or a 413, never a server error. Bodies past
``MAX_CONTENT_LENGTH`` get the 413 page. A wrong or unreachable ``DATABASE_URL``
makes ``flask db status`` fail with one ``Error:`` line and no password.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.apps import make_app
from tests.support.auth import AuthActions
from tests.support.databases import Backend
from tests.support.network import free_port

from .figures import record

pytestmark = pytest.mark.faults

EXAMPLES = 50
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,  # database latency varies; hangs are pytest-timeout's job
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,  # no .hypothesis folder left in the tree
)

# Values people and scanners really send, beside what Hypothesis invents.
_NASTY = [
    "", " ", "\x00", "a\x00b", "\t\n", "x" * 100_000, "é" * 60_000, "😀" * 20_000, "\u202e\u0000\ufeff",
    "<script>alert(1)</script>", "' OR 1=1 --", "%00", "../../etc/passwd", "alice", "ＡＬＩＣＥ",
    "²", "١٢", "0", "-1", "1e3", "9" * 40, str(2**31), str(2**63), str(-(2**63) - 1), "0x10", " 7 ", "NaN",
]
texts = st.one_of(st.text(max_size=64), st.sampled_from(_NASTY))
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str), st.text(max_size=12), st.sampled_from(_NASTY)
)


@pytest.fixture
def app_config() -> dict[str, Any]:
    return {"PROPAGATE_EXCEPTIONS": False}  # a bug must show as the 500 it would be in production


@pytest.fixture
def author(app: Flask) -> tuple[FlaskClient, int]:
    """A logged-in client and the id of a post it wrote."""
    client = app.test_client()
    AuthActions(client).register_and_login("author", "correct horse")
    response = client.post("/posts/new", data={"title": "Mine", "body": "to edit"})
    assert response.status_code == 302
    return client, int(response.headers["Location"].rsplit("/", 1)[1])


class Tally:
    """Count examples and server errors per endpoint, for the figures."""

    def __init__(self) -> None:
        self.examples = 0
        self.server_errors: list[str] = []

    def check(self, status: int, what: str) -> None:
        self.examples += 1
        if status >= 500:
            self.server_errors.append(f"{status} for {what[:200]!r}")
        assert status < 500, f"{status} for {what[:200]!r}"

    def report(self, backend: Backend, endpoint: str) -> None:
        record("10 bad input", backend.name, f"hypothesis: {self.examples} requests on {endpoint}",
               "5xx answers", len(self.server_errors), "0", not self.server_errors)


def test_register_and_login_forms(app: Flask, backend: Backend) -> None:
    client = app.test_client()
    tally = Tally()

    @SETTINGS
    @given(username=texts, password=texts)
    def check(username: str, password: str) -> None:
        for path in ("/auth/register", "/auth/login"):
            response = client.post(path, data={"username": username, "password": password})
            tally.check(response.status_code, f"{path} {username} / {password}")

    try:
        check()
    finally:
        tally.report(backend, "/auth/register and /auth/login")


def test_post_forms(app: Flask, backend: Backend, author: tuple[FlaskClient, int]) -> None:
    client, post_id = author
    tally = Tally()

    @SETTINGS
    @given(title=texts, body=texts, version=numbers)
    def check(title: str, body: str, version: str) -> None:
        response = client.post("/posts/new", data={"title": title, "body": body})
        tally.check(response.status_code, f"new {title} / {body}")
        response = client.post(
            f"/posts/{post_id}/edit", data={"title": title, "body": body, "version": version}
        )
        tally.check(response.status_code, f"edit {title} / {body} / {version}")

    try:
        check()
    finally:
        tally.report(backend, "/posts/new and /posts/<id>/edit")


def test_url_parameters(app: Flask, backend: Backend, author: tuple[FlaskClient, int]) -> None:
    client, _ = author
    tally = Tally()

    @SETTINGS
    @given(page=numbers, post_id=numbers, username=texts)
    def check(page: str, post_id: str, username: str) -> None:
        segment = quote(post_id, safe="")
        for method, path, query in (
            ("GET", "/", {"page": page}),
            ("GET", "/users/author", {"page": page}),
            ("GET", f"/users/{quote(username, safe='')}", {"page": page}),
            ("GET", f"/posts/{segment}", {}),
            ("GET", f"/posts/{segment}/edit", {}),
            ("POST", f"/posts/{segment}/delete", {}),
        ):
            response = client.open(path, method=method, query_string=query)
            tally.check(response.status_code, f"{method} {path} {query}")

    try:
        check()
    finally:
        tally.report(backend, "page, post ids and user names in URLs")


def test_known_nasty_values_in_every_field_and_parameter(
    app: Flask, backend: Backend, author: tuple[FlaskClient, int]
) -> None:
    """Every listed value in every field, so that none depends on Hypothesis drawing it."""
    client, post_id = author
    anonymous = app.test_client()
    tally = Tally()
    ok = {"username": "someone", "password": "correct horse", "title": "Title", "body": "Body", "version": "1"}
    forms = {
        "/auth/register": (anonymous, ("username", "password")),
        "/auth/login": (anonymous, ("username", "password")),
        "/posts/new": (client, ("title", "body")),
        f"/posts/{post_id}/edit": (client, ("title", "body", "version")),
    }
    for value in _NASTY:
        for path, (who, fields) in forms.items():
            for name in fields:
                data = {field: ok[field] for field in fields} | {name: value}
                tally.check(who.post(path, data=data).status_code, f"{path} {name}={value}")
        for path in ("/", "/users/author"):
            tally.check(client.get(path, query_string={"page": value}).status_code, f"{path}?page={value}")
        for path in (f"/users/{quote(value, safe='')}", f"/posts/{quote(value, safe='')}"):
            tally.check(client.get(path).status_code, path)
    tally.report(backend, "every listed nasty value in every field and parameter")


@pytest.mark.parametrize("path", ["/auth/register", "/auth/login", "/posts/new"])
def test_oversize_bodies_get_413(app: Flask, backend: Backend, author: tuple[FlaskClient, int], path: str) -> None:
    client, _ = author
    limit = app.config["MAX_CONTENT_LENGTH"]
    response = client.post(path, data={"title": "t", "username": "u", "body": "b" * (limit + 1)})
    record("10 bad input", backend.name, f"POST {path} with a body over MAX_CONTENT_LENGTH", "status", response.status_code,
           "413", response.status_code == 413)
    assert response.status_code == 413
    assert "Too large" in response.text  # the site's own page, not werkzeug's


def test_unreachable_database_url_is_one_masked_line(backend: Backend, tmp_path: Any) -> None:
    secret = "s3cret-pw"
    port = free_port()  # nothing listens there
    url = {
        "sqlite": f"sqlite:///{tmp_path}/missing-folder/db.sqlite",
        "postgresql": f"postgresql+psycopg://app:{secret}@127.0.0.1:{port}/myapp",
        "mysql": f"mysql+pymysql://app:{secret}@127.0.0.1:{port}/myapp",
    }[backend.name]
    app = make_app(url, DATABASE_CONNECT_TIMEOUT=2, DATABASE_PING_TIMEOUT=2)
    result = app.test_cli_runner().invoke(args=["db", "status"])
    app.extensions["myapp.database"].engine.dispose()
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    clear = result.exit_code == 1 and len(errors) == 1 and secret not in result.output and "Traceback" not in result.output
    record("10 bad input", backend.name, "unreachable DATABASE_URL, `flask db status`", "error lines (password masked)",
           len(errors), "1", clear)
    assert result.exit_code == 1, result.output
    assert len(errors) == 1 and secret not in result.output and "Traceback" not in result.output, result.output
