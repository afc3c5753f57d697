"""How a session lives and dies, in one place.

1. ``init_app`` builds one engine and one sessionmaker per Flask app from its config.
2. The first use of ``db.session`` inside an app context asks the registry for the
   session of *that* context; the registry creates it from the app's sessionmaker,
   bound for reading only when the request promises not to write (GET, HEAD, OPTIONS).
3. Work ends with an explicit commit, best through ``with db.transaction():``. With
   ``DATABASE_COMMIT_ON_SUCCESS`` on, a request that wrote and answers 2xx/3xx is
   committed before its response leaves.
4. ``teardown_appcontext`` removes the session when the context ends, for every request
   and every CLI command, whether the view returned or raised: what was not committed
   is rolled back (and reported: a forgotten commit is a bug) and the connection goes
   back to the pool. Should that teardown never run (another teardown raised before
   it), the session is closed when its context is freed, and no later context can get it.

With read replicas (``DATABASE_REPLICA_URLS``), step 2 also lets a read-only request's
session read from a replica that has replayed the user's last commit, and after a
request that committed a write the primary's WAL position goes into the user's cookie
(``sticking``).

The rest of the package holds what this file switches on: ``engines`` (one per
backend), ``routing`` (which connection a statement uses), ``replicas`` (the replica
set and its health), ``units`` (transactions, after-commit hooks, retries),
``tracking`` (what a session wrote), ``instrumentation`` (slow queries, query budget),
``errors`` (what a failure means) and ``testing``.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, cast

import click
from flask import Flask, current_app, has_app_context, has_request_context, request
from flask.ctx import AppContext
from flask.globals import app_ctx
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import scoped_session, sessionmaker
from sqlalchemy.util import ScopedRegistry
from werkzeug.wrappers import Response

from ..config import ConfigError, replica_urls
from . import breaker, galera, instrumentation, routing, sticking, testing, tracking, units
from .base import Base
from .breaker import Breaker, Bulkhead
from .engines import make_engine, register_process_hooks
from .errors import describe_error, mask_url
from .replicas import ReplicaSet
from .session import AppSession
from .tracking import LostWriteError, describe_uncommitted, has_writes

log = logging.getLogger("myapp.db")

P = ParamSpec("P")
R = TypeVar("R")

EXTENSION_KEY = "myapp.database"

_SLOT = "myapp.bulkhead_slot"  # in a session's info: gives its bulkhead slot back

# Request methods that promise not to write: their sessions are bound READ_ONLY.
READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_NO_CONTEXT_MESSAGE = (
    "db.session was used outside an application context. Inside a view or a `flask` "
    "command one is pushed for you; in a script or a thread use `with "
    "db.session_scope(app):` (or `with app.app_context():`), or take `db.get_session()` "
    "and close it yourself."
)


_ModelBase = Base  # for annotations inside Database, whose ``Base`` attribute shadows it


@dataclass
class AppState:
    """What ``init_app`` builds for one app."""

    engine: Engine
    probe_engine: Engine
    read_only_engine: Engine
    sessionmaker: sessionmaker[AppSession]
    breaker: Breaker | None = None
    bulkhead: Bulkhead | None = None
    replicas: ReplicaSet | None = None
    read_from_header: bool = False  # X-Read-From on every response
    galera: str = ""  # DATABASE_GALERA: "pinned", "spread" or "" (not a cluster)
    refusing_binds: dict[int, Engine] = field(default_factory=dict)  # by id() of the engine
    isolated: bool = False  # inside db.test_isolation(): one connection for everything


class _AppContextRegistry(ScopedRegistry[AppSession]):
    """The scoped_session registry, keyed on the app context object itself.

    Not on the thread: a nested ``with app.app_context():`` in a view or a command gets
    its own session, so its teardown cannot close the outer one. Not on ``id()`` of the
    context either: ids are reused once a context is freed, and a session its teardown
    never removed would pass to a later context. The context is held weakly; when it is
    freed with its session still registered, a finaliser closes that session, so the
    connection goes back to the pool whatever happened at teardown.
    """

    def __init__(self, createfunc: Callable[[], AppSession]) -> None:
        self.createfunc = createfunc
        self.scopefunc = _current_app_context
        self.registry: weakref.WeakKeyDictionary[AppContext, tuple[AppSession, weakref.finalize[Any, Any]]]
        self.registry = weakref.WeakKeyDictionary()

    def __call__(self) -> AppSession:
        context = self.scopefunc()
        entry = self.registry.get(context)
        if entry is None:
            session = self.createfunc()
            finaliser = weakref.finalize(context, _close_abandoned, session)
            finaliser.atexit = False
            entry = self.registry[context] = (session, finaliser)
        return entry[0]

    def has(self) -> bool:
        return has_app_context() and self.scopefunc() in self.registry

    def set(self, obj: AppSession) -> None:
        raise NotImplementedError("sessions are made by the registry, one per app context")

    def clear(self) -> None:
        entry = self.registry.pop(self.scopefunc(), None)
        if entry is not None:
            entry[1].detach()


def _current_app_context() -> AppContext:
    if not has_app_context():
        raise RuntimeError(_NO_CONTEXT_MESSAGE)
    # app_ctx is a werkzeug LocalProxy; _get_current_object() is its documented way to
    # reach the object behind it (typed as the object itself, hence the ignore).
    return app_ctx._get_current_object()  # type: ignore[attr-defined,no-any-return]


def _close_abandoned(session: AppSession) -> None:
    log.warning("%s outlived its app context (its teardown did not run); closed it", session.info.get("origin"))
    try:
        session.close()
    except SQLAlchemyError as error:
        log.warning("closing the abandoned session failed: %s", describe_error(error))
    finally:
        _release_slot(session)


def _release_slot(session: AppSession) -> None:
    release = session.info.pop(_SLOT, None)
    if release is not None:
        release()


class Database:
    """Engine, sessionmaker, declarative base and the app-context session registry.

    Create it once, unbound (``db = Database()``), and bind it with
    ``db.init_app(app)`` from the app factory. Views and commands use ``db.session``.
    """

    Base = Base

    def __init__(self, app: Flask | None = None) -> None:
        # scoped_session only ever calls its factory; ours picks the current app's
        # sessionmaker, which a single sessionmaker could not do for several apps.
        factory = cast("sessionmaker[AppSession]", self._create_scoped_session)
        self.session: scoped_session[AppSession] = scoped_session(factory)
        self.session.registry = _AppContextRegistry(self._create_scoped_session)
        if app is not None:
            self.init_app(app)

    # -- public face kept from the seed ---------------------------------------------

    def get_engine(self) -> Engine:
        """Return the current app's engine."""
        return self._state().engine

    def get_session(self) -> AppSession:
        """Return a new, independent Session that the caller must close."""
        return self._state().sessionmaker()

    @classmethod
    def get_base(cls) -> type[_ModelBase]:
        """Return the declarative base every model inherits."""
        return cls.Base

    # -- Flask wiring ----------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Build the app's engines and sessionmaker and register the session's lifecycle."""
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "A Database is already registered on this app; call init_app once per app."
            )
        config = app.config
        try:
            engine = make_engine(config, app.instance_path)
            # A ping only reads: on SQLite it must not queue for the write lock.
            probe_engine = routing.read_only(make_engine(config, app.instance_path, probe=True))
        except (ArgumentError, ImportError, ValueError) as error:
            raise ConfigError(
                f"DATABASE_URL {mask_url(config['DATABASE_URL'])!r} is invalid: {error}"
            ) from None
        urls = replica_urls(config["DATABASE_REPLICA_URLS"])
        try:
            replicas = ReplicaSet.from_config(config, app.instance_path, urls) if urls else None
        except (ArgumentError, ImportError, ValueError) as error:
            raise ConfigError(f"DATABASE_REPLICA_URLS is invalid: {error}") from None
        if _reads_in_autocommit(config, engine):
            routing.install_autocommit_reads(engine)
        # Statements sent to a replica are timed and counted like the primary's.
        serving = [engine, *(replica.engine for replica in replicas.replicas)] if replicas else [engine]
        if config.get("DATABASE_SLOW_QUERY_MS"):
            for each in serving:
                instrumentation.log_slow_queries(each, float(config["DATABASE_SLOW_QUERY_MS"]))
        app.extensions[EXTENSION_KEY] = state = AppState(
            engine=engine,
            probe_engine=probe_engine,
            read_only_engine=routing.read_only(engine),
            sessionmaker=self._make_sessionmaker(engine, replicas=replicas is not None),
            replicas=replicas,
            read_from_header=bool(replicas is not None and (config["DATABASE_READ_FROM_HEADER"] or app.debug)),
            galera=config["DATABASE_GALERA"] if engine.dialect.name in ("mysql", "mariadb") else "",
        )
        tracking.install_statement_tracking(engine)
        if config["DATABASE_BREAKER_THRESHOLD"]:
            state.breaker = Breaker(
                int(config["DATABASE_BREAKER_THRESHOLD"]), float(config["DATABASE_BREAKER_RESET"]),
                probe=lambda: _select_one(probe_engine),
            )
            breaker.watch(engine, state.breaker)
        # SQLite has no network to hang on: a writer that waits is queued for the file's
        # lock, fairly and within SQLITE_BUSY_TIMEOUT, and must not be turned away.
        if config["DATABASE_BULKHEAD"] and engine.dialect.name != "sqlite":
            state.bulkhead = Bulkhead(
                int(config["DATABASE_BULKHEAD"]), float(config["DATABASE_BULKHEAD_TIMEOUT"]),
                max_wait=float(config["DATABASE_POOL_TIMEOUT"]),
            )
            for each in serving:  # a replica's statement waits on a database too
                breaker.watch_waits(each, state.bulkhead)
        if replicas is not None:
            # Registered first, so it runs after the commit below (after_request
            # functions run in reverse order).
            app.after_request(self._keep_reads_consistent)
        if config["DATABASE_COMMIT_ON_SUCCESS"]:
            app.after_request(self._commit_before_response)
        if config["DATABASE_QUERY_BUDGET"] and (app.debug or app.testing):
            instrumentation.watch_query_budget(app, serving, int(config["DATABASE_QUERY_BUDGET"]))
        app.teardown_appcontext(self._remove_session)
        app.shell_context_processor(lambda: {"db": self, "select": select})
        register_process_hooks()

    @staticmethod
    def _make_sessionmaker(bind: Any, replicas: bool = False, **options: Any) -> sessionmaker[AppSession]:
        maker = sessionmaker(bind=bind, class_=AppSession, autoflush=False, expire_on_commit=False, **options)
        routing.install_session_routing(maker)
        routing.install_write_refusal(maker)
        tracking.install_write_tracking(maker)
        units.install_commit_hooks(maker)
        if replicas:
            routing.install_replica_routing(maker)
            tracking.install_commit_tracking(maker)
        return maker

    def _state(self, app: Flask | None = None) -> AppState:
        if app is None:
            if not has_app_context():
                raise RuntimeError(_NO_CONTEXT_MESSAGE)
            app = current_app._get_current_object()  # type: ignore[attr-defined]
        try:
            return app.extensions[EXTENSION_KEY]  # type: ignore[no-any-return]
        except KeyError:
            raise RuntimeError(
                "The database is not set up on this app: call db.init_app(app) in create_app."
            ) from None

    def _create_scoped_session(self) -> AppSession:
        """A context's first use of the database: past the bulkhead and the breaker,
        then a session bound for reading only if the request promises not to write."""
        state = self._state()
        # The slot first: a breaker's probe waits on the database too, and must not take
        # the thread the bulkhead keeps free.
        release = state.bulkhead.acquire() if state.bulkhead is not None else None
        try:
            if state.breaker is not None:
                state.breaker.check()
            read_only = has_request_context() and request.method in READ_ONLY_METHODS and not state.isolated
            session = state.sessionmaker(bind=state.read_only_engine) if read_only else state.sessionmaker()
            if read_only and state.replicas is not None:
                routing.read_from_replicas(session, state.replicas, sticking.required_lsn())
        except BaseException:
            if release is not None:
                release()
            raise
        session.info["origin"] = _describe_origin()
        session.info[_SLOT] = release
        return session

    def _remove_session(self, exc: BaseException | None) -> None:
        if not self.session.registry.has():
            return
        session = self.session()
        lost: list[str] = []
        try:
            # After an unhandled error the rollback is the point; otherwise it loses data.
            if exc is None:
                lost = describe_uncommitted(session)
        finally:
            self._close_session()
        if lost:
            message = (
                f"{session.info.get('origin', 'a session')} ended with uncommitted changes "
                f"({', '.join(lost)}); they were rolled back. Commit them (with "
                "db.transaction()) or roll back explicitly."
            )
            if current_app.testing:
                raise LostWriteError(message)
            log.warning(message)

    def _close_session(self) -> None:
        """Remove the context's session: roll back, return the connection, forget it.

        The bulkhead slot is given back last: the ROLLBACK waits on the database too.
        """
        session = self.session()
        try:
            self.session.remove()
        except SQLAlchemyError as error:
            # The connection died under the session (a restart, a server-side kill): the
            # ROLLBACK cannot reach a server that rolls back on its own anyway. The pool
            # has discarded the connection; the response already built must stand.
            self.session.registry.clear()
            log.warning("closing the session failed: %s", describe_error(error))
        finally:
            _release_slot(session)

    def _commit_before_response(self, response: Response) -> Response:
        """Commit a request that wrote and succeeded, before the response leaves; a
        failed commit becomes the error page, never a success for a lost write."""
        if not self.session.registry.has():
            return response
        session = self.session()
        if response.status_code >= 400:
            session.rollback()
        elif has_writes(session):
            try:
                session.commit()
            except SQLAlchemyError as error:
                session.rollback()
                return current_app.make_response(current_app.handle_user_exception(error))
        return response

    def _keep_reads_consistent(self, response: Response) -> Response:
        """With replicas: keep this request's commit's WAL position in the user's cookie,
        or drop one every replica has replayed; say where the reads went (``sticking``)."""
        state = self._state()
        session = self.session() if self.session.registry.has() else None
        sticking.after_request(response, session, cast(ReplicaSet, state.replicas), state.engine,
                               reading=request.method in READ_ONLY_METHODS, header=state.read_from_header)
        return response

    def rollback(self) -> None:
        """Roll back the current context's session, if it has one (error pages use it)."""
        if self.session.registry.has():
            try:
                self.session.rollback()
            except SQLAlchemyError as error:  # the connection may be the thing that failed
                log.warning("rollback failed: %s", describe_error(error))

    # -- units of work (myapp.db.units) ---------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[AppSession]:
        """Commit on success, roll back on error; nested, a SAVEPOINT. Also a decorator:
        ``@db.transaction()``."""
        with units.transaction(self.session()) as session:
            yield session

    def on_commit(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` once the current transaction has really committed."""
        units.on_commit(self.session(), callback)

    def retrying(self, attempts: int = 3, backoff: float = 0.05) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Re-run a whole, idempotent unit of work on a serialization failure or deadlock.

        Never wrap a whole POST view: wrap the function that does one unit of work from
        its start, inside a transaction.
        """
        return units.retrying(self.session, attempts, backoff)

    @contextmanager
    def session_scope(self, app: Flask | None = None) -> Iterator[AppSession]:
        """A unit of work for CLI commands, scripts and threads.

        Inside the app's context (a command), use its session; otherwise push a new app
        context, whose teardown removes the session at the end. Either way the block is
        a ``transaction()``. A thread started by a view passes the app and so gets a
        session of its own, never the view's.
        """
        if app is None:
            if not has_app_context():
                raise RuntimeError(_NO_CONTEXT_MESSAGE)
            app = current_app._get_current_object()  # type: ignore[attr-defined]
        inside = has_app_context() and current_app._get_current_object() is app  # type: ignore[attr-defined]
        assert app is not None
        with nullcontext() if inside else app.app_context():
            with self.transaction() as session:
                yield session

    # -- read replicas (myapp.db.replicas) ------------------------------------------------

    @contextmanager
    def use_primary(self) -> Iterator[None]:
        """Send every statement of the block to the primary: for a read that must be
        fresh. Also a decorator: ``@db.use_primary()``."""
        with routing.primary_only(self.session()):
            yield

    @contextmanager
    def replica_session(self) -> Iterator[AppSession]:
        """An independent session that reads from a healthy replica (the primary when
        there is none) and refuses to write (``ReplicaWriteError``, before anything is
        sent): how a command or a job opts in to replica reads."""
        state = self._state()
        bind = state.engine
        if state.replicas is not None:
            if all(replica.state == "unknown" for replica in state.replicas.replicas):
                state.replicas.check()  # a command's first use: no request has started a check
            replica = state.replicas.choose(None, lambda replica: None)
            bind = replica.engine if replica is not None else bind
        if id(bind) not in state.refusing_binds:
            state.refusing_binds[id(bind)] = routing.refusing_writes(bind)
        session = state.sessionmaker(bind=state.refusing_binds[id(bind)])
        routing.refuse_flushes(session)
        session.info["origin"] = f"replica session of {_describe_origin()}"
        try:
            yield session
        finally:
            session.close()

    def replica_status(self, check: bool = False) -> list[dict[str, Any]] | None:
        """Each replica's state and lag (None without replicas); ``check`` checks first."""
        replicas = self._state().replicas
        if replicas is None:
            return None
        if check:
            replicas.check()
        else:
            replicas.maybe_check()
        return replicas.status()

    def ping(self) -> float:
        """Run ``SELECT 1`` over a fresh connection with a short connect timeout.

        Return the round trip in seconds; raise the database error otherwise.
        """
        started = time.perf_counter()
        _select_one(self._state().probe_engine)
        return time.perf_counter() - started

    def galera_status(self) -> dict[str, Any] | None:
        """The Galera node a new connection reaches now, with its state and the cluster's
        size (None when the database is not a Galera cluster); raises like ``ping``."""
        state = self._state()
        if not state.galera:
            return None
        return {"mode": state.galera, **galera.status(state.probe_engine)}

    def breaker_status(self) -> dict[str, Any] | None:
        """This process's circuit breaker (None when it is switched off)."""
        breaker = self._state().breaker
        return breaker.status() if breaker is not None else None

    def test_isolation(self, app: Flask) -> Any:
        """Run everything inside one outer transaction that is rolled back at the end
        (``myapp.db.testing``)."""
        return testing.isolated(self._state(app), self._make_sessionmaker)


def _select_one(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def _reads_in_autocommit(config: Any, engine: Engine) -> bool:
    """The read-only fast path is PostgreSQL's; behind PgBouncer with a statement
    timeout every unit needs its transaction, where SET LOCAL applies the timeout."""
    if not config["DATABASE_READ_ONLY_AUTOCOMMIT"] or engine.dialect.name != "postgresql":
        return False
    return not (config["DATABASE_PGBOUNCER"] == "transaction" and config["DATABASE_STATEMENT_TIMEOUT"])


def _describe_origin() -> str:
    if has_request_context():
        return f"request {request.method} {request.endpoint or request.path}"
    command = click.get_current_context(silent=True)
    if command is not None:
        return f"command {command.command_path}"
    return "a session"


db = Database()
