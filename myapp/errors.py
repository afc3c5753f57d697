"""Error pages: every failure gets a page with the layout, never a traceback."""

from __future__ import annotations

import logging

from flask import Flask, render_template
from sqlalchemy import exc as sa_exc
from werkzeug.exceptions import HTTPException

from . import observability, read_only
from .db import db
from .db.errors import DatabaseUnavailable, describe_error, unavailable_reason
from .db.routing import ReplicaWriteError

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5

# A write that got a 503 is indeterminate: the commit may have reached the server
# before the failure. Every 503 page says so.
_MAY_HAVE_BEEN_SAVED = "If you were saving something, it may or may not have been saved: check before you send it again."

_MESSAGES = {
    400: ("Bad request", "The request could not be understood. If you submitted a form, "
          "go back, reload the page and try again."),
    403: ("Forbidden", "You are not allowed to do that."),
    404: ("Not found", "There is nothing at this address."),
    405: ("Method not allowed", "This address does not accept that kind of request."),
    409: ("Conflict", "Someone else changed this at the same time. Reload and try again."),
    413: ("Too large", "What you sent is larger than this site accepts."),
    429: ("Too many requests", "Slow down a little and try again shortly."),
    500: ("Something went wrong", "An unexpected error happened on our side. It has been logged."),
    503: ("Temporarily unavailable", "The database cannot be reached right now. Please try "
          "again in a few seconds. " + _MAY_HAVE_BEEN_SAVED),
}

# A 503 says why (database down, every pooled connection busy, a query stopped by the
# statement timeout), for the user and in the log line an operator greps.
_UNAVAILABLE_MESSAGES = {
    "unreachable": _MESSAGES[503][1],
    "busy": "The site is too busy right now: every database connection is in use. Please try "
            "again in a few seconds. " + _MAY_HAVE_BEEN_SAVED,
    "statement timeout": "The database took too long to answer, so the request was stopped. "
                         "Please try again in a few seconds. " + _MAY_HAVE_BEEN_SAVED,
}


# The 503 metric's cause for each reason a failure gives (the breaker's and the
# bulkhead's refusals are counted where they are rendered).
_CAUSES = {"unreachable": "unreachable", "busy": "pool_timeout", "statement timeout": "statement_timeout"}


def init_app(app: Flask) -> None:
    app.register_error_handler(HTTPException, render_http_error)
    app.register_error_handler(sa_exc.DBAPIError, render_database_error)
    app.register_error_handler(sa_exc.TimeoutError, render_database_error)
    app.register_error_handler(DatabaseUnavailable, render_database_refused)
    app.register_error_handler(ReplicaWriteError, render_replica_write)


def error_page(code: int, description: str | None = None, primary_down: bool = False) -> str:
    """Render the error page; it reads nothing from the database.

    The session is rolled back first: whatever the failed request half-did must not be
    committed by anything later, and a broken connection goes back to the pool now.
    """
    db.rollback()
    title, message = _MESSAGES.get(code, (str(code), ""))
    request_id = observability.request_id() if code >= 500 else None
    kept = read_only.kept_fields() if code == 503 else []
    return render_template("error.html", code=code, title=title, message=description or message,
                           request_id=request_id, **read_only.context(kept, primary_down))


def render_http_error(error: HTTPException) -> tuple[str, int, list[tuple[str, str]]]:
    code = error.code or 500
    # Our own abort() descriptions are meant for people; werkzeug's defaults are not.
    description = error.description if error.description != type(error).description else None
    if code >= 500:
        description = None
    # Keep what the exception says about itself (Allow on a 405), not its content type.
    headers = [(name, value) for name, value in error.get_headers() if name.lower() != "content-type"]
    return error_page(code, description), code, headers


def render_database_error(error: sa_exc.SQLAlchemyError) -> tuple[str, int, dict[str, str]] | tuple[str, int]:
    """Database unavailable, pool exhausted, statement timed out, connection lost: all
    temporary, so a 503 with Retry-After that says why; anything else is a 500."""
    reason = unavailable_reason(error)
    if reason is None:
        log.error("database error: %s", describe_error(error), exc_info=error)
        return error_page(500), 500
    log.warning("database unavailable (%s): %s", reason, describe_error(error))
    read_only = getattr(getattr(error, "orig", None), "sqlstate", None) == "25006"  # a demoted primary
    observability.count_unavailable("read_only" if read_only else _CAUSES[reason])
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    return error_page(503, _UNAVAILABLE_MESSAGES[reason], primary_down=reason == "unreachable"), 503, headers


def render_database_refused(error: DatabaseUnavailable) -> tuple[str, int, dict[str, str]]:
    """The breaker is open or every database slot is busy: the request never reached the
    database, so a 503 at once, saying when to come back. Slots all stuck on the primary
    are as good as an open breaker: with replicas, the page says the site is read-only."""
    log.warning("database request refused (%s): %s", error.reason, error)
    observability.count_unavailable("breaker" if error.reason == "unreachable" else "bulkhead")
    primary_down = error.reason == "unreachable" or error.stuck_on == "primary"
    page = error_page(503, _UNAVAILABLE_MESSAGES[error.reason], primary_down=primary_down)
    return page, 503, {"Retry-After": str(error.retry_after)}


_READ_ONLY_MESSAGE = (
    "This page can only read, so nothing you sent was saved. Go back and try again; if "
    "it happens again, the site is in read-only mode for now."
)


def render_replica_write(error: ReplicaWriteError) -> tuple[str, int]:
    """A session bound to a read replica tried to write. Nothing was written, and a retry
    will meet the same refusal, so no Retry-After: a 503 all the same, as a site in
    read-only mode answers, because the request was fine and the server could not serve
    it; not a 500 page, which would say something broke half-way. The log line is an
    ERROR with the traceback: it is a bug to fix."""
    log.error("write refused in a read-replica session: %s", error, exc_info=error)
    observability.count_unavailable("read_only")
    return error_page(503, _READ_ONLY_MESSAGE), 503
