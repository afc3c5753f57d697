"""Two optional instruments: the slow-query log (past ``DATABASE_SLOW_QUERY_MS``) and
the per-request query budget (``DATABASE_QUERY_BUDGET``, debug and tests only).

Both watch every engine that runs the app's statements, the replicas' included.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Flask, g, has_request_context, request
from sqlalchemy import event
from werkzeug.wrappers import Response

from .config import DatabaseSettings
from .state import AppState
from .statements import TRANSACTION_CONTROL

log = logging.getLogger("myapp.sql")

# In a pooled connection's info: when its statement under way started. One value, not
# a stack: a statement that fails never reaches "after", and the next one overwrites it.
_STARTED = "myapp.query_started"


class SlowQueryLog:
    """Log statements slower than the threshold: statement, duration, endpoint; never
    the parameters (they may hold a password hash or personal data)."""

    def __init__(self, threshold_ms: float) -> None:
        self.threshold_ms = threshold_ms

    @classmethod
    def build(cls, settings: DatabaseSettings) -> SlowQueryLog | None:
        return cls(settings.slow_query_ms) if settings.slow_query_ms else None

    def install(self, state: AppState, app: Flask) -> None:
        for engine in state.serving:
            event.listen(engine, "before_cursor_execute", self._start)
            event.listen(engine, "after_cursor_execute", self._stop)

    def _start(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        conn.info[_STARTED] = time.perf_counter()

    def _stop(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        started = conn.info.pop(_STARTED, None)
        if started is None:
            return
        elapsed_ms = (time.perf_counter() - started) * 1000
        if elapsed_ms >= self.threshold_ms:
            endpoint = request.endpoint if has_request_context() else "-"
            log.warning("slow query (%.0f ms) in %s: %s", elapsed_ms, endpoint, " ".join(statement.split()))


class QueryBudget:
    """Count each request's statements; warn past the budget (an N+1 query is the usual
    cause) and, in debug, show the count in an ``X-Query-Count`` header."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    @classmethod
    def build(cls, settings: DatabaseSettings) -> QueryBudget | None:
        return cls(settings.query_budget) if settings.query_budget else None

    def install(self, state: AppState, app: Flask) -> None:
        for engine in state.serving:
            event.listen(engine, "before_cursor_execute", _count)
        debug = app.debug

        @app.after_request
        def _report(response: Response) -> Response:
            count = g.get("query_count", 0)
            if count > self.budget:
                log.warning("%s %s sent %d queries (budget %d)", request.method, request.path, count, self.budget)
            if debug:
                response.headers["X-Query-Count"] = str(count)
            return response


def _count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
    if has_request_context() and not statement.startswith(TRANSACTION_CONTROL):
        g.query_count = g.get("query_count", 0) + 1
