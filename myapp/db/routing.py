"""Which connection a session's statements run on, and when they need a transaction.

Two rules. First, the read-only fast path (PostgreSQL, ``DATABASE_READ_ONLY_AUTOCOMMIT``).
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

Second, read replicas (``DATABASE_REPLICA_URLS``, ``myapp.db.replicas``). A session the
lifecycle marked with ``read_from_replicas`` (a GET, HEAD or OPTIONS request) sends its
statements to one replica, chosen at its first statement, as long as:

- its unit of work is not transactional (the rule above), it never wrote (sticky for
  the session's life: a write's own reads and refreshes must see it), and it is not
  inside ``use_primary()``;
- a healthy replica has replayed the WAL position the user must see (their last
  commit, from the lifecycle).

Otherwise the statement goes to the primary through the fast path above. A statement
that needs a transaction is stopped on the replica engine before it is sent (a cheap
look at the SQL string, as for the fast path) and re-run on the primary; so is a read
that a replica failed (the replica is then marked down) or cancelled because of a
recovery conflict. A request thus holds at most one replica and one primary
connection. ``refusing_writes`` makes the bind of a session that must never write.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, Result, event
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction, SessionTransactionOrigin, sessionmaker

from .errors import describe_error

if TYPE_CHECKING:
    from .replicas import Replica, ReplicaSet

log = logging.getLogger("myapp.db.replicas")

READ_ONLY = "myapp_read_only"
REFUSE_WRITES = "myapp_refuse_writes"

# Keys in a pooled connection's info (it outlives a checkout: cleared at checkin) and
# in a session's info.
_AUTOCOMMIT = "myapp.autocommit_reads"
_READING_CONNECTION = "myapp.reading_connection"
_TRANSACTIONAL = "myapp.transactional"
_READS = "myapp.replica_reads"
_WROTE = "myapp.wrote"
_PRIMARY_ONLY = "myapp.primary_only"

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
        return locks(statement)
    return verb != "WITH" or bool(_DATA_MODIFYING.search(statement)) or locks(statement)


def locks(statement: str) -> bool:
    """True if the statement takes row locks (``SELECT ... FOR UPDATE/SHARE``)."""
    return bool(_LOCKING_CLAUSE.search(statement))


def _writes_or_locks(statement: str) -> bool:
    """What a replica-only session refuses to send."""
    return writes(statement) or locks(statement)


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


# -- read replicas ------------------------------------------------------------------------


class ReplicaWriteError(SQLAlchemyError):
    """A session that reads from a replica tried to write; nothing was sent."""


class _PrimaryNeeded(Exception):
    """Raised on a replica engine before a statement that needs the primary is sent."""

    def __init__(self, writes: bool) -> None:
        super().__init__("this statement needs the primary")
        self.writes = writes


def _refusal(statement: str) -> ReplicaWriteError:
    return ReplicaWriteError(
        f"a session bound to a read replica refused to send a statement that writes or locks "
        f"({statement_verb(statement)}): it only reads. Write through db.session in a unit of work "
        "(db.transaction()); nothing was sent."
    )


def watch_replica_engine(engine: Engine) -> None:
    """Stop, before they are sent, the statements a replica must not run: re-run on the
    primary for a request's session, refused for a replica-only session."""

    @event.listens_for(engine, "before_cursor_execute")
    def _only_reads(
        connection: Connection, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        if connection.get_execution_options().get(REFUSE_WRITES):
            if _writes_or_locks(statement):
                raise _refusal(statement)
        elif needs_transaction(statement):
            raise _PrimaryNeeded(writes(statement))


def refusing_writes(engine: Engine) -> Engine:
    """The bind of a session that must never write (``db.replica_session()``)."""
    bind = engine.execution_options(**{READ_ONLY: True, REFUSE_WRITES: True})
    if not engine.get_execution_options().get(_REPLICA_ENGINE):
        # A replica engine's own listener refuses; elsewhere (the primary, when no
        # replica is healthy) this derived engine gets one of its own.
        @event.listens_for(bind, "before_cursor_execute")
        def _refuse(connection: Connection, cursor: Any, statement: str, *args: Any) -> None:
            if _writes_or_locks(statement):
                raise _refusal(statement)

    return bind
_REPLICA_ENGINE = "myapp_replica_engine"


def replica_engine(engine: Engine) -> Engine:
    """Mark a replica's engine (see ``refusing_writes``) and stop what it must not run."""
    watch_replica_engine(engine)
    return engine.execution_options(**{_REPLICA_ENGINE: True})


class ReplicaReads:
    """What one session knows about its reads: the replicas, the WAL position its user
    must see, the replica it chose (once), and where its statements went."""

    __slots__ = ("replicas", "required_lsn", "replica", "chosen", "served")

    def __init__(self, replicas: ReplicaSet, required_lsn: int | None) -> None:
        self.replicas = replicas
        self.required_lsn = required_lsn
        self.replica: Replica | None = None
        self.chosen = False
        self.served: list[str] = []

    def note(self, target: str) -> None:
        if target not in self.served:
            self.served.append(target)


def read_from_replicas(session: Session, replicas: ReplicaSet, required_lsn: int | None) -> None:
    """Let this session's reads go to a replica that has replayed ``required_lsn``."""
    session.info[_READS] = ReplicaReads(replicas, required_lsn)


def reads_of(session: Session) -> ReplicaReads | None:
    return session.info.get(_READS)


def wrote(session: Session) -> bool:
    """True once the session has written (a flush or a write statement), for its life."""
    return bool(session.info.get(_WROTE))


@contextmanager
def primary_only(session: Session) -> Iterator[None]:
    """Inside the block, every statement of the session goes to the primary."""
    session.info[_PRIMARY_ONLY] = session.info.get(_PRIMARY_ONLY, 0) + 1
    try:
        yield
    finally:
        session.info[_PRIMARY_ONLY] -= 1


def refuse_flushes(session: Session) -> None:
    """Make the session's flushes fail with ReplicaWriteError (a replica-only session)."""
    session.info[REFUSE_WRITES] = True


def _replica_for(session: Session, reads: ReplicaReads) -> Replica | None:
    info = session.info
    if info.get(_TRANSACTIONAL) or info.get(_WROTE) or info.get(_PRIMARY_ONLY):
        return None
    if not reads.chosen:
        reads.chosen = True
        reads.replicas.maybe_check()
        try:
            reads.replica = reads.replicas.choose(reads.required_lsn, lambda replica: _ask_replay_lsn(session, replica))
        except DBAPIError as error:
            reads.replica = None
            if _unreachable(error):
                _mark_down(reads, error)
            else:
                raise
    return reads.replica


def _ask_replay_lsn(session: Session, replica: Replica) -> int | None:
    session.info[_READS].replica = replica  # for _mark_down, should the question fail
    return replica.ask_replay_lsn(session.connection(bind_arguments={"bind": replica.engine}))


def _mark_down(reads: ReplicaReads, error: BaseException) -> None:
    if reads.replica is not None:
        reads.replicas.mark_down(reads.replica, describe_error(error))
    reads.replica = None


def _unreachable(error: DBAPIError) -> bool:
    """The replica could not be reached: the connect failed (no statement was sent) or
    the connection died under a statement. Not a statement timeout, not a conflict."""
    return error.connection_invalidated or error.statement is None


def _recovery_conflict(error: DBAPIError) -> bool:
    """A query a standby cancelled (or a connection it ended) to replay WAL that removes
    rows the query might still need: SQLSTATE 40001 "... conflict with recovery"."""
    return getattr(error.orig, "sqlstate", None) in ("40001", "40P01") and "conflict with recovery" in str(error.orig)


def install_replica_routing(maker: sessionmaker[Any]) -> None:
    """Send the reads of ``read_from_replicas`` sessions to a replica, the rest to the primary."""

    @event.listens_for(maker, "do_orm_execute")
    def _read_from_a_replica(state: ORMExecuteState) -> Result[Any] | None:
        session = state.session
        reads: ReplicaReads | None = session.info.get(_READS)
        if reads is None:
            return None
        if state.is_insert or state.is_update or state.is_delete:
            session.info[_WROTE] = True
        replica = _replica_for(session, reads)
        if replica is None:
            reads.note("primary")
            return None
        try:
            result = state.invoke_statement(bind_arguments={"bind": replica.engine})
        except _PrimaryNeeded as needed:
            require_transaction(session)
            if needed.writes:
                session.info[_WROTE] = True
        except DBAPIError as error:
            if _recovery_conflict(error):
                log.info("%s cancelled a read (conflict with recovery); read again from the primary", replica.name)
                reads.replica = None
            elif getattr(error.orig, "sqlstate", None) == "25006":  # it writes after all: a function, say
                require_transaction(session)
                session.info[_WROTE] = True
            elif _unreachable(error):
                log.warning("%s failed a read (%s); read again from the primary", replica.name, describe_error(error))
                _mark_down(reads, error)
            else:
                raise
        else:
            reads.note(replica.name)
            return result
        reads.note("primary")
        return None

    @event.listens_for(maker, "after_flush")
    def _wrote(session: Session, flush_context: Any) -> None:
        session.info[_WROTE] = True


def install_write_refusal(maker: sessionmaker[Any]) -> None:
    """Fail the flushes of the sessions marked with ``refuse_flushes``."""

    @event.listens_for(maker, "before_flush")
    def _refuse_flush(session: Session, flush_context: Any, instances: Any) -> None:
        if session.info.get(REFUSE_WRITES) and (session.new or session.dirty or session.deleted):
            raise ReplicaWriteError(
                "a session bound to a read replica cannot flush changes: it only reads. Write through "
                "db.session in a unit of work (db.transaction()); nothing was sent."
            )
