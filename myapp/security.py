"""What a public site needs beyond its views: security headers on every response, the
client's real address and scheme behind a proxy, a session cookie that is Secure over
HTTPS, and login attempts rate-limited per username and per client address.

The rate limiter is Flask-Limiter, one per app, counting in the app's own database
(``DatabaseStorage``, table ``rate_limit``) so that every gunicorn worker sees the same
counts without another service to run.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, current_app, has_request_context, request
from flask.sessions import SecureCookieSessionInterface
from flask_limiter import Limit, Limiter, RateLimitExceeded
from limits.storage import Storage
from sqlalchemy import case, delete, select
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.wrappers import Response

from .db import db, has_writes
from .db.errors import describe_error
from .errors import render_http_error
from .models import RATE_LIMIT_KEY_MAX_LENGTH, USERNAME_MAX_LENGTH, RateLimit, normalize_username

# No inline script or style anywhere: the templates link their CSS and JS files.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # for browsers that predate frame-ancestors
    # Not "no-referrer": Flask-WTF checks the Referer of HTTPS form posts.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
STRICT_TRANSPORT_SECURITY = "max-age=31536000"  # sent over HTTPS only

TOO_MANY_LOGINS = (
    "Too many failed logins for this account or from your address. "
    "Please wait a little before you try again."
)

_LIMITER_KEY = "myapp.limiter"

log = logging.getLogger(__name__)


def init_headers(app: Flask) -> None:
    """Call first in ``create_app``, before any other after_request hook is registered.

    Flask runs after_request functions in the reverse order of their registration, so
    the first one registered runs last: a response that a later-registered hook
    replaced (the error page of a failed DATABASE_COMMIT_ON_SUCCESS commit) still gets
    the headers.
    """
    app.after_request(add_security_headers)


def init_app(app: Flask) -> None:
    """Call last in ``create_app``: the limiter's before_request check must come after
    the hooks that load the user, check CSRF and guard the database."""
    _trust_proxy(app)
    app.session_interface = HttpsAwareSessionInterface()
    _limit_logins(app)


# -- headers, proxy, cookie ----------------------------------------------------------


def add_security_headers(response: Response) -> Response:
    """Runs for every response, error pages and static files included."""
    # One pass over the headers instead of a case-insensitive scan per setdefault():
    # this runs on every response, so its cost shows on the cheapest routes.
    present = {name.lower() for name, _ in response.headers}
    for name, value in SECURITY_HEADERS.items():
        if name.lower() not in present:
            response.headers.add(name, value)
    if has_request_context() and request.is_secure:
        response.headers.setdefault("Strict-Transport-Security", STRICT_TRANSPORT_SECURITY)
    return response


def _trust_proxy(app: Flask) -> None:
    """Believe X-Forwarded-* only as far as PROXY_FIX_X_* says a proxy sets them;
    otherwise anyone could pick their own address (and rate-limit bucket) or scheme."""
    hops = {name: int(app.config[f"PROXY_FIX_X_{name.upper()}"]) for name in ("for", "proto", "host", "port", "prefix")}
    if any(hops.values()):
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app,
            x_for=hops["for"],
            x_proto=hops["proto"],
            x_host=hops["host"],
            x_port=hops["port"],
            x_prefix=hops["prefix"],
        )


class HttpsAwareSessionInterface(SecureCookieSessionInterface):
    """The session cookie is Secure when SESSION_COOKIE_SECURE says so, and also
    whenever the request itself came over HTTPS (directly or through a trusted proxy),
    so that a site served over HTTPS never sends it in clear by a forgotten setting."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return super().get_cookie_secure(app) or (has_request_context() and request.is_secure)


# -- login rate limits ----------------------------------------------------------------


def client_address() -> str:
    return "address:" + (request.remote_addr or "unknown")


def submitted_username() -> str:
    """The username as the login form will look it up, so "Alice " counts as "alice"."""
    raw = request.form.get("username", "")
    return "username:" + normalize_username(raw)[:USERNAME_MAX_LENGTH]


def _login_failed(response: Response) -> bool:
    # A successful login redirects; a failed one shows the form again (200). CSRF
    # failures (400) and outages (503) never reach the password check: not counted.
    return response.status_code == 200


def get_limiter(app: Flask | None = None) -> Limiter:
    return (app or current_app).extensions[_LIMITER_KEY]  # type: ignore[no-any-return]


def _limit_logins(app: Flask) -> None:
    """Count failed logins per username and per client address; past either limit the
    login answers 429, even with the right password, until the window ends.

    Flask-Limiter tests the count before the view and adds a failure after it, so
    attempts in flight when the limit is reached still finish (at most one per busy
    worker thread beyond the limit); counting every attempt up front would close
    that gap but lock people out for logging in successfully.

    One Limiter per app (not a module-level one): its storage, its enabled flag and
    its limits belong to that app alone, like the database engine.
    """
    enabled = app.config["RATELIMIT_ENABLED"]
    if enabled is None:
        enabled = not app.testing  # tests that test limiting turn it on
    app.config["RATELIMIT_ENABLED"] = enabled
    limiter = Limiter(
        key_func=client_address,
        default_limits=list(_login_limits(app)),
        storage_uri=app.config["RATELIMIT_STORAGE_URI"],
        strategy="fixed-window",
        # Fail open, logged: the limiter never turns a database problem into an error
        # page of its own. Without a database the login cannot succeed anyway (its
        # user lookup answers 503), and a storage-only fault must not lock everyone out.
        swallow_errors=True,
    )
    limiter.init_app(app)
    # The default limits are the login limits: every other request is spared them
    # and the limiter's check.
    limiter.request_filter(lambda: request.endpoint != "auth.login")
    app.extensions[_LIMITER_KEY] = limiter
    app.register_error_handler(RateLimitExceeded, render_rate_limited)


def _login_limits(app: Flask) -> Iterator[Limit]:
    """The two login limits, as Flask-Limiter default limits: each route's own bucket
    (scope "auth.login"), checked before the view, and counted only for a failed POST."""
    for setting, key_func in (
        ("LOGIN_RATE_LIMIT", submitted_username),
        ("LOGIN_RATE_LIMIT_PER_ADDRESS", client_address),
    ):
        yield Limit(
            app.config[setting],
            key_function=key_func,
            methods=["POST"],
            deduct_when=_login_failed,
            error_message=TOO_MANY_LOGINS,
        )


def render_rate_limited(error: RateLimitExceeded) -> tuple[str, int, dict[str, str]]:
    """The 429 page with the layout, and when to come back."""
    page, code, _ = render_http_error(error)
    retry_after = int(error.limit.limit.get_expiry())
    current = get_limiter().current_limit
    if current is not None:
        try:
            retry_after = max(1, int(current.reset_at - time.time()))
        except SQLAlchemyError as error:
            # The whole window is never too short a wait, so the page is still right.
            log.warning(
                "rate limit reset time not read, Retry-After is the whole window: %s", describe_error(error)
            )
    return page, code, {"Retry-After": str(retry_after)}


class DatabaseStorage(Storage):
    """A ``limits`` storage on the app's database: one row per counter, in table
    ``rate_limit``, through the current app context's session.

    The session, not a connection of its own: a POST on SQLite holds the write lock
    from its first statement (BEGIN IMMEDIATE), so a second connection of the same
    request would wait for itself. Flask-Limiter reads before the view and records a
    failed attempt after it, and ``incr`` commits that session: it refuses to when the
    view left writes of its own uncommitted (committing them is the view's decision).
    """

    STORAGE_SCHEME = ["myapp-db"]
    PURGE_INTERVAL = 60.0  # seconds between deletions of expired counters

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options: Any) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self._next_purge = 0.0

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return SQLAlchemyError

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Add ``amount`` in one atomic upsert; an expired counter starts again."""
        key, now = _stored_key(key), time.time()
        session = db.session()
        if has_writes(session):
            raise RuntimeError("rate limit not recorded: the view left uncommitted writes")
        expired = RateLimit.expires_at <= now
        count = case((expired, amount), else_=RateLimit.count + amount)
        expires_at = case((expired, now + expiry), else_=RateLimit.expires_at)
        values = {"key": key, "count": amount, "expires_at": now + expiry}
        dialect = session.get_bind().dialect.name

        # A Galera certification conflict (two nodes counting the same key) is retried.
        @db.retrying()
        def add() -> int:
            with db.transaction():
                if dialect in ("mysql", "mariadb"):
                    # MariaDB assigns left to right: count first, while expires_at is old.
                    session.execute(
                        mysql.insert(RateLimit).values(values).on_duplicate_key_update(
                            [("count", count), ("expires_at", expires_at)]
                        )
                    )
                else:
                    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
                    session.execute(
                        insert(RateLimit).values(values).on_conflict_do_update(
                            index_elements=[RateLimit.key], set_={"count": count, "expires_at": expires_at}
                        )
                    )
                if now >= self._next_purge:
                    self._next_purge = now + self.PURGE_INTERVAL
                    session.execute(delete(RateLimit).where(RateLimit.expires_at < now))
                return int(session.scalar(select(RateLimit.count).where(RateLimit.key == key)) or 0)

        return add()

    def get(self, key: str) -> int:
        return int(self._read(RateLimit.count, key) or 0)

    def get_expiry(self, key: str) -> float:
        return float(self._read(RateLimit.expires_at, key) or time.time())

    def _read(self, column: Any, key: str) -> Any:
        try:
            return db.session.scalar(
                select(column).where(RateLimit.key == _stored_key(key), RateLimit.expires_at > time.time())
            )
        except SQLAlchemyError:
            # Leave the session usable for the view (PostgreSQL refuses every later
            # statement of a failed transaction).
            db.rollback()
            raise

    def check(self) -> bool:
        try:
            db.session.scalar(select(RateLimit.key).limit(1))
        except SQLAlchemyError:
            db.rollback()
            return False
        return True

    def reset(self) -> int | None:
        with db.transaction() as session:
            return session.execute(delete(RateLimit)).rowcount  # type: ignore[attr-defined,no-any-return]

    def clear(self, key: str) -> None:
        with db.transaction() as session:
            session.execute(delete(RateLimit).where(RateLimit.key == _stored_key(key)))


def _stored_key(key: str) -> str:
    """Keys longer than the column keep a readable start and a digest of the whole."""
    if len(key) <= RATE_LIMIT_KEY_MAX_LENGTH:
        return key
    return key[:150] + "#" + hashlib.sha256(key.encode()).hexdigest()
