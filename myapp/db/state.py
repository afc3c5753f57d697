"""What ``init_app`` built for one app (``AppState``): typed, and shared by the
lifecycle, the features and the ``db`` methods that live with them. What one session
knows is ``session.SessionState``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import scoped_session, sessionmaker

from .config import DatabaseSettings
from .replicas import Replica
from .session import AppSession

if TYPE_CHECKING:
    from flask import Flask

F = TypeVar("F")

# The one key the layer keeps in a pooled connection's ``info`` while a session uses it.
CONNECTION_KEY = "myapp.session_state"


Opener = Callable[[AppSession, bool], None]  # (session, reading): a context's session is born


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
    replicas: list[Replica] = field(default_factory=list)  # the same replicas, with their health
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
