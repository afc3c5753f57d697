"""What a session wrote and has not committed: the evidence for lost-write detection.

ORM changes are named by their objects (``new User``, ``changed Post[3]``); writes that
bypass the ORM (``text()``, Core ``insert``/``update``, ``session.connection()``) are
seen where every statement passes, on the engine, and named by their verb.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, event, inspect
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from .routing import statement_verb, writes

_FLUSHED = "flushed"
_FLUSHING = "myapp.flushing"
_COMMITTING_WRITES = "myapp.committing_writes"
_COMMITTED_WRITES = "myapp.committed_writes"
# In a pooled connection's info while a session uses it: that session's info.
_SESSION_INFO = "myapp.session_info"


class LostWriteError(RuntimeError):
    """A session ended with changes nobody committed (raised in testing, logged otherwise)."""


def has_writes(session: Session) -> bool:
    """True if the session has changes to flush or writes sent but not yet committed."""
    return bool(session.new or session.deleted or session.info.get(_FLUSHED)) or any(
        session.is_modified(obj) for obj in session.dirty
    )


def committed_writes(session: Session) -> bool:
    """True once the session has committed a write (``install_commit_tracking``)."""
    return bool(session.info.get(_COMMITTED_WRITES))


def describe_uncommitted(session: Session) -> list[str]:
    """Name what a session would lose, without its (possibly private) contents."""
    names = [f"new {type(obj).__name__}" for obj in session.new]
    names += [f"changed {_identity(obj)}" for obj in session.dirty if session.is_modified(obj)]
    names += [f"deleted {_identity(obj)}" for obj in session.deleted]
    names += [f"flushed {name}" for name in session.info.get(_FLUSHED, ())]
    return names


def _identity(obj: object) -> str:
    key = inspect(obj).identity
    return f"{type(obj).__name__}{list(key) if key else ''}"


def install_write_tracking(maker: sessionmaker[Any]) -> None:
    """Record every write of the maker's sessions until their transaction ends."""

    @event.listens_for(maker, "before_flush")
    def _flush_starts(session: Session, flush_context: Any, instances: Any) -> None:
        session.info[_FLUSHING] = True

    @event.listens_for(maker, "after_flush")
    def _remember_flushed(session: Session, flush_context: Any) -> None:
        flushed = session.info.setdefault(_FLUSHED, [])
        flushed.extend(f"new {type(obj).__name__}" for obj in session.new)
        flushed.extend(f"changed {_identity(obj)}" for obj in session.dirty if session.is_modified(obj))
        flushed.extend(f"deleted {_identity(obj)}" for obj in session.deleted)

    @event.listens_for(maker, "after_flush_postexec")
    def _flush_ends(session: Session, flush_context: Any) -> None:
        session.info.pop(_FLUSHING, None)

    @event.listens_for(maker, "after_begin")
    def _watch_connection(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
        connection.info[_SESSION_INFO] = session.info

    @event.listens_for(maker, "after_commit")
    def _committed(session: Session) -> None:
        session.info.pop(_FLUSHED, None)

    @event.listens_for(maker, "after_soft_rollback")
    def _rolled_back(session: Session, previous_transaction: SessionTransaction) -> None:
        if not previous_transaction.nested:
            session.info.pop(_FLUSHED, None)
            session.info.pop(_FLUSHING, None)


def install_commit_tracking(maker: sessionmaker[Any]) -> None:
    """Remember that a session committed a write (read-your-writes needs to know)."""

    @event.listens_for(maker, "before_commit")
    def _committing(session: Session) -> None:
        # Before the commit's own flush: what it will write is still pending here.
        if has_writes(session):
            session.info[_COMMITTING_WRITES] = True

    @event.listens_for(maker, "after_commit")
    def _committed(session: Session) -> None:
        if session.info.pop(_COMMITTING_WRITES, False):
            session.info[_COMMITTED_WRITES] = True

    @event.listens_for(maker, "after_soft_rollback")
    def _rolled_back(session: Session, previous_transaction: SessionTransaction) -> None:
        if not previous_transaction.nested:
            session.info.pop(_COMMITTING_WRITES, None)


def install_statement_tracking(engine: Engine) -> None:
    """See writes that bypass the ORM, on the connection a session is using."""

    @event.listens_for(engine, "before_cursor_execute")
    def _remember_statement(
        connection: Connection, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        info = connection.info.get(_SESSION_INFO)
        if info is not None and _FLUSHING not in info and writes(statement):
            info.setdefault(_FLUSHED, []).append(f"{statement_verb(statement)} statement")

    @event.listens_for(engine, "checkin")
    def _unwatch_connection(dbapi_connection: Any, record: Any) -> None:
        record.info.pop(_SESSION_INFO, None)
