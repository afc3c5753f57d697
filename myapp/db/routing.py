"""Which connection a session's statements run on, when read replicas are configured.

A session made for a request that promises not to write (GET, HEAD, OPTIONS) reads
from a healthy replica that has replayed the WAL position its user must see (their
last commit, from ``sticking``). Everything else goes to the primary: every statement
of a unit of work that asked for a transaction (``autocommit.require_transaction``),
every statement once the session wrote, and the statements inside
``db.use_primary()``.

A statement that needs a transaction is stopped on the replica engine before it is
sent (a cheap, cached look at the SQL string) and re-run on the primary; so is a read
that a replica failed (the replica is then marked down) or cancelled because of a
recovery conflict. A request thus holds at most one replica and one primary
connection. ``refusing_writes`` makes the bind of a session that must never write.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, Result, event
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

from .engines import READ_ONLY
from .errors import DatabaseUnavailable, describe_error
from .metrics import count_read
from .replicas import Replica, ReplicaSet
from .session import require_transaction, state_of
from .statements import classify

log = logging.getLogger("myapp.db.replicas")

REFUSE_WRITES = "myapp_refuse_writes"
_REPLICA_ENGINE = "myapp_replica_engine"


class ReplicaWriteError(SQLAlchemyError):
    """A session that reads from a replica tried to write; nothing was sent."""


class _PrimaryNeeded(Exception):
    """Raised on a replica engine before a statement that needs the primary is sent."""


def _refusal(statement: str) -> ReplicaWriteError:
    return ReplicaWriteError(
        f"a session bound to a read replica refused to send a statement that writes or locks "
        f"({classify(statement).verb}): it only reads. Write through db.session in a unit of work "
        "(db.transaction()); nothing was sent."
    )


def _writes_or_locks(statement: str) -> bool:
    """What a replica-only session refuses to send."""
    kind = classify(statement)
    return kind.writes or kind.locks


def replica_engine(engine: Engine) -> Engine:
    """Stop, before they are sent, the statements a replica must not run: re-run on the
    primary for a request's session, refused for a replica-only session."""

    @event.listens_for(engine, "before_cursor_execute")
    def _only_reads(
        connection: Connection, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        if connection.get_execution_options().get(REFUSE_WRITES):
            if _writes_or_locks(statement):
                raise _refusal(statement)
        elif classify(statement).needs_transaction:
            raise _PrimaryNeeded()

    return engine.execution_options(**{_REPLICA_ENGINE: True})


_refusing_binds: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()


def refusing_writes(engine: Engine) -> Engine:
    """The bind of a session that must never write (``db.replica_session()``), made once
    per engine. A replica engine's own listener refuses; elsewhere (the primary, when no
    replica is healthy) the derived engine gets one of its own."""
    bind = _refusing_binds.get(engine)
    if bind is None:
        bind = _refusing_binds[engine] = engine.execution_options(**{READ_ONLY: True, REFUSE_WRITES: True})
        if not engine.get_execution_options().get(_REPLICA_ENGINE):
            event.listen(bind, "before_cursor_execute", _refuse_statement)
    return bind


def _refuse_statement(connection: Connection, cursor: Any, statement: str, *args: Any) -> None:
    if _writes_or_locks(statement):
        raise _refusal(statement)


def refuse_flushes(maker: sessionmaker[Any], session: Session) -> None:
    """Make the session's flushes fail with ReplicaWriteError (a replica-only session)."""
    state_of(session).refuse_writes = True
    if not event.contains(maker, "before_flush", _refuse_flush):
        event.listen(maker, "before_flush", _refuse_flush)


def _refuse_flush(session: Session, flush_context: Any, instances: Any) -> None:
    if state_of(session).refuse_writes and (session.new or session.dirty or session.deleted):
        raise ReplicaWriteError(
            "a session bound to a read replica cannot flush changes: it only reads. Write through "
            "db.session in a unit of work (db.transaction()); nothing was sent."
        )


class ReplicaReads:
    """What one session knows about its reads: the replicas, the WAL position its user
    must see, the replica it chose (once), and where its statements went; in read-only
    mode (the primary unreachable), whether the replica lacks that user's last write."""

    __slots__ = ("replicas", "required_lsn", "replica", "chosen", "served", "read_only", "may_go_read_only",
                 "behind_the_user", "failed")

    def __init__(self, replicas: ReplicaSet, required_lsn: int | None, *, read_only: bool = False,
                 may_go_read_only: bool = False) -> None:
        self.replicas = replicas
        self.required_lsn = required_lsn
        self.replica: Replica | None = None
        self.chosen = False
        self.served: list[str] = []
        self.read_only = read_only  # every read from a replica: the primary is unreachable
        self.may_go_read_only = may_go_read_only  # DATABASE_READ_ONLY_MODE
        self.behind_the_user = False  # the replica has not replayed the user's last commit
        # Replicas that failed a read of this session: its connection to them is dead
        # inside its transaction, and reading there again would fail (PendingRollbackError).
        self.failed: set[str] = set()

    def note(self, target: str) -> None:
        if target not in self.served:
            self.served.append(target)


@contextmanager
def primary_only(session: Session) -> Iterator[None]:
    """Inside the block, every statement of the session goes to the primary."""
    state = state_of(session)
    state.primary_only += 1
    try:
        yield
    finally:
        state.primary_only -= 1


def _replica_for(session: Session, reads: ReplicaReads) -> Replica | None:
    if reads.read_only:
        return _read_only_replica(reads)
    state = state_of(session)
    if state.transactional or state.wrote or state.primary_only:
        return None
    if not reads.chosen:
        reads.chosen = True
        reads.replicas.maybe_check()
        try:
            reads.replica = reads.replicas.choose(reads.required_lsn, lambda replica: _ask_replay_lsn(session, replica))
        except DBAPIError as error:
            if not _unreachable(error):
                reads.replica = None
                raise
            _mark_down(reads, error)
    return reads.replica


def _read_only_replica(reads: ReplicaReads) -> Replica:
    """The primary is unreachable: any healthy replica, whatever the user last wrote
    (the page says when it lacks that write), else one just promoted; none, a 503."""
    if reads.replica is None:
        reads.chosen = True
        reads.replicas.maybe_check()
        # Never one that failed this session: its connection there died in its transaction.
        reads.replica = (reads.replicas.choose(None, lambda replica: None, excluding=reads.failed)
                         or reads.replicas.promoted(excluding=reads.failed))
        if reads.replica is None:
            raise DatabaseUnavailable("unreachable", "the primary is unreachable and no replica is healthy", 1)
        reads.behind_the_user = reads.required_lsn is not None and reads.replica.replay_lsn < reads.required_lsn
    return reads.replica


def _why_primary(session: Session, reads: ReplicaReads) -> str:
    """Why a read of a read-only request went to the primary (the reads metric's reason)."""
    state = state_of(session)
    if state.transactional or state.wrote:
        return "write_unit"
    if state.primary_only:
        return "use_primary"
    if reads.required_lsn is not None and any(replica.state == "healthy" for replica in reads.replicas.replicas):
        return "sticky"
    return "no_healthy_replica"


def _ask_replay_lsn(session: Session, replica: Replica) -> int | None:
    state_of(session).reads.replica = replica  # for _mark_down, should the question fail
    return replica.ask_replay_lsn(session.connection(bind_arguments={"bind": replica.engine}))


def _mark_down(reads: ReplicaReads, error: BaseException) -> None:
    if reads.replica is not None:
        reads.failed.add(reads.replica.name)
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


def route_reads(maker: sessionmaker[Any]) -> None:
    """Send the reads of sessions that may read from a replica there, the rest to the primary."""
    event.listen(maker, "do_orm_execute", _read_from_a_replica)


def _read_from_a_replica(orm_state: ORMExecuteState) -> Result[Any] | None:
    session = orm_state.session
    reads: ReplicaReads | None = state_of(session).reads
    if reads is None:
        return None
    if orm_state.is_insert or orm_state.is_update or orm_state.is_delete:
        require_transaction(session)
    replica = _replica_for(session, reads)
    if replica is not None:
        try:
            result = orm_state.invoke_statement(bind_arguments={"bind": replica.engine})
        except _PrimaryNeeded:
            require_transaction(session)
        except DBAPIError as error:
            _replica_failed(session, reads, replica, error)
        else:
            reads.note(replica.name)
            count_read(replica.label, "replica")
            return result
        count_read("primary", "replica_failed" if reads.replica is None else "write_unit")
    else:
        count_read("primary", _why_primary(session, reads))
    state = state_of(session)
    if not (reads.may_go_read_only and orm_state.is_select) or state.wrote or state.transactional:
        reads.note("primary")
        return None
    return _on_the_primary_or_read_only(orm_state, reads)


def _on_the_primary_or_read_only(orm_state: ORMExecuteState, reads: ReplicaReads) -> Result[Any]:
    """A read of a read-only request sent to the primary: should the primary be
    unreachable (the connect refused or timed out, the connection lost, or every slot of
    its share in the bulkhead stuck on it), the session goes read-only and reads from a
    replica instead."""
    try:
        result = orm_state.invoke_statement()
    except DBAPIError as error:
        if not _unreachable(error):
            raise
        log.warning("the primary is unreachable (%s): this request reads from a replica", describe_error(error))
    except DatabaseUnavailable as error:
        if error.stuck_on != "primary":
            raise
        log.warning("every slot for the primary is stuck on it (%s): this request reads from a replica", error)
    else:
        reads.note("primary")
        return result
    reads.read_only = True
    replica = _read_only_replica(reads)
    reads.note(replica.name)
    count_read(replica.label, "replica")
    return orm_state.invoke_statement(bind_arguments={"bind": replica.engine})


def _replica_failed(session: Session, reads: ReplicaReads, replica: Replica, error: DBAPIError) -> None:
    """Decide what a replica's failed read means; the read then runs on the primary."""
    if _recovery_conflict(error):
        log.info("%s cancelled a read (conflict with recovery); read again from the primary", replica.name)
        reads.replica = None
    elif getattr(error.orig, "sqlstate", None) == "25006":  # it writes after all: a function, say
        require_transaction(session)
        state_of(session).uncommitted.append(f"{classify(str(error.statement)).verb} statement")
    elif _unreachable(error):
        log.warning("%s failed a read (%s); read again from the primary", replica.name, describe_error(error))
        _mark_down(reads, error)
    else:
        raise error
