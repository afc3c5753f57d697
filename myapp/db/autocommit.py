"""The read-only fast path (PostgreSQL, ``DATABASE_READ_ONLY_AUTOCOMMIT``).

A session made for a request that promises not to write (GET, HEAD, OPTIONS) is bound
with the execution option ``READ_ONLY``, and its connection reads in autocommit: no
BEGIN before the first SELECT and no ROLLBACK when it goes back to the pool, two round
trips saved. The *same* connection leaves autocommit, and so starts a real transaction,
as soon as the unit of work needs one:

- a statement that writes or locks (INSERT, UPDATE, DELETE, DDL, SAVEPOINT, ...,
  ``SELECT ... FOR UPDATE/SHARE``), whether it comes from a flush, ``text()`` or Core;
- an explicit unit of work: ``db.transaction()``, ``session.begin()``, or asking for
  the connection with execution options (an isolation level, say).

From then on every statement of the unit, the reads before it included, runs in that
one transaction. ``require_transaction`` is how the rest of the layer asks for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.orm import Session, SessionTransaction, SessionTransactionOrigin, sessionmaker

from .engines import READ_ONLY
from .session import AUTOCOMMIT_KEY as _AUTOCOMMIT
from .session import leave_autocommit, require_transaction, state_of
from .state import AppState
from .statements import classify

if TYPE_CHECKING:
    from flask import Flask

    from .config import DatabaseSettings

class ReadOnlyAutocommit:
    """The feature: reads in autocommit until the unit of work needs a transaction."""

    @classmethod
    def build(cls, settings: DatabaseSettings) -> ReadOnlyAutocommit | None:
        return cls() if settings.read_only_autocommit else None

    def install(self, state: AppState, app: Flask) -> None:
        _read_in_autocommit(state.engine)
        track_units(state.sessionmaker)


def _read_in_autocommit(engine: Engine) -> None:
    """Let ``READ_ONLY`` connections read in autocommit until they need a transaction."""

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        if connection.get_execution_options().get(READ_ONLY):
            connection.connection.dbapi_connection.autocommit = True  # type: ignore[union-attr]
            connection.info[_AUTOCOMMIT] = True

    @event.listens_for(engine, "before_cursor_execute")
    def _begin_before_writing(
        connection: Connection, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        # psycopg decides at execute time whether to send BEGIN first: switching here,
        # before the cursor runs, puts this statement inside the new transaction.
        if _AUTOCOMMIT in connection.info and classify(statement).needs_transaction:
            leave_autocommit(connection)

    @event.listens_for(engine, "checkin")
    def _restore(dbapi_connection: Any, record: Any) -> None:
        if record.info.pop(_AUTOCOMMIT, False) and dbapi_connection is not None:
            try:
                dbapi_connection.autocommit = False
            except Exception as error:  # never hand out a connection stuck in autocommit
                record.invalidate(error)


def track_units(maker: sessionmaker[Any]) -> None:
    """Keep each unit of work that asked for a transaction on one transactional
    connection, and forget the request when the unit ends (also used by the replicas,
    which read from the primary inside such a unit). Installed once per sessionmaker."""
    if event.contains(maker, "after_transaction_end", _unit_ended):
        return
    event.listen(maker, "after_transaction_create", _explicit_begin)
    event.listen(maker, "after_begin", _note_connection)
    event.listen(maker, "after_transaction_end", _unit_ended)


def _explicit_begin(session: Session, transaction: SessionTransaction) -> None:
    if transaction.origin is not SessionTransactionOrigin.AUTOBEGIN:
        require_transaction(session)


def _note_connection(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    if _AUTOCOMMIT not in connection.info:
        return
    state = state_of(session)
    if state.transactional:
        leave_autocommit(connection)
    else:
        state.reading_connection = connection


def _unit_ended(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        state = state_of(session)
        state.transactional = False
        state.reading_connection = None
