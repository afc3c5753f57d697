"""What a visitor sees while the site cannot write (issue 19): the primary database is
unreachable, and GET pages are read from a replica.

- Every page carries a banner saying the site is read-only for now, and, when the
  replica has not replayed the visitor's own last change, that it may not show yet.
- A form sent meanwhile gets a 503 page (``errors``) that gives back what was typed,
  in a form that sends it again, so that no text is lost. Passwords are never echoed.

Logging in needs the primary (the failed-login counters live there, and the limiter
must never fail open), so it gets the same 503 page, the username kept.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, request

from .db import db
from .db.replication import ReadOnlyMode

# Fields never written back into a page: a password, and the token a new form gets anew.
_NEVER_ECHOED = frozenset({"password", "csrf_token"})


def init_app(app: Flask) -> None:
    app.context_processor(lambda: {"read_only": db.read_only_mode()})


def kept_fields() -> list[tuple[str, str]]:
    """What the visitor typed into the form this request sent, in order, passwords and
    the CSRF token left out: empty for anything but a form POST."""
    if request.method != "POST" or not request.form:
        return []
    return [(name, value) for name, value in request.form.items(multi=True) if name not in _NEVER_ECHOED]


def context(kept: list[tuple[str, str]], primary_down: bool) -> dict[str, Any]:
    """What error.html needs to give the typed text back; and the banner, when this
    very request found the primary unreachable and replicas could serve the pages."""
    extra: dict[str, Any] = {"kept": kept, "kept_action": request.path}
    if primary_down and db.read_only_mode_allowed():
        extra["read_only"] = db.read_only_mode() or ReadOnlyMode(None, False)
    return extra
