"""Units of work: where a transaction starts and ends, what runs after its commit, and
how a whole unit is retried. ``Database`` exposes each as a method (``db.transaction()``)."""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from .errors import describe_error, is_retryable
from .routing import require_transaction
from .tracking import has_writes

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_DEPTH = "transaction_depth"
_ON_COMMIT = "on_commit"

S = TypeVar("S", bound=Session)


@contextmanager
def transaction(session: S) -> Iterator[S]:
    """Commit on success, roll back on error; nested, a SAVEPOINT.

    The outermost block commits the session's whole transaction, reads made before it
    included; every statement inside it runs in that one transaction.
    """
    depth = session.info.get(_DEPTH, 0)
    session.info[_DEPTH] = depth + 1
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
        session.info[_DEPTH] = depth


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
    session.info.setdefault(_ON_COMMIT, []).append((transaction, callback))


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
            if session.info.get(_DEPTH):
                raise RuntimeError(
                    f"{unit.__name__} is retried inside an open db.transaction(): a retry "
                    "can only re-run a whole unit of work, so put the retry outside it."
                )
            if has_writes(session):
                raise RuntimeError(
                    f"{unit.__name__} is retried but the session already holds "
                    "uncommitted writes that a retry would discard: commit first, or "
                    "retry the whole unit of work."
                )
            for attempt in range(1, attempts + 1):
                try:
                    return unit(*args, **kwargs)
                except DBAPIError as error:
                    if attempt == attempts or not is_retryable(error):
                        raise
                    session.rollback()
                    delay = random.uniform(0, backoff * 2 ** (attempt - 1))
                    log.info("retrying %s after %s (attempt %d)", unit.__name__, describe_error(error), attempt)
                    time.sleep(delay)
            raise AssertionError("unreachable")

        return run

    return decorator


def install_commit_hooks(maker: sessionmaker[Any]) -> None:
    """Run ``on_commit`` callbacks after the commit; drop them with their rollback."""

    @event.listens_for(maker, "after_commit")
    def _run_after_commit(session: Session) -> None:
        for _transaction, callback in session.info.pop(_ON_COMMIT, []):
            try:
                callback()
            except Exception:  # the data is committed; one failing hook must not hide it
                log.exception("after-commit callback %r failed", callback)

    @event.listens_for(maker, "after_soft_rollback")
    def _forget_after_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
        if previous_transaction.nested:
            session.info[_ON_COMMIT] = [
                (transaction, callback)
                for transaction, callback in session.info.get(_ON_COMMIT, [])
                if not _descends_from(transaction, previous_transaction)
            ]
        else:
            session.info.pop(_ON_COMMIT, None)


def _descends_from(transaction: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False
