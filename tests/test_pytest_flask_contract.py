"""What tests/conftest.py assumes of pytest-flask, checked so that an upgrade cannot
change it unnoticed.

pytest-flask's autouse fixture ``_push_request_context`` pushes a request context
around every test that uses the ``app`` fixture. conftest overrides it by name (the
plugin offers no public switch), so that every test-client request runs in an app
context of its own whose teardown removes the session. These tests fail if the
fixture is renamed, stops being autouse, or a request context shows up again; the
negative control fails if Flask no longer falls into the trap (then the override
may go).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_flask.plugin
from flask import Flask, g, has_app_context, has_request_context
from flask.testing import FlaskClient


def test_pytest_flask_still_defines_the_autouse_fixture_conftest_overrides(request: pytest.FixtureRequest) -> None:
    assert request.config.pluginmanager.get_plugin("flask") is pytest_flask.plugin
    source = inspect.getsource(pytest_flask.plugin)
    fixture = re.search(
        r"@pytest\.fixture\(autouse=True\)\s*\ndef _push_request_context\(request\):\n(?P<body>(?:\n|    .*\n)+)",
        source,
    )
    assert fixture, "pytest-flask no longer has an autouse _push_request_context(request) fixture"
    assert "test_request_context()" in fixture["body"] and "ctx.push()" in fixture["body"]


def test_the_overridden_fixture_is_still_in_every_app_test(request: pytest.FixtureRequest, app: Flask) -> None:
    """This test does not ask for it: only an autouse fixture of that name (the
    plugin's; conftest's is not autouse) brings it in, and conftest's body replaces it."""
    assert "_push_request_context" in request.fixturenames


@pytest.fixture
def contexts(app: Flask) -> Iterator[dict[str, list[Any]]]:
    """A view that records its app context (by its ``g``, one per app context), and a
    teardown_appcontext that records each context it tears down."""
    seen: dict[str, list[Any]] = {"view": [], "torn_down": []}

    @app.get("/_test/context")
    def record_context() -> str:
        seen["view"].append(g._get_current_object())  # werkzeug LocalProxy's documented way
        return "ok"

    @app.teardown_appcontext
    def record_teardown(exc: BaseException | None) -> None:
        seen["torn_down"].append(g._get_current_object())

    yield seen


def _torn_down(seen: dict[str, list[Any]], context: Any) -> bool:
    return any(torn is context for torn in seen["torn_down"])


def test_no_request_context_is_pushed_around_a_test(app: Flask, client: FlaskClient) -> None:
    assert not has_request_context()
    assert not has_app_context()


def test_each_client_request_has_its_own_app_context_torn_down_when_it_ends(
    client: FlaskClient, contexts: dict[str, list[Any]]
) -> None:
    assert not has_request_context()

    assert client.get("/_test/context").status_code == 200
    [first] = contexts["view"]
    assert _torn_down(contexts, first), "the first request's app context was not torn down when it ended"

    assert client.get("/_test/context").status_code == 200
    [_, second] = contexts["view"]
    assert second is not first
    assert _torn_down(contexts, second), "the second request's app context was not torn down when it ended"


def test_negative_control_a_pushed_request_context_swallows_the_teardowns(
    app: Flask, contexts: dict[str, list[Any]]
) -> None:
    """What pytest-flask's fixture would do: push a request context, then send two
    requests. They share its app context, and neither request tears it down."""
    pushed = app.test_request_context()
    pushed.push()
    try:
        client = app.test_client()
        assert client.get("/_test/context").status_code == 200
        assert client.get("/_test/context").status_code == 200
        first, second = contexts["view"]
        assert first is second
        assert contexts["torn_down"] == []
    finally:
        pushed.pop()
    assert _torn_down(contexts, first)  # only now, with the pushed context
