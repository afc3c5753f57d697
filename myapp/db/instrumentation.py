"""Optional instruments the lifecycle switches on: the slow-query log (always, past
``DATABASE_SLOW_QUERY_MS``) and the per-request query budget (debug and tests)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from flask import Flask, g, has_request_context, request
from sqlalchemy import Engine, event
from werkzeug.wrappers import Response

log = logging.getLogger("myapp.sql")

_TRANSACTION_CONTROL = ("BEGIN", "SAVEPOINT", "RELEASE", "ROLLBACK", "COMMIT")
_STARTED = "myapp.query_started"


def log_slow_queries(engine: Engine, threshold_ms: float) -> None:
    """Log statements slower than the threshold: statement, duration, endpoint; never
    the parameters (they may hold a password hash or personal data)."""

    @event.listens_for(engine, "before_cursor_execute")
    def _start(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        conn.info.setdefault(_STARTED, []).append(time.perf_counter())

    @event.listens_for(engine, "after_cursor_execute")
    def _stop(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        elapsed_ms = (time.perf_counter() - conn.info[_STARTED].pop()) * 1000
        if elapsed_ms >= threshold_ms:
            endpoint = request.endpoint if has_request_context() else "-"
            log.warning("slow query (%.0f ms) in %s: %s", elapsed_ms, endpoint, " ".join(statement.split()))


def watch_query_budget(app: Flask, engines: Sequence[Engine], budget: int) -> None:
    """Count each request's statements (on every engine given: the primary's and the
    replicas'); warn past the budget (an N+1 query is the usual cause) and, in debug,
    show the count in an ``X-Query-Count`` header."""

    def _count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if has_request_context() and not statement.startswith(_TRANSACTION_CONTROL):
            g.query_count = g.get("query_count", 0) + 1

    for engine in engines:
        event.listen(engine, "before_cursor_execute", _count)

    @app.after_request
    def _report(response: Response) -> Response:
        count = g.get("query_count", 0)
        if count > budget:
            log.warning("%s %s sent %d queries (budget %d)", request.method, request.path, count, budget)
        if app.debug:
            response.headers["X-Query-Count"] = str(count)
        return response
