"""Failed logins, limited per username and per client address, with the ``limits``
library (the core of Flask-Limiter) called from the login view itself.

Only the login POST pays for it: no hook runs on any other request. The count is
tested before the password is checked and a failure is added after, so attempts in
flight when the limit is reached still finish (at most one per busy worker thread
beyond the limit); counting every attempt up front would close that gap but lock
people out for logging in successfully. The counters live in the app's own database
(``DatabaseStorage``, table ``rate_limit``), so every gunicorn worker sees the same
counts without another service to run; ``RATELIMIT_STORAGE_URI`` may name another
``limits`` storage (``redis://...``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app, request
from limits import RateLimitItem, parse_many
from limits.storage import Storage, storage_from_string
from limits.strategies import FixedWindowRateLimiter
from sqlalchemy import case, delete, select
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import TooManyRequests

from .db import db, has_writes
from .db.errors import describe_error
from .models import RATE_LIMIT_KEY_MAX_LENGTH, USERNAME_MAX_LENGTH, RateLimit, normalize_username

log = logging.getLogger(__name__)

TOO_MANY_LOGINS = (
    "Too many failed logins for this account or from your address. "
    "Please wait a little before you try again."
)
SCOPE = "auth.login"  # in every stored key: LIMITER/<bucket>/auth.login/<amount>/<multiples>/<unit>
_EXTENSION_KEY = "myapp.login_limits"


def client_address() -> str:
    return "address:" + (request.remote_addr or "unknown")


def submitted_username() -> str:
    """The username as the login form will look it up, so "Alice " counts as "alice"."""
    raw = request.form.get("username", "")
    return "username:" + normalize_username(raw)[:USERNAME_MAX_LENGTH]


class LoginLimits:
    """The two login limits of one app: its own storage, limits and enabled flag."""

    def __init__(self, app: Flask) -> None:
        enabled = app.config["RATELIMIT_ENABLED"]
        self.enabled = not app.testing if enabled is None else bool(enabled)  # tests that test it turn it on
        app.config["RATELIMIT_ENABLED"] = self.enabled
        self.strategy = FixedWindowRateLimiter(storage_from_string(app.config["RATELIMIT_STORAGE_URI"]))
        self.limits: list[tuple[RateLimitItem, Callable[[], str]]] = [
            (item, bucket)
            for setting, bucket in (("LOGIN_RATE_LIMIT", submitted_username),
                                    ("LOGIN_RATE_LIMIT_PER_ADDRESS", client_address))
            for item in parse_many(app.config[setting])
        ]

    def check(self) -> None:
        """Raise TooManyRequests (the 429 page, with Retry-After) if this username or address is over a limit."""
        if not self.enabled:
            return
        for item, bucket in self.limits:
            key = bucket()
            if not self._safely(lambda: self.strategy.test(item, key, SCOPE), True):
                raise TooManyRequests(TOO_MANY_LOGINS, retry_after=self._retry_after(item, key))

    def count_failure(self) -> None:
        """Add this failed login to every counter it belongs to."""
        if self.enabled:
            for item, bucket in self.limits:
                key = bucket()
                self._safely(lambda: self.strategy.hit(item, key, SCOPE), True)

    def _retry_after(self, item: RateLimitItem, key: str) -> int:
        try:
            reset_at = self.strategy.get_window_stats(item, key, SCOPE).reset_time
        except SQLAlchemyError as error:
            # The whole window is never too short a wait, so the page is still right.
            log.warning("rate limit reset time not read, Retry-After is the whole window: %s", describe_error(error))
            return int(item.get_expiry())
        return max(1, int(reset_at - time.time()))

    @staticmethod
    def _safely(call: Callable[[], bool], fallback: bool) -> bool:
        """Fail open, logged: a storage fault never becomes an error page of its own nor
        locks everyone out (without a database the login cannot succeed anyway)."""
        try:
            return call()
        except SQLAlchemyError as error:
            log.error("login rate limit storage failed, not limiting: %s", describe_error(error))
            return fallback


def init_app(app: Flask) -> None:
    app.extensions[_EXTENSION_KEY] = LoginLimits(app)


def login_limits() -> LoginLimits:
    """The current app's login limits."""
    return current_app.extensions[_EXTENSION_KEY]  # type: ignore[no-any-return]


class DatabaseStorage(Storage):
    """A ``limits`` storage on the app's database: one row per counter, in table
    ``rate_limit``, through the current app context's session.

    The session, not a connection of its own: a POST on SQLite holds the write lock
    from its first statement (BEGIN IMMEDIATE), so a second connection of the same
    request would wait for itself. The count is read before the password check and a
    failure recorded after it, and ``incr`` commits that session: it refuses to when the
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
