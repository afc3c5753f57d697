"""What a session wrote: the one record behind lost-write detection, read-your-writes
and the replicas' "this session wrote, read from the primary".

ORM changes are named by their objects (``new User``, ``changed Post[3]``) when they
are flushed; writes that bypass the ORM (``text()``, Core ``insert``/``update``,
``session.connection()``) are seen where every statement passes, on the engine, and
named by their verb. A commit moves them from ``uncommitted`` to ``committed_writes``;
a rollback forgets them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, event, inspect
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from .metrics import LOST_WRITES
from .session import SessionState, state_of
from .state import CONNECTION_KEY, AppState
from .statements import classify

if TYPE_CHECKING:
    from flask import Flask

    from .config import DatabaseSettings


log = logging.getLogger("myapp.db")


class LostWriteError(RuntimeError):
    """A session ended with changes nobody committed (raised in testing, logged otherwise)."""


def has_writes(session: Session) -> bool:
    """True if the session has changes to flush or writes sent but not yet committed."""
    return bool(session.new or session.deleted or state_of(session).uncommitted) or any(
        session.is_modified(obj) for obj in session.dirty
    )


def describe_uncommitted(session: Session) -> list[str]:
    """Name what a session would lose, without its (possibly private) contents."""
    flushed = [f"flushed {name}" for name in state_of(session).uncommitted]
    if not session.identity_map and not session.new:  # a request that only read in autocommit, say
        return flushed
    return _pending(session) + flushed


def report_lost(session: Session, lost: list[str], raise_it: bool) -> None:
    """A session ended with writes nobody committed: a bug, raised in tests, logged otherwise."""
    message = (
        f"{state_of(session).origin} ended with uncommitted changes ({', '.join(lost)}); they were "
        "rolled back. Commit them (with db.transaction()) or roll back explicitly."
    )
    LOST_WRITES.inc()
    if raise_it:
        raise LostWriteError(message)
    log.warning(message)


def _pending(session: Session) -> list[str]:
    names = [f"new {type(obj).__name__}" for obj in session.new]
    names += [f"changed {_identity(obj)}" for obj in session.dirty if session.is_modified(obj)]
    names += [f"deleted {_identity(obj)}" for obj in session.deleted]
    return names


def _identity(obj: object) -> str:
    key = inspect(obj).identity
    return f"{type(obj).__name__}{list(key) if key else ''}"


class WriteTracking:
    """The feature; always on, since a forgotten commit must never pass unnoticed."""

    @classmethod
    def build(cls, settings: DatabaseSettings) -> WriteTracking:
        return cls()

    def install(self, state: AppState, app: Flask) -> None:
        _track_flushes(state.sessionmaker)
        _track_statements(state.engine)
        for engine in state.serving:
            event.listen(engine, "checkin", _unwatch_connection)


def _track_flushes(maker: sessionmaker[Any]) -> None:
    @event.listens_for(maker, "before_flush")
    def _flush_starts(session: Session, flush_context: Any, instances: Any) -> None:
        state_of(session).flushing = True

    @event.listens_for(maker, "after_flush")
    def _remember_flushed(session: Session, flush_context: Any) -> None:
        state_of(session).uncommitted.extend(_pending(session))

    @event.listens_for(maker, "after_flush_postexec")
    def _flush_ends(session: Session, flush_context: Any) -> None:
        state_of(session).flushing = False

    @event.listens_for(maker, "after_begin")
    def _watch_connection(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
        connection.info[CONNECTION_KEY] = state_of(session)

    @event.listens_for(maker, "after_commit")
    def _committed(session: Session) -> None:
        state = state_of(session)
        if state.uncommitted:
            state.committed_writes = True
            state.uncommitted.clear()

    @event.listens_for(maker, "after_soft_rollback")
    def _rolled_back(session: Session, previous_transaction: SessionTransaction) -> None:
        if not previous_transaction.nested:
            state = state_of(session)
            state.uncommitted.clear()
            state.flushing = False


def _track_statements(engine: Engine) -> None:
    """See writes that bypass the ORM, on the connection a session is using."""

    @event.listens_for(engine, "before_cursor_execute")
    def _remember_statement(
        connection: Connection, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        state: SessionState | None = connection.info.get(CONNECTION_KEY)
        if state is not None and not state.flushing:
            kind = classify(statement)
            if kind.writes:
                state.uncommitted.append(f"{kind.verb} statement")


def _unwatch_connection(dbapi_connection: Any, record: Any) -> None:
    record.info.pop(CONNECTION_KEY, None)
