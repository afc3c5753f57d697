"""Which connection a session's statements run on, and when they need a transaction.

Today one rule, the read-only fast path (PostgreSQL, ``DATABASE_READ_ONLY_AUTOCOMMIT``).
A session made for a request that promises not to write (GET, HEAD, OPTIONS) is bound
with the execution option ``READ_ONLY``, and its connection reads in autocommit: no
BEGIN before the first SELECT and no ROLLBACK when it goes back to the pool, two round
trips saved. The *same* connection leaves autocommit, and so starts a real transaction,
as soon as the unit of work needs one:

- a statement that writes or locks (INSERT, UPDATE, DELETE, DDL, SAVEPOINT, ...,
  ``SELECT ... FOR UPDATE/SHARE``), whether it comes from a flush, ``text()`` or Core;
- ``db.transaction()``, an explicit ``session.begin()`` or ``begin_nested()``, or
  ``session.connection(execution_options=...)``: from then on, until that transaction
  ends, every statement of the session is inside it.

A session never holds more than one connection, so the pool sizing rule (threads <=
pool size) holds. Leaving autocommit is psycopg's ``autocommit`` attribute, a
client-side switch with no round trip while the connection is idle. Nothing here
imports Flask: the request's promise arrives as the bind's execution option.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.orm import Session, SessionTransaction, SessionTransactionOrigin, sessionmaker

READ_ONLY = "myapp_read_only"

# Keys in a pooled connection's info (it outlives a checkout: cleared at checkin) and
# in a session's info.
_AUTOCOMMIT = "myapp.autocommit_reads"
_READING_CONNECTION = "myapp.reading_connection"
_TRANSACTIONAL = "myapp.transactional"

# Statements that read and lock nothing may run outside a transaction.
_READ_VERBS = frozenset({"SELECT", "SHOW", "EXPLAIN", "VALUES", "TABLE"})
_LOCKING_CLAUSE = re.compile(r"\bFOR\s+(?:NO\s+KEY\s+)?(?:UPDATE|SHARE|KEY\s+SHARE)\b", re.IGNORECASE)
# Statements that change data or schema: what a forgotten commit would lose.
_WRITE_VERBS = frozenset({
    "INSERT", "UPDATE", "DELETE", "MERGE", "REPLACE", "UPSERT", "TRUNCATE", "COPY",
    "CREATE", "ALTER", "DROP", "GRANT", "REVOKE", "COMMENT", "CALL", "DO",
})
_DATA_MODIFYING = re.compile(r"\b(?:INSERT|UPDATE|DELETE|MERGE)\b", re.IGNORECASE)


def statement_verb(statement: str) -> str:
    """The statement's first keyword, upper-cased ("" for an empty statement)."""
    words = statement.lstrip(" \t\r\n(").split(None, 1)
    return words[0].upper() if words else ""


def writes(statement: str) -> bool:
    """True if the statement changes data or schema (a data-modifying CTE included)."""
    verb = statement_verb(statement)
    if verb == "WITH":
        return bool(_DATA_MODIFYING.search(statement))
    return verb in _WRITE_VERBS


def needs_transaction(statement: str) -> bool:
    """True unless the statement only reads and takes no row lock."""
    verb = statement_verb(statement)
    if verb in _READ_VERBS:
        return bool(_LOCKING_CLAUSE.search(statement))
    return verb != "WITH" or bool(_DATA_MODIFYING.search(statement) or _LOCKING_CLAUSE.search(statement))


def read_only(engine: Engine) -> Engine:
    """The bind of a session whose request promises not to write (same pool)."""
    return engine.execution_options(**{READ_ONLY: True})


# -- the connection side (PostgreSQL) --------------------------------------------------


def install_autocommit_reads(engine: Engine) -> None:
    """Let ``READ_ONLY`` connections read in autocommit until they need a transaction."""

    @event.listens_for(engine, "begin")
    def _read_in_autocommit(connection: Connection) -> None:
        if connection.get_execution_options().get(READ_ONLY):
            connection.connection.dbapi_connection.autocommit = True  # type: ignore[union-attr]
            connection.info[_AUTOCOMMIT] = True

    @event.listens_for(engine, "before_cursor_execute")
    def _begin_before_writing(
        connection: Connection, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        # psycopg decides at execute time whether to send BEGIN first: switching here,
        # before the cursor runs, puts this statement inside the new transaction.
        if _AUTOCOMMIT in connection.info and needs_transaction(statement):
            leave_autocommit(connection)

    @event.listens_for(engine, "checkin")
    def _restore(dbapi_connection: Any, record: Any) -> None:
        if record.info.pop(_AUTOCOMMIT, False) and dbapi_connection is not None:
            try:
                dbapi_connection.autocommit = False
            except Exception as error:  # never hand out a connection stuck in autocommit
                record.invalidate(error)


def leave_autocommit(connection: Connection) -> None:
    """From the next statement on, this connection runs in a transaction."""
    if connection.info.pop(_AUTOCOMMIT, False):
        connection.connection.dbapi_connection.autocommit = False  # type: ignore[union-attr]


# -- the session side -------------------------------------------------------------------


def require_transaction(session: Session) -> None:
    """Run every later statement of the session's current unit of work in a transaction."""
    session.info[_TRANSACTIONAL] = True
    connection = session.info.pop(_READING_CONNECTION, None)
    if connection is not None and not connection.closed:
        leave_autocommit(connection)


def install_session_routing(maker: sessionmaker[Any]) -> None:
    """Keep each unit of work that asked for a transaction on one transactional connection."""

    @event.listens_for(maker, "after_transaction_create")
    def _explicit_begin(session: Session, transaction: SessionTransaction) -> None:
        if transaction.origin is not SessionTransactionOrigin.AUTOBEGIN:
            require_transaction(session)

    @event.listens_for(maker, "after_begin")
    def _note_connection(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
        if _AUTOCOMMIT not in connection.info:
            return
        if session.info.get(_TRANSACTIONAL):
            leave_autocommit(connection)
        else:
            session.info[_READING_CONNECTION] = connection

    @event.listens_for(maker, "after_transaction_end")
    def _unit_ended(session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:
            session.info.pop(_TRANSACTIONAL, None)
            session.info.pop(_READING_CONNECTION, None)
