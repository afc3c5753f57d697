"""The database layer: the declarative base, and the ``Database`` that owns each app's
engine, its sessionmaker and the session registry.

How a session lives and dies, in one place:

1. ``init_app`` builds one engine and one sessionmaker per Flask app from its config.
2. The first use of ``db.session`` inside an app context asks the registry for the
   session of *that* context; the registry creates it from the app's sessionmaker.
3. Work ends with an explicit commit, best through ``with db.transaction():``. With
   ``DATABASE_COMMIT_ON_SUCCESS`` on, a request that wrote and answers 2xx/3xx is
   committed before its response leaves.
4. ``teardown_appcontext`` removes the session when the context ends, for every request
   and every CLI command, whether the view returned or raised: what was not committed
   is rolled back (and reported: a forgotten commit is a bug) and the connection goes
   back to the pool.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

import click
from flask import Flask, current_app, g, has_app_context, has_request_context, request
from flask.globals import _cv_app
from sqlalchemy import Engine, MetaData, Select, event, inspect, select, text
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, ORMExecuteState, Session, SessionTransaction, scoped_session, sessionmaker
from werkzeug.wrappers import Response

from .config import ConfigError
from .engine import READ_ONLY_METHODS, describe_error, is_retryable, make_engine, mask_url, register_process_hooks

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_EXTENSION_KEY = "myapp.database"

_NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

_NO_CONTEXT_MESSAGE = (
    "db.session was used outside an application context. Inside a view or a `flask` "
    "command one is pushed for you; in a script or a thread use `with "
    "db.session_scope(app):` (or `with app.app_context():`), or take `db.get_session()` "
    "and close it yourself."
)


class Base(DeclarativeBase):
    """The one declarative base of every model; its naming convention keeps Alembic's
    constraint names identical on SQLite, PostgreSQL and MariaDB."""

    metadata = MetaData(naming_convention=_NAMING_CONVENTION)


_ModelBase = Base  # for annotations inside Database, whose ``Base`` attribute shadows it


class LostWriteError(RuntimeError):
    """A session ended with changes nobody committed (raised in testing, logged otherwise)."""


class AppSession(Session):
    """A Session that remembers what it wrote and what should run after its commit.

    In a read-only request on PostgreSQL it sends plain SELECTs over an autocommit
    connection: no BEGIN before them and no ROLLBACK when the connection goes back to
    the pool, two round trips saved. Its first write (and everything after it) goes
    through a normal transactional connection, so writes keep their transaction.
    """

    def get_bind(self, mapper: Any = None, *, clause: Any = None, **kw: Any) -> Any:
        reader = self.info.get("reader")
        if (
            reader is not None
            and isinstance(clause, Select)
            and clause._for_update_arg is None
            and not self.info.get("wrote")
        ):
            return reader
        return super().get_bind(mapper, clause=clause, **kw)


@dataclass
class _AppState:
    engine: Engine
    probe_engine: Engine
    sessionmaker: sessionmaker[AppSession]
    # The same pool in autocommit mode, for read-only requests (PostgreSQL only: on
    # MariaDB switching autocommit costs more round trips than it saves).
    reader: Engine | None = None


class Database:
    """Engine, sessionmaker, declarative base and the app-context session registry.

    Create it once, unbound (``db = Database()``), and bind it with
    ``db.init_app(app)`` from the app factory. Views and commands use ``db.session``.

    The registry is a ``scoped_session`` keyed on the *app context object*, not on the
    thread. A thread-local key would hand a nested ``with app.app_context():`` (inside a
    view or a CLI command) the outer context's session, and the inner teardown would
    then remove it, discarding the outer context's pending writes. Keyed on the context,
    each context has its own session and its own teardown; two apps in one process
    never meet because their contexts, engines and sessionmakers are distinct.
    """

    Base = Base

    def __init__(self, app: Flask | None = None) -> None:
        # scoped_session only ever calls its factory; ours picks the current app's
        # sessionmaker, which a single sessionmaker could not do for several apps.
        factory = cast("sessionmaker[AppSession]", self._create_scoped_session)
        self.session: scoped_session[AppSession] = scoped_session(factory, scopefunc=_current_app_context_id)
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
        if _EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "A Database is already registered on this app; call init_app once per app."
            )
        try:
            engine = make_engine(app.config, app.instance_path)
            probe_engine = make_engine(app.config, app.instance_path, probe=True)
        except (ArgumentError, ImportError, ValueError) as error:
            raise ConfigError(
                f"DATABASE_URL {mask_url(app.config['DATABASE_URL'])!r} is invalid: {error}"
            ) from None
        read_in_autocommit = app.config["DATABASE_READ_ONLY_AUTOCOMMIT"] and engine.dialect.name == "postgresql"
        app.extensions[_EXTENSION_KEY] = _AppState(
            engine=engine,
            probe_engine=probe_engine,
            sessionmaker=sessionmaker(
                bind=engine, class_=AppSession, autoflush=False, expire_on_commit=False
            ),
            reader=engine.execution_options(isolation_level="AUTOCOMMIT") if read_in_autocommit else None,
        )
        if app.config["DATABASE_COMMIT_ON_SUCCESS"]:
            app.after_request(self._commit_before_response)
        budget = app.config["DATABASE_QUERY_BUDGET"]
        if budget and (app.debug or app.testing):
            _watch_query_budget(app, engine, int(budget))
        app.teardown_appcontext(self._remove_session)
        app.shell_context_processor(lambda: {"db": self, "select": select})
        register_process_hooks()

    def _state(self, app: Flask | None = None) -> _AppState:
        if app is None:
            if not has_app_context():
                raise RuntimeError(_NO_CONTEXT_MESSAGE)
            app = current_app._get_current_object()  # type: ignore[attr-defined]
        try:
            return app.extensions[_EXTENSION_KEY]  # type: ignore[no-any-return]
        except KeyError:
            raise RuntimeError(
                "The database is not set up on this app: call db.init_app(app) in create_app."
            ) from None

    def _create_scoped_session(self) -> AppSession:
        state = self._state()
        session = state.sessionmaker()
        session.info["origin"] = _describe_origin()
        if state.reader is not None and has_request_context() and request.method in READ_ONLY_METHODS:
            session.info["reader"] = state.reader
        return session

    def _remove_session(self, exc: BaseException | None) -> None:
        if not self.session.registry.has():
            return
        session = self.session()
        # After an unhandled error the rollback is the point; otherwise it loses data.
        lost = describe_uncommitted(session) if exc is None else []
        try:
            self.session.remove()
        except SQLAlchemyError as error:
            # The connection died under the session (a restart, a server-side kill): the
            # ROLLBACK cannot reach a server that rolls back on its own anyway. The pool
            # has discarded the connection; the response already built must stand.
            self.session.registry.clear()
            log.warning("closing the session failed: %s", describe_error(error))
        if lost:
            message = (
                f"{session.info.get('origin', 'a session')} ended with uncommitted changes "
                f"({', '.join(lost)}); they were rolled back. Commit them (with "
                "db.transaction()) or roll back explicitly."
            )
            if current_app.testing:
                raise LostWriteError(message)
            log.warning(message)

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

    def rollback(self) -> None:
        """Roll back the current context's session, if it has one (error pages use it)."""
        if has_app_context() and self.session.registry.has():
            try:
                self.session.rollback()
            except SQLAlchemyError as error:  # the connection may be the thing that failed
                log.warning("rollback failed: %s", describe_error(error))

    # -- units of work ---------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[AppSession]:
        """Commit on success, roll back on error; nested, a SAVEPOINT.

        Also a decorator: ``@db.transaction()``. The outermost block commits the
        session's whole transaction, reads made before it included.
        """
        session = self.session()
        depth = session.info.get("transaction_depth", 0)
        session.info["transaction_depth"] = depth + 1
        try:
            if depth:
                with session.begin_nested():
                    yield session
            else:
                try:
                    yield session
                    session.commit()
                except BaseException:
                    session.rollback()
                    raise
        finally:
            session.info["transaction_depth"] = depth

    def on_commit(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` once the current transaction has really committed.

        Dropped if it rolls back (or the SAVEPOINT it was registered in does). With no
        transaction and nothing pending, it runs at once: there is nothing to wait for.
        """
        session = self.session()
        transaction = session.get_nested_transaction() or session.get_transaction()
        if transaction is None and not has_writes(session):
            callback()
            return
        if transaction is None:
            transaction = session.begin()
        session.info.setdefault("on_commit", []).append((transaction, callback))

    def retrying(self, attempts: int = 3, backoff: float = 0.05) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Re-run a whole, idempotent unit of work on a serialization failure or deadlock.

        PostgreSQL 40001/40P01, MariaDB/MySQL 1213, SQLite busy; at most ``attempts``
        runs, with jittered exponential backoff. Never wrap a whole POST view: wrap the
        function that does one unit of work from its start, inside a transaction.
        """
        if not 1 <= attempts <= 10:
            raise ValueError("attempts must be between 1 and 10")

        def decorator(unit: Callable[P, R]) -> Callable[P, R]:
            @functools.wraps(unit)
            def run(*args: P.args, **kwargs: P.kwargs) -> R:
                session = self.session()
                if session.info.get("transaction_depth"):
                    raise RuntimeError(
                        f"{unit.__name__} is retried inside an open db.transaction(): a retry "
                        "can only re-run a whole unit of work, so put the retry outside it."
                    )
                if has_writes(session):
                    raise RuntimeError(
                        f"{unit.__name__} is retried but the session already holds "
                        "uncommitted writes that a retry would discard: commit first, or "
                        "retry the whole unit of work."
                    )
                for attempt in range(1, attempts + 1):
                    try:
                        return unit(*args, **kwargs)
                    except DBAPIError as error:
                        if attempt == attempts or not is_retryable(error):
                            raise
                        session.rollback()
                        delay = random.uniform(0, backoff * 2 ** (attempt - 1))
                        log.info("retrying %s after %s (attempt %d)", unit.__name__, describe_error(error), attempt)
                        time.sleep(delay)
                raise AssertionError("unreachable")

            return run

        return decorator

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

    def ping(self) -> float:
        """Run ``SELECT 1`` over a fresh connection with a short connect timeout.

        Return the round trip in seconds; raise the database error otherwise.
        """
        started = time.perf_counter()
        with self._state().probe_engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return time.perf_counter() - started

    # -- test support ----------------------------------------------------------------

    @contextmanager
    def test_isolation(self, app: Flask) -> Iterator[None]:
        """Run everything inside one outer transaction that is rolled back at the end.

        Every session the app makes (the registry's and ``get_session()``'s) joins the
        outer transaction through a SAVEPOINT, so ``commit()`` in a view works as usual
        and later requests of the same test see it, yet nothing reaches the database.
        """
        state = self._state(app)
        saved, saved_reader = state.sessionmaker, state.reader
        state.reader = None  # every statement must go through the outer transaction
        with state.engine.connect() as connection:
            outer = connection.begin()
            state.sessionmaker = sessionmaker(
                bind=connection,
                class_=AppSession,
                autoflush=False,
                expire_on_commit=False,
                join_transaction_mode="create_savepoint",
            )
            try:
                yield
            finally:
                state.sessionmaker, state.reader = saved, saved_reader
                outer.rollback()


def _current_app_context_id() -> int:
    if not has_app_context():
        raise RuntimeError(_NO_CONTEXT_MESSAGE)
    return id(_cv_app.get())


def _describe_origin() -> str:
    if has_request_context():
        return f"request {request.method} {request.endpoint or request.path}"
    command = click.get_current_context(silent=True)
    if command is not None:
        return f"command {command.command_path}"
    return "a session"


# -- what a session wrote, and what runs after its commit ----------------------------


def has_writes(session: Session) -> bool:
    """True if the session has changes to flush or flushed writes not yet committed."""
    return bool(session.new or session.deleted or session.info.get("flushed")) or any(
        session.is_modified(obj) for obj in session.dirty
    )


def describe_uncommitted(session: Session) -> list[str]:
    """Name the objects a session would lose, without their (possibly private) contents."""
    names = [f"new {type(obj).__name__}" for obj in session.new]
    names += [f"changed {_identity(obj)}" for obj in session.dirty if session.is_modified(obj)]
    names += [f"deleted {_identity(obj)}" for obj in session.deleted]
    names += [f"flushed {name}" for name in session.info.get("flushed", ())]
    return names


def _identity(obj: object) -> str:
    key = inspect(obj).identity
    return f"{type(obj).__name__}{list(key) if key else ''}"


@event.listens_for(AppSession, "before_flush")
def _switch_to_transaction(session: Session, flush_context: Any, instances: Any) -> None:
    session.info["wrote"] = True


@event.listens_for(AppSession, "after_flush")
def _remember_flushed(session: Session, flush_context: Any) -> None:
    flushed = session.info.setdefault("flushed", [])
    flushed.extend(f"new {type(obj).__name__}" for obj in session.new)
    flushed.extend(f"changed {_identity(obj)}" for obj in session.dirty if session.is_modified(obj))
    flushed.extend(f"deleted {_identity(obj)}" for obj in session.deleted)


@event.listens_for(AppSession, "do_orm_execute")
def _remember_bulk_writes(state: ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        state.session.info["wrote"] = True
        name = getattr(state.bind_mapper, "class_", None)
        kind = "insert" if state.is_insert else "update" if state.is_update else "delete"
        state.session.info.setdefault("flushed", []).append(f"bulk {kind} {getattr(name, '__name__', '')}".strip())


@event.listens_for(AppSession, "after_commit")
def _run_after_commit(session: Session) -> None:
    session.info.pop("flushed", None)
    callbacks = session.info.pop("on_commit", [])
    for _transaction, callback in callbacks:
        try:
            callback()
        except Exception:  # the data is committed; one failing hook must not hide it
            log.exception("after-commit callback %r failed", callback)


@event.listens_for(AppSession, "after_soft_rollback")
def _forget_after_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    if previous_transaction.nested:
        session.info["on_commit"] = [
            (transaction, callback)
            for transaction, callback in session.info.get("on_commit", [])
            if not _descends_from(transaction, previous_transaction)
        ]
    else:
        session.info.pop("on_commit", None)
        session.info.pop("flushed", None)


def _descends_from(transaction: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False


# -- query budget (debug and tests) --------------------------------------------------

_TRANSACTION_CONTROL = ("BEGIN", "SAVEPOINT", "RELEASE", "ROLLBACK", "COMMIT")


def _watch_query_budget(app: Flask, engine: Engine, budget: int) -> None:
    """Count each request's statements; warn past the budget (an N+1 query is the usual
    cause) and, in debug, show the count in an ``X-Query-Count`` header."""

    @event.listens_for(engine, "before_cursor_execute")
    def _count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if has_request_context() and not statement.startswith(_TRANSACTION_CONTROL):
            g.query_count = g.get("query_count", 0) + 1

    @app.after_request
    def _report(response: Response) -> Response:
        count = g.get("query_count", 0)
        if count > budget:
            log.warning("%s %s sent %d queries (budget %d)", request.method, request.path, count, budget)
        if app.debug:
            response.headers["X-Query-Count"] = str(count)
        return response


db = Database()
