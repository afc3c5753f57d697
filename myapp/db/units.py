"""Units of work: where a transaction starts and ends, what runs after its commit, and
how a whole unit is retried; ``UnitsOfWork`` gives ``db`` the methods for them."""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, ParamSpec, TypeVar

from flask import Flask, current_app, has_app_context
from werkzeug.wrappers import Response
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from .errors import describe_error, is_retryable, retry_reason
from .metrics import RETRIES, UNITS_GIVEN_UP
from .session import AppSession, require_transaction, state_of
from .state import StateAccess
from .tracking import has_writes

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

S = TypeVar("S", bound=Session)


@contextmanager
def transaction(session: S) -> Iterator[S]:
    """Commit on success, roll back on error; nested, a SAVEPOINT.

    The outermost block commits the session's whole transaction, reads made before it
    included; every statement inside it runs in that one transaction.
    """
    state = state_of(session)
    depth = state.depth
    state.depth = depth + 1
    try:
        if depth:
            with session.begin_nested():
                yield session
        else:
            require_transaction(session)
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise
    finally:
        state.depth = depth


def on_commit(session: Session, callback: Callable[[], Any]) -> None:
    """Run ``callback`` once the session's current transaction has really committed.

    Dropped if it rolls back (or the SAVEPOINT it was registered in does). With no
    transaction and nothing pending, it runs at once: there is nothing to wait for.
    """
    transaction = session.get_nested_transaction() or session.get_transaction()
    if transaction is None and not has_writes(session):
        callback()
        return
    if transaction is None:
        transaction = session.begin()
    state_of(session).on_commit.append((transaction, callback))


def retrying(
    get_session: Callable[[], Session], attempts: int, backoff: float
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Re-run a whole, idempotent unit of work on a serialization failure or deadlock.

    PostgreSQL 40001/40P01, MariaDB/MySQL 1213, SQLite busy; at most ``attempts`` runs,
    with jittered exponential backoff.
    """
    if not 1 <= attempts <= 10:
        raise ValueError("attempts must be between 1 and 10")

    def decorator(unit: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(unit)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            session = get_session()
            _check_retry_is_whole(session, unit.__name__)
            for attempt in range(1, attempts):
                try:
                    return unit(*args, **kwargs)
                except DBAPIError as error:
                    if not is_retryable(error):
                        raise
                    _before_retry(session, unit.__name__, error, attempt, backoff)
            try:
                return unit(*args, **kwargs)
            except DBAPIError as error:
                if is_retryable(error):
                    UNITS_GIVEN_UP.inc()
                raise

        return run

    return decorator


def _check_retry_is_whole(session: Session, name: str) -> None:
    """A retry re-runs a whole unit of work: never one begun outside it."""
    if state_of(session).depth:
        raise RuntimeError(
            f"{name} is retried inside an open db.transaction(): a retry "
            "can only re-run a whole unit of work, so put the retry outside it."
        )
    if has_writes(session):
        raise RuntimeError(
            f"{name} is retried but the session already holds "
            "uncommitted writes that a retry would discard: commit first, or "
            "retry the whole unit of work."
        )


def _before_retry(session: Session, name: str, error: DBAPIError, attempt: int, backoff: float) -> None:
    session.rollback()
    RETRIES.labels(retry_reason(error)).inc()
    log.info("retrying %s after %s (attempt %d)", name, describe_error(error), attempt)
    time.sleep(random.uniform(0, backoff * 2 ** (attempt - 1)))


def install_commit_hooks(maker: sessionmaker[Any]) -> None:
    """Run ``on_commit`` callbacks after the commit; drop them with their rollback."""

    @event.listens_for(maker, "after_commit")
    def _run_after_commit(session: Session) -> None:
        state = state_of(session)
        if not state.on_commit:
            return
        callbacks, state.on_commit = state.on_commit, []
        for _transaction, callback in callbacks:
            try:
                callback()
            except Exception:  # the data is committed; one failing hook must not hide it
                log.exception("after-commit callback %r failed", callback)

    @event.listens_for(maker, "after_soft_rollback")
    def _forget_after_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
        state = state_of(session)
        if not state.on_commit:
            return
        if previous_transaction.nested:
            state.on_commit = [
                (transaction, callback) for transaction, callback in state.on_commit
                if not _descends_from(transaction, previous_transaction)
            ]
        else:
            state.on_commit = []


def _descends_from(transaction: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False


def commit_before_response(
    current_session: Callable[[], Session | None], rollback: Callable[[], None]
) -> Callable[[Response], Response]:
    """The after_request hook of ``DATABASE_COMMIT_ON_SUCCESS``: commit a request that
    wrote and succeeded, before the response leaves; a failed commit becomes the error
    page, never a success for a lost write."""

    def commit(response: Response) -> Response:
        session = current_session()
        if session is None:
            return response
        if response.status_code >= 400:
            rollback()
        elif has_writes(session):
            try:
                session.commit()
            except SQLAlchemyError as error:
                rollback()  # a rollback that fails too must not hide the commit's error
                return current_app.make_response(current_app.handle_user_exception(error))
        return response

    return commit


_NO_CONTEXT_MESSAGE = (
    "db.session was used outside an application context. Inside a view or a `flask` "
    "command one is pushed for you; in a script or a thread use `with "
    "db.session_scope(app):` (or `with app.app_context():`), or take `db.get_session()` "
    "and close it yourself."
)


def current_app_or_raise() -> Flask:
    """The app of the current context, or an error that says how to get one."""
    if not has_app_context():
        raise RuntimeError(_NO_CONTEXT_MESSAGE)
    return current_app._get_current_object()  # type: ignore[attr-defined,no-any-return]


class UnitsOfWork(StateAccess):
    """The ``db`` methods for units of work."""

    @contextmanager
    def transaction(self) -> Iterator[AppSession]:
        """Commit on success, roll back on error; nested, a SAVEPOINT. Also a decorator:
        ``@db.transaction()``."""
        with transaction(self.session()) as session:
            yield session

    def on_commit(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` once the current transaction has really committed."""
        on_commit(self.session(), callback)

    def retrying(self, attempts: int = 3, backoff: float = 0.05) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Re-run a whole, idempotent unit of work on a serialization failure or deadlock.

        Never wrap a whole POST view: wrap the function that does one unit of work from
        its start, inside a transaction.
        """
        return retrying(self.session, attempts, backoff)

    @contextmanager
    def session_scope(self, app: Flask | None = None) -> Iterator[AppSession]:
        """A unit of work for CLI commands, scripts and threads.

        Inside the app's context (a command), use its session; otherwise push a new app
        context, whose teardown removes the session at the end. Either way the block is
        a ``transaction()``. A thread started by a view passes the app and so gets a
        session of its own, never the view's.
        """
        app = app if app is not None else current_app_or_raise()
        inside = has_app_context() and current_app_or_raise() is app
        with nullcontext() if inside else app.app_context():
            with self.transaction() as session:
                yield session
