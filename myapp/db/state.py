"""Typed state: what one session knows (``SessionState``) and what ``init_app`` built
for one app (``AppState``).

Every feature reads and writes its session's fields here, by name, instead of keys
in ``session.info`` (SQLAlchemy leaves ``info`` to the application's own use).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from .config import DatabaseSettings

if TYPE_CHECKING:
    from flask import Flask
    from sqlalchemy.orm import scoped_session

    from .session import AppSession

F = TypeVar("F")

# The one key the layer keeps in a pooled connection's ``info`` while a session uses it.
CONNECTION_KEY = "myapp.session_state"


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

    @property
    def wrote(self) -> bool:
        """True once the session has sent a write, committed or not."""
        return self.committed_writes or bool(self.uncommitted)


def state_of(session: Session) -> SessionState:
    """The state of one of the layer's sessions (an ``AppSession``)."""
    return session.state  # type: ignore[attr-defined,no-any-return]


Opener = Callable[["AppSession", bool], None]  # (session, reading): a context's session is born


@dataclass(eq=False)
class AppState:
    """What ``init_app`` built for one app: its settings, engines, sessionmaker, the
    features switched on, and the hooks those features added to a session's life."""

    settings: DatabaseSettings
    engine: Engine
    probe_engine: Engine  # no pool, the ping's short connect timeout: each use proves the server accepts
    read_only_engine: Engine  # the same pool, bound for sessions whose request promises not to write
    sessionmaker: sessionmaker[AppSession]
    current_session: Callable[[], AppSession | None]  # the current app context's session, if it has one
    features: list[Any] = field(default_factory=list)
    openers: list[Opener] = field(default_factory=list)  # run in order when a context's session is born
    replica_engines: list[Engine] = field(default_factory=list)
    isolated: bool = False  # inside db.test_isolation(): one connection for everything

    @property
    def serving(self) -> list[Engine]:
        """The engines that run the app's statements: the primary's and the replicas'."""
        return [self.engine, *self.replica_engines]

    def feature(self, kind: type[F]) -> F | None:
        """The switched-on feature of this kind, or None."""
        for feature in self.features:
            if isinstance(feature, kind):
                return feature
        return None


class StateAccess:
    """What the ``db`` methods that live with their features need from ``Database``:
    the context's session registry and the current app's state."""

    session: scoped_session[AppSession]

    def app_state(self, app: Flask | None = None) -> AppState:
        raise NotImplementedError
