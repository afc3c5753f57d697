"""How a session lives and dies, in one place; read it top to bottom.

1. ``init_app`` reads the database settings once, builds the engines and the
   sessionmaker, and installs the features those settings switch on (``features``).
2. The first use of ``db.session`` in an app context makes that context's session,
   bound for reading only if the request promises not to write, and runs each
   feature's opener (the bulkhead's slot, the breaker, the replicas).
3. Work ends with an explicit commit (``db.transaction()``), or, with
   ``DATABASE_COMMIT_ON_SUCCESS``, one made for a request that wrote and succeeded.
4. ``teardown_appcontext`` removes the session, whether the view returned or raised:
   the uncommitted is rolled back (and reported), the connection and the slot go back.
   If that teardown never runs, the session is closed when its context is freed.

The ``db`` methods of one feature live with it: ``units``, ``replication``,
``breaker`` (health), ``galera``, ``testing``.
"""

from __future__ import annotations

import logging
import threading
import weakref

import click
from flask import Flask, current_app, g, has_app_context, has_request_context, request
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import scoped_session, sessionmaker

from .base import Base
from .breaker import HealthMethods
from .config import DatabaseSettings
from .engines import READ_ONLY, make_engine, register_process_hooks
from .errors import describe_error
from .features import install_features
from .galera import GaleraMethods
from .replication import READ_ONLY_METHODS, ReplicaMethods
from .session import AppSession, state_of
from .state import AppState
from .testing import TestingMethods
from .tracking import describe_uncommitted, report_lost
from .units import UnitsOfWork, commit_before_response, current_app_or_raise, install_commit_hooks

log = logging.getLogger("myapp.db")

EXTENSION_KEY = "myapp.database"
_SCOPE_KEY = "myapp_db_scope"  # in ``g``: the context's _Scope

_ModelBase = Base  # for annotations inside Database, whose ``Base`` attribute shadows it


class _Key:
    """One app context's key in the session registry; it also holds that session, so the
    teardown finds it without asking the registry again. A new object per context: no
    later context can find an earlier one's session (an ``id()`` can be reused)."""

    __slots__ = ("session",)

    def __init__(self) -> None:
        self.session: AppSession | None = None


class _Scope:
    """Kept in the context's ``g``, so it dies with the context; should the session still
    be registered then (the teardown never ran), its finaliser closes that session."""

    __slots__ = ("key", "finaliser", "__weakref__")

    def __init__(self, database: Database) -> None:
        self.key = _Key()
        self.finaliser = weakref.finalize(self, database._abandon, self.key)
        self.finaliser.atexit = False


class Database(UnitsOfWork, ReplicaMethods, HealthMethods, GaleraMethods, TestingMethods):
    """Engine, sessionmaker, declarative base and the app-context session registry.

    Create it once, unbound (``db = Database()``), and bind it with
    ``db.init_app(app)`` from the app factory. Views and commands use ``db.session``.
    """

    Base = Base

    def __init__(self, app: Flask | None = None) -> None:
        self._abandoning = threading.local()  # the key a finaliser is closing, in its thread
        # scoped_session calls its factory with no arguments; ours picks the current
        # app's sessionmaker, which one sessionmaker could not do for several apps.
        self.session: scoped_session[AppSession] = scoped_session(
            self._create_session, scopefunc=self._scope  # type: ignore[arg-type]
        )
        if app is not None:
            self.init_app(app)

    # -- the seed's public face ------------------------------------------------------

    def get_engine(self) -> Engine:
        """Return the current app's engine."""
        return self.app_state().engine

    def get_session(self) -> AppSession:
        """Return a new, independent Session that the caller must close."""
        return self.app_state().sessionmaker()

    @classmethod
    def get_base(cls) -> type[_ModelBase]:
        """Return the declarative base every model inherits."""
        return cls.Base

    # -- 1. what init_app builds --------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Build the app's engines and sessionmaker and register the session's lifecycle."""
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError("A Database is already registered on this app; call init_app once per app.")
        settings = DatabaseSettings.from_config(app.config, app.instance_path, debug=app.debug, testing=app.testing)
        engine = make_engine(settings)
        # A ping only reads: on SQLite it must not queue for the write lock.
        probe_engine = make_engine(settings, probe=True).execution_options(**{READ_ONLY: True})
        maker = sessionmaker(bind=engine, class_=AppSession, autoflush=False, expire_on_commit=False)
        install_commit_hooks(maker)
        state = app.extensions[EXTENSION_KEY] = AppState(
            settings, engine, probe_engine, engine.execution_options(**{READ_ONLY: True}), maker,
            current_session=self._current_session,
        )
        install_features(state, app)
        if settings.commit_on_success:
            app.after_request(commit_before_response(self._current_session, self.rollback))
        app.teardown_appcontext(self._remove_session)
        app.shell_context_processor(lambda: {"db": self, "select": select})
        register_process_hooks()

    def app_state(self, app: Flask | None = None) -> AppState:
        """What init_app built for ``app`` (default: the current app)."""
        app = app if app is not None else current_app_or_raise()
        try:
            return app.extensions[EXTENSION_KEY]  # type: ignore[no-any-return]
        except KeyError:
            raise RuntimeError("The database is not set up on this app: call db.init_app(app) in create_app.") from None

    # -- 2. a context's session is born on first use ----------------------------------

    def _scope(self) -> _Key:
        """The registry's key for the current app context (the scoped_session's scopefunc)."""
        key: _Key | None = getattr(self._abandoning, "key", None)
        if key is not None:
            return key
        if not has_app_context():
            current_app_or_raise()  # the error that says what to do
        scope = g.get(_SCOPE_KEY)
        if scope is None:
            scope = _Scope(self)
            setattr(g, _SCOPE_KEY, scope)
        return scope.key  # type: ignore[no-any-return]

    def _create_session(self) -> AppSession:
        """The context's first use of the database: a session bound for reading only if
        the request promises not to write, then each feature's opener, in order."""
        state = self.app_state()
        reading = has_request_context() and request.method in READ_ONLY_METHODS and not state.isolated
        session = state.sessionmaker(bind=state.read_only_engine) if reading else state.sessionmaker()
        try:
            session.state.origin = _describe_origin()
            for open_session in state.openers:
                open_session(session, reading)
        except BaseException:
            self._close(session, registered=False)
            raise
        key = self._scope()
        previous, key.session = key.session, session
        if previous is not None:  # removed by hand (db.session.remove()) earlier in this context
            _release_slot(previous)
        return session

    def _current_session(self) -> AppSession | None:
        """The current context's session, without making one."""
        scope = g.get(_SCOPE_KEY) if has_app_context() else None
        return scope.key.session if scope is not None else None

    # -- 3. work ends with a commit (``units``) -----------------------------------------

    def rollback(self) -> None:
        """Roll back the current context's session, if it has one (error pages use it)."""
        session = self._current_session()
        if session is not None:
            try:
                session.rollback()
            except SQLAlchemyError as error:  # the connection may be the thing that failed
                log.warning("rollback failed: %s", describe_error(error))

    # -- 4. it dies at teardown ---------------------------------------------------------

    def _remove_session(self, exc: BaseException | None) -> None:
        session = self._current_session()
        if session is None:
            return
        lost: list[str] = []
        try:
            # After an unhandled error the rollback is the point; otherwise it loses data.
            if exc is None:
                lost = describe_uncommitted(session)
        finally:
            self._close(session)
            scope = g.pop(_SCOPE_KEY, None)
            if scope is not None:
                scope.finaliser.detach()
                scope.key.session = None
        if lost:
            report_lost(session, lost, raise_it=current_app.testing)

    def _close(self, session: AppSession, registered: bool = True) -> None:
        """Roll back, return the connection, forget the session; give its bulkhead slot
        back last, since the ROLLBACK waits on the database too."""
        try:
            session.close()
        except SQLAlchemyError as error:
            # The connection died under the session (a restart, a server-side kill): the
            # ROLLBACK cannot reach a server that rolls back on its own anyway. The pool
            # has discarded the connection; the response already built must stand.
            log.warning("closing the session failed: %s", describe_error(error))
        finally:
            if registered:
                self.session.registry.clear()
            _release_slot(session)

    def _abandon(self, key: _Key) -> None:
        """A context died with its session still registered: close that session."""
        self._abandoning.key = key
        try:
            session, key.session = key.session, None
            if session is not None:
                log.warning("%s outlived its app context (its teardown did not run); closed it", session.state.origin)
                self._close(session)
        except Exception:  # a finaliser has no caller to tell
            log.exception("closing an abandoned session failed")
        finally:
            self._abandoning.key = None


def _release_slot(session: AppSession) -> None:
    state = state_of(session)
    release, state.release_slot = state.release_slot, None
    if release is not None:
        release()


def _describe_origin() -> str:
    if has_request_context():
        return f"request {request.method} {request.endpoint or request.path}"
    command = click.get_current_context(silent=True)
    if command is not None:
        return f"command {command.command_path}"
    return "a session"


db = Database()
