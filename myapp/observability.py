"""What each request tells the people who run the site: a request id, one log line,
and its Prometheus metrics. The line and the metrics carry the same figures (status,
duration, statements, database time, where the reads went), so that a spike on a
graph leads to the lines behind it, and a user who quotes the id on an error page
leads to one line.

- ``REQUEST_LOG`` writes the line on the ``myapp.request`` logger, as text or, with
  ``LOG_FORMAT=json``, as one JSON object per line.
- ``METRICS`` counts requests by endpoint, method and status, times them by endpoint,
  and counts the statements each sent (``db.metrics`` holds the database's metrics).
- ``X-Request-ID`` comes from a trusted proxy (``PROXY_FIX_X_FOR`` > 0) when it is
  well formed, or is made here; it is echoed on the response and shown on 5xx pages.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, g, has_request_context, request
from prometheus_client import Counter, Histogram
from werkzeug.wrappers import Response

from .db.metrics import LATENCY_BUCKETS, STATEMENTS_PER_REQUEST, RequestStats, current_request

log = logging.getLogger("myapp.request")

REQUESTS = Counter("myapp_http_requests", "Requests answered, by endpoint, method and status.",
                   ["endpoint", "method", "status"])
REQUEST_SECONDS = Histogram("myapp_http_request_duration_seconds", "Time to build each response, by endpoint.",
                            ["endpoint"], buckets=LATENCY_BUCKETS)
UNAVAILABLE = Counter("myapp_http_unavailable", "503 answers, by cause: unreachable, pool_timeout, breaker, "
                      "bulkhead, statement_timeout, read_only.", ["cause"])
CAUSES = ("unreachable", "pool_timeout", "breaker", "bulkhead", "statement_timeout", "read_only")
for _cause in CAUSES:  # each series at 0 from the start: its first 503 is a rise rate() sees
    UNAVAILABLE.labels(_cause)

# Label values come from this list, never from the request: a client may send any method.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


@dataclass(eq=False)
class _Request:
    """What the hooks know about the request under way (in ``g``)."""

    id: str
    started: float
    stats: RequestStats = field(default_factory=RequestStats)


def init_app(app: Flask) -> None:
    """Register first among the before_request hooks: every request gets its id and its
    clock before anything else may answer it (a CSRF failure, a rate limit)."""
    record_metrics, write_log = bool(app.config["METRICS"]), bool(app.config["REQUEST_LOG"])
    trust_id = int(app.config["PROXY_FIX_X_FOR"]) > 0
    if write_log:
        _ensure_handler()
    line = _json_line if app.config["LOG_FORMAT"] == "json" else _text_line
    app.before_request(lambda: _begin(trust_id))
    app.after_request(_finisher(record_metrics, line if write_log else None))
    app.teardown_request(_forget)


def request_id() -> str | None:
    """The current request's id (None outside a request, or before it was given one)."""
    current: _Request | None = g.get("observed") if has_request_context() else None
    return current.id if current is not None else None


def count_unavailable(cause: str) -> None:
    """A 503 answered for ``cause`` (errors.py names it)."""
    UNAVAILABLE.labels(cause).inc()


def _begin(trust_id: bool) -> None:
    offered = request.headers.get("X-Request-ID") if trust_id else None
    ident = offered if offered is not None and _REQUEST_ID.fullmatch(offered) else os.urandom(10).hex()
    g.observed = current = _Request(ident, time.perf_counter())
    current_request.set(current.stats)


def _finisher(record_metrics: bool, line: Callable[[_Request, Response, float], str] | None) -> Callable[[Response], Response]:
    metrics = _RequestMetrics() if record_metrics else None

    def finish(response: Response) -> Response:
        current: _Request | None = g.get("observed")
        if current is None:  # an earlier before_request hook answered first
            _begin(trust_id=False)
            current = g.observed
        response.headers["X-Request-ID"] = current.id
        seconds = time.perf_counter() - current.started
        if metrics is not None:
            metrics.record(response.status_code, seconds, current.stats)
        if line is not None and log.isEnabledFor(logging.INFO):
            # A record made here, not by log.info(): that one walks the stack to find
            # the caller, which no line of ours shows.
            log.handle(logging.LogRecord(log.name, logging.INFO, __file__, 0, line(current, response, seconds),
                                         None, None))
        return response

    return finish


class _RequestMetrics:
    """One app's request metrics; each label set's children are looked up once."""

    def __init__(self) -> None:
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def record(self, status: int, seconds: float, stats: RequestStats) -> None:
        endpoint = request.endpoint or "none"
        method = request.method if request.method in _METHODS else "other"
        key = (endpoint, method, status)
        pair = self._children.get(key)
        if pair is None:
            pair = self._children[key] = (REQUESTS.labels(endpoint, method, str(status)),
                                          REQUEST_SECONDS.labels(endpoint))
        pair[0].inc()
        pair[1].observe(seconds)
        STATEMENTS_PER_REQUEST.observe(stats.statements)


def _forget(exc: BaseException | None) -> None:
    current_request.set(None)


def _where_reads_went(stats: RequestStats) -> str:
    if stats.reads:
        return ",".join(stats.reads)
    return "primary" if stats.statements else "-"


def _text_line(current: _Request, response: Response, seconds: float) -> str:
    """What a client sent (its path, its forwarded address) is escaped: a %0A in a URL
    must not start a line of its own in the log."""
    stats = current.stats
    return (f"{_now()} {_escaped(request.remote_addr or '-')} "
            f'"{request.method} {_escaped(request.full_path.rstrip("?"))}" '
            f"{request.endpoint or '-'} {response.status_code} {seconds * 1000:.1f}ms "
            f"db={stats.statements}/{stats.db_seconds * 1000:.1f}ms reads={_where_reads_went(stats)} id={current.id}")


_stamp: list[Any] = [0, ""]  # (second, its text): a busy worker formats each second once


def _now() -> str:
    second = int(time.time())
    if second != _stamp[0]:
        _stamp[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))]
    return str(_stamp[1])


def _escaped(text: str) -> str:
    """Quotes, backslashes, control and non-ASCII characters as JSON escapes them."""
    return json.dumps(text)[1:-1]


def _json_line(current: _Request, response: Response, seconds: float) -> str:
    stats = current.stats
    return json.dumps({
        "time": _now(), "id": current.id,
        "remote_addr": request.remote_addr, "method": request.method, "path": request.full_path.rstrip("?"),
        "endpoint": request.endpoint, "status": response.status_code, "duration_ms": round(seconds * 1000, 2),
        "statements": stats.statements, "db_ms": round(stats.db_seconds * 1000, 2),
        "reads": _where_reads_went(stats),
    })


class _StderrLines(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler this module adds: one per process, found again by its class."""


def _ensure_handler() -> None:
    """The lines go to stderr, once per process, whatever the root logger does: under
    gunicorn nothing configures logging, and an INFO line would otherwise be dropped."""
    if not any(isinstance(handler, _StderrLines) for handler in log.handlers):
        handler = _StderrLines(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
