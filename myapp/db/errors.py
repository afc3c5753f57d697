"""What a database failure means, said safely: which failures are temporary (a 503),
which a retry may cure, and one line about it with no secret in it."""

from __future__ import annotations

import math
from typing import Literal

from sqlalchemy import exc

from sqlalchemy.engine import URL, make_url

Unavailable = Literal["unreachable", "busy", "statement timeout"]

_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock
_RETRYABLE_MYSQL_CODES = frozenset({1213})  # deadlock found when trying to get lock
# PostgreSQL query_canceled (statement_timeout); MariaDB max_statement_time, MySQL max_execution_time.
_STATEMENT_TIMEOUT_SQLSTATES = frozenset({"57014"})
_STATEMENT_TIMEOUT_MYSQL_CODES = frozenset({1969, 3024})


def mask_url(url: str | URL) -> str:
    """Render a database URL with its password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def describe_error(error: BaseException) -> str:
    """One line that says what went wrong with the database, with no secrets in it.

    The driver's message is kept (it names the host, port or user, never the
    password); the SQL and its parameters are dropped.
    """
    original = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    message = lines[0] if lines else "no details"
    return f"{type(original).__name__}: {message}"[:300]


def _driver_code(error: BaseException) -> tuple[str | None, object]:
    """The SQLSTATE (psycopg) and the first argument (PyMySQL's error number) of the driver's error."""
    original = getattr(error, "orig", None)
    args = getattr(original, "args", ())
    return getattr(original, "sqlstate", None), args[0] if args else None


def is_retryable(error: BaseException) -> bool:
    """True for failures that a fresh run of the same unit of work may not meet again."""
    original = getattr(error, "orig", None)
    if original is None:
        return False
    sqlstate, code = _driver_code(error)
    if sqlstate in _RETRYABLE_SQLSTATES or code in _RETRYABLE_MYSQL_CODES:
        return True
    message = str(original)
    return type(original).__module__.startswith("sqlite3") and (
        "database is locked" in message or "database is busy" in message
    )


def retry_reason(error: BaseException) -> str:
    """What a retryable failure was, for the retries metric: ``serialization``,
    ``deadlock``, ``certification`` (a Galera conflict, reported as MariaDB's deadlock)
    or ``locked`` (SQLite)."""
    sqlstate, code = _driver_code(error)
    if code in _RETRYABLE_MYSQL_CODES:  # PyMySQL gives it SQLSTATE 40001 too
        return "certification" if "wsrep" in str(getattr(error, "orig", "")).lower() else "deadlock"
    if sqlstate == "40001":
        return "serialization"
    return "deadlock" if sqlstate == "40P01" else "locked"


def unavailable_reason(error: BaseException) -> Unavailable | None:
    """Why the database could not serve the request, or None if it is not a matter of
    availability (a bug, a constraint): "busy" (no free pooled connection within the
    pool timeout), "statement timeout" (the server cancelled a query that ran too long)
    or "unreachable" (connect failed, connection lost)."""
    if isinstance(error, exc.TimeoutError):
        return "busy"
    if not isinstance(error, exc.DBAPIError):
        return None
    sqlstate, code = _driver_code(error)
    if sqlstate in _STATEMENT_TIMEOUT_SQLSTATES or code in _STATEMENT_TIMEOUT_MYSQL_CODES:
        return "statement timeout"
    if isinstance(error, (exc.OperationalError, exc.InterfaceError)) or error.connection_invalidated:
        return "unreachable"
    return None


class DatabaseUnavailable(exc.SQLAlchemyError):
    """The request was refused before it reached the database (a 503 page). ``stuck_on``:
    the server every bulkhead slot in its way was stuck on, when they all were on one."""

    def __init__(self, reason: Literal["unreachable", "busy"], detail: str, retry_after: float,
                 stuck_on: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.retry_after = max(1, math.ceil(retry_after))
        self.stuck_on = stuck_on
