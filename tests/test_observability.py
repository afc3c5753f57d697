"""What each request tells operators (issue 18): its id, its log line, its metrics."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from myapp.config import ConfigError
from myapp.db.errors import DatabaseUnavailable
from myapp.db.routing import ReplicaWriteError
from tests.support.metrics import Delta

AppFactory = Callable[..., Flask]
GENERATED_ID = re.compile(r"[0-9a-f]{20}")


class Lines(logging.Handler):
    """The request lines written while it is attached."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("myapp.request")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# -- the request id --------------------------------------------------------------------------


def test_every_response_carries_a_fresh_request_id(client: FlaskClient) -> None:
    first, second = client.get("/"), client.get("/no/such/page")
    ids = [first.headers["X-Request-ID"], second.headers["X-Request-ID"]]
    assert all(GENERATED_ID.fullmatch(each) for each in ids) and ids[0] != ids[1]


def test_an_id_from_an_untrusted_client_is_replaced(client: FlaskClient) -> None:
    response = client.get("/", headers={"X-Request-ID": "chosen-by-the-client"})
    assert GENERATED_ID.fullmatch(response.headers["X-Request-ID"])


@pytest.mark.parametrize(("sent", "kept"), [
    ("edge-7f3a9c.42", True),
    ("a" * 128, True),
    ("a" * 129, False),  # too long for a log line
    ("two words", False),
    ("<script>", False),
])
def test_a_trusted_proxys_id_is_kept_when_well_formed(app_factory: AppFactory, sent: str, kept: bool) -> None:
    proxied = app_factory(PROXY_FIX_X_FOR=1)
    response = proxied.test_client().get("/healthz", headers={"X-Request-ID": sent})
    assert (response.headers["X-Request-ID"] == sent) is kept
    if not kept:
        assert GENERATED_ID.fullmatch(response.headers["X-Request-ID"])


def _failing_app(app_factory: AppFactory, error: Exception) -> Flask:
    broken = app_factory(PROPAGATE_EXCEPTIONS=False)

    @broken.get("/broken")
    def _broken() -> str:
        raise error

    return broken


def test_a_500_page_shows_the_request_id(app_factory: AppFactory) -> None:
    response = _failing_app(app_factory, RuntimeError("boom")).test_client().get("/broken")
    assert response.status_code == 500
    assert f"<code>{response.headers['X-Request-ID']}</code>" in response.get_data(as_text=True)


def test_a_503_page_shows_the_request_id(app_factory: AppFactory) -> None:
    response = _failing_app(app_factory, DatabaseUnavailable("busy", "all slots busy", 1)).test_client().get("/broken")
    assert response.status_code == 503
    assert f"<code>{response.headers['X-Request-ID']}</code>" in response.get_data(as_text=True)


def test_a_4xx_page_shows_no_request_id(client: FlaskClient) -> None:
    response = client.get("/no/such/page")
    assert response.status_code == 404 and "request id" not in response.get_data(as_text=True)


# -- the log line ------------------------------------------------------------------------------


def test_one_text_line_per_request_with_what_it_did(client: FlaskClient, lines: Lines) -> None:
    response = client.get("/?page=1")
    [line] = lines.lines
    assert re.fullmatch(
        r"\S+Z 127\.0\.0\.1 \"GET /\?page=1\" posts\.index 200 [\d.]+ms db=[1-9]\d*/[\d.]+ms reads=primary "
        + f"id={response.headers['X-Request-ID']}", line), line


def test_what_a_client_sends_cannot_forge_a_line(client: FlaskClient, lines: Lines) -> None:
    client.get('/x%0A2026-12-07T00:00:00Z 10.0.0.1 "GET /admin" admin 200 1.0ms')
    [line] = lines.lines
    assert "\n" not in line and line.replace('\\"', "").count('"') == 2  # the path's own quotes are escaped
    assert r'"GET /x\n2026-12-07T00:00:00Z 10.0.0.1 \"GET /admin\" admin 200 1.0ms" - 404 ' in line


def test_a_request_without_the_database_logs_no_statements(client: FlaskClient, lines: Lines) -> None:
    client.get("/healthz")
    assert " health.healthz 200 " in lines.lines[0] and " db=0/0.0ms reads=- " in lines.lines[0]


def test_json_lines_for_log_shippers(app_factory: AppFactory, lines: Lines) -> None:
    shipped = app_factory(LOG_FORMAT="json")
    response = shipped.test_client().get("/")
    entry: dict[str, Any] = json.loads(lines.lines[0])
    assert entry["id"] == response.headers["X-Request-ID"]
    assert (entry["method"], entry["path"], entry["endpoint"], entry["status"]) == ("GET", "/", "posts.index", 200)
    assert entry["statements"] >= 1 and entry["db_ms"] >= 0 and entry["duration_ms"] > 0
    assert entry["reads"] == "primary" and entry["time"].endswith("Z")


def test_request_log_off_writes_no_line(app_factory: AppFactory, lines: Lines) -> None:
    app_factory(REQUEST_LOG=False).test_client().get("/")
    assert lines.lines == []


def test_a_wrong_log_format_is_refused_in_one_line(app_factory: AppFactory) -> None:
    with pytest.raises(ConfigError, match="LOG_FORMAT is invalid: 'xml'; use text or json"):
        app_factory(LOG_FORMAT="xml")


# -- the request metrics ----------------------------------------------------------------------


def test_requests_are_counted_by_endpoint_method_and_status(client: FlaskClient) -> None:
    delta = Delta()
    client.get("/")
    client.get("/")
    client.get("/no/such/page")
    client.open("/", method="PROPFIND")  # any method a client invents is "other"
    assert delta("myapp_http_requests_total", endpoint="posts.index", method="GET", status="200") == 2
    assert delta("myapp_http_requests_total", endpoint="none", method="GET", status="404") == 1
    assert delta("myapp_http_requests_total", endpoint="none", method="other", status="405") == 1
    assert delta("myapp_http_request_duration_seconds_count", endpoint="posts.index") == 2


def test_statements_per_request_match_the_line(client: FlaskClient, lines: Lines) -> None:
    delta = Delta()
    client.get("/")
    statements = int(re.search(r" db=(\d+)/", lines.lines[0]).group(1))  # type: ignore[union-attr]
    assert statements >= 1
    assert delta("myapp_db_statements_per_request_count") == 1
    assert delta("myapp_db_statements_per_request_sum") == statements


def test_metrics_off_counts_nothing(app_factory: AppFactory) -> None:
    quiet = app_factory(METRICS=False)
    delta = Delta()
    quiet.test_client().get("/")
    assert delta("myapp_http_requests_total", endpoint="posts.index", method="GET", status="200") == 0
    assert delta("myapp_db_statement_duration_seconds_count", server="primary") == 0


@pytest.mark.parametrize(("error", "cause"), [
    (DatabaseUnavailable("unreachable", "circuit open", 1), "breaker"),
    (DatabaseUnavailable("busy", "all slots busy", 1), "bulkhead"),
    (ReplicaWriteError("a write on a replica"), "read_only"),
])
def test_503s_are_counted_by_cause(app_factory: AppFactory, error: Exception, cause: str) -> None:
    delta = Delta()
    assert _failing_app(app_factory, error).test_client().get("/broken").status_code == 503
    assert delta("myapp_http_unavailable_total", cause=cause) == 1


def test_every_cause_has_its_series_before_its_first_503() -> None:
    """So that rate() and the alerts see the first 503 of a cause as a rise."""
    from prometheus_client import REGISTRY

    causes = {each.labels["cause"] for family in REGISTRY.collect() if family.name == "myapp_http_unavailable"
              for each in family.samples if each.name.endswith("_total")}
    assert causes == {"unreachable", "pool_timeout", "breaker", "bulkhead", "statement_timeout", "read_only"}
