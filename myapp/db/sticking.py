"""Read-your-writes across requests: the primary's WAL position after a user's last
commit, kept in their signed session cookie (so it also survives a flashed redirect).

While a replica has not replayed that position, the user's reads go to one that has, or
to the primary; other users are not affected. The position is dropped once no replica
could serve a read that misses it (``ReplicaSet.replayed_everywhere``). Only used when
replicas are configured: without them the cookie never carries it.
"""

from __future__ import annotations

import logging
import time

from flask import session as cookie
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response

from .errors import describe_error
from .replicas import PRIMARY_LSN_SQL, ReplicaSet
from .session import state_of

log = logging.getLogger("myapp.db.replicas")

KEY = "_db_lsn"  # [WAL position as an integer, Unix time of the commit]

# A position that no replica reaches: the commit's position could not be read (the
# primary went away just after it), so the user reads from the primary until the write
# is old enough for every healthy replica to have it.
UNKNOWN_POSITION = 2**63 - 1


def required_lsn() -> int | None:
    """The WAL position this user's reads must see, or None."""
    kept = cookie.get(KEY)
    return int(kept[0]) if kept else None


def remember(lsn: int | None) -> None:
    """Keep the position of the commit this request made (the later of two)."""
    position = UNKNOWN_POSITION if lsn is None else lsn
    kept = cookie.get(KEY)
    if kept and int(kept[0]) >= position:
        return
    cookie[KEY] = [position, int(time.time())]


def forget_if_replayed(replicas: ReplicaSet) -> None:
    """Drop the position once no replica can serve a read that misses it."""
    kept = cookie.get(KEY)
    if kept and replicas.replayed_everywhere(int(kept[0]), time.time() - int(kept[1])):
        del cookie[KEY]


def after_request(
    response: Response, session: Session | None, replicas: ReplicaSet, primary: Engine, *, reading: bool, header: bool
) -> None:
    """Keep the position of the commit this request made, or drop one every replica has
    replayed (read-only requests); with ``header``, say where the statements went."""
    if session is not None and state_of(session).committed_writes:
        remember(primary_wal_position(session, primary))
    elif reading:
        forget_if_replayed(replicas)
    if header:
        reads = state_of(session).reads if session is not None else None
        served = reads.served if reads is not None else ["primary"] if session is not None else []
        response.headers["X-Read-From"] = ", ".join(served) or "none"


def primary_wal_position(session: Session, primary: Engine) -> int | None:
    """The primary's WAL insert position now, after the commit: one statement, on the
    session's primary connection if it holds one; None if the primary cannot say.

    The insert position, not ``pg_current_wal_lsn()``: with ``synchronous_commit = off``
    the latter can point before the commit record, and a replica would pass it early.
    """
    try:
        if session.in_transaction():
            return int(session.connection().exec_driver_sql(PRIMARY_LSN_SQL).scalar_one())
        with primary.connect() as connection:
            connection = connection.execution_options(isolation_level="AUTOCOMMIT")
            return int(connection.exec_driver_sql(PRIMARY_LSN_SQL).scalar_one())
    except SQLAlchemyError as error:
        log.warning("could not read the primary's WAL position after a commit: %s", describe_error(error))
        return None
