"""The Session class of every app, and what one session knows about itself.

``SessionState`` is typed: every feature reads and writes its session's fields by
name, instead of keys in ``session.info`` (SQLAlchemy leaves ``info`` to the
application's own use).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.orm import Session, SessionTransaction

# In a pooled connection's info while it reads in autocommit (``autocommit``; cleared at checkin).
AUTOCOMMIT_KEY = "myapp.autocommit_reads"


@dataclass(eq=False)
class SessionState:
    """What one session knows about itself, for its whole life."""

    origin: str = "a session"  # "request GET posts.detail", "command db seed": for messages
    release_slot: Callable[[], None] | None = None  # gives its bulkhead slot back when the session ends
    # Units of work (``units``): db.transaction() nesting, after-commit callbacks.
    depth: int = 0
    on_commit: list[tuple[SessionTransaction, Callable[[], Any]]] = field(default_factory=list)
    # Writes (``tracking``): what was sent and not yet committed, and whether a write
    # was ever committed. Together they are the one answer to "did this session write".
    uncommitted: list[str] = field(default_factory=list)
    committed_writes: bool = False
    flushing: bool = False  # statements inside a flush are named by its objects instead
    # Routing (``autocommit``, ``routing``): the unit of work asked for a transaction;
    # the connection reading in autocommit until it does; statements pinned to the primary.
    transactional: bool = False
    reading_connection: Connection | None = None
    primary_only: int = 0
    refuse_writes: bool = False  # a replica-only session (db.replica_session())
    reads: Any = None  # routing.ReplicaReads when this session may read from a replica
    primary_unreachable: bool = False  # born while the primary's breaker was open (read-only mode)

    @property
    def wrote(self) -> bool:
        """True once the session has sent a write, committed or not."""
        return self.committed_writes or bool(self.uncommitted)


def state_of(session: Session) -> SessionState:
    """The state of one of the layer's sessions (an ``AppSession``)."""
    return session.state  # type: ignore[attr-defined,no-any-return]


class AppSession(Session):
    """A Session that carries its typed ``state``, and whose units of work stay on one
    connection (see ``autocommit``).

    Asking for the connection with execution options (an isolation level, say) is
    asking for a transaction: every later statement of the unit runs inside it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state = SessionState()

    def connection(
        self, bind_arguments: Any = None, execution_options: Any = None
    ) -> Connection:
        if execution_options:
            require_transaction(self)
        return super().connection(bind_arguments=bind_arguments, execution_options=execution_options)


def require_transaction(session: Session) -> None:
    """Run every later statement of the session's current unit of work in a transaction."""
    state = state_of(session)
    state.transactional = True
    connection, state.reading_connection = state.reading_connection, None
    if connection is not None and not connection.closed:
        leave_autocommit(connection)


def leave_autocommit(connection: Connection) -> None:
    """From the next statement on, this connection runs in a transaction."""
    if connection.info.pop(AUTOCOMMIT_KEY, False):
        # psycopg's documented switch; it sends BEGIN before the next statement.
        connection.connection.dbapi_connection.autocommit = False  # type: ignore[union-attr]
