"""The database layer: engine, sessionmaker, declarative base and the session registry.

How a session lives and dies, in one place:

1. ``init_app`` builds one engine and one sessionmaker per Flask app from its config.
2. The first use of ``db.session`` inside an app context asks the registry for the
   session of *that* context; the registry creates it from the app's sessionmaker.
3. ``teardown_appcontext`` calls ``db.session.remove()`` when the context ends, for
   every request and every CLI command, whether the view returned or raised: the
   session rolls back whatever was not committed and its connection goes back to
   the pool.
"""

from __future__ import annotations

import atexit
import os
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from flask import Flask, current_app, has_app_context, has_request_context, request
from flask.globals import _cv_app
from sqlalchemy import Engine, MetaData, create_engine, event, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import DeclarativeBase, Session, scoped_session, sessionmaker
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool, StaticPool

from .config import ConfigError

_EXTENSION_KEY = "myapp.database"

_NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Request methods that promise not to write; SQLite may start their transactions
# deferred, so that readers do not queue behind the write lock.
_READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# Every engine built by any Database, so that a fork or interpreter exit can reach them.
_all_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


class Base(DeclarativeBase):
    """The one declarative base of every model; its naming convention keeps Alembic's
    constraint names identical on SQLite, PostgreSQL and MariaDB."""

    metadata = MetaData(naming_convention=_NAMING_CONVENTION)


@dataclass
class _AppState:
    engine: Engine
    probe_engine: Engine
    sessionmaker: sessionmaker[Session]


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
        self.session: scoped_session[Session] = scoped_session(
            self._create_scoped_session, scopefunc=_current_app_context_id
        )
        if app is not None:
            self.init_app(app)

    # -- public face kept from the seed ---------------------------------------------

    def get_engine(self) -> Engine:
        """Return the current app's engine."""
        return self._state().engine

    def get_session(self) -> Session:
        """Return a new, independent Session that the caller must close."""
        return self._state().sessionmaker()

    @classmethod
    def get_base(cls) -> type[Base]:
        """Return the declarative base every model inherits."""
        return cls.Base

    def ping(self) -> float:
        """Run ``SELECT 1`` over a fresh connection with a short connect timeout.

        Return the round trip in seconds; raise the database error otherwise.
        """
        started = time.perf_counter()
        with self._state().probe_engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return time.perf_counter() - started

    # -- Flask wiring ----------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Build the app's engine and sessionmaker and register the teardown."""
        if _EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "A Database is already registered on this app; call init_app once per app."
            )
        try:
            engine = _make_engine(app)
            probe_engine = _make_engine(app, probe=True)
        except (ArgumentError, ImportError, ValueError) as error:
            raise ConfigError(
                f"DATABASE_URL {mask_url(app.config['DATABASE_URL'])!r} is invalid: {error}"
            ) from None
        app.extensions[_EXTENSION_KEY] = _AppState(
            engine=engine,
            probe_engine=probe_engine,
            sessionmaker=sessionmaker(bind=engine, autoflush=False, expire_on_commit=False),
        )
        app.teardown_appcontext(self._remove_session)
        app.shell_context_processor(lambda: {"db": self, "select": select})
        _register_process_hooks()

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

    def _create_scoped_session(self) -> Session:
        return self._state().sessionmaker()

    def _remove_session(self, exc: BaseException | None) -> None:
        self.session.remove()

    # -- test support ----------------------------------------------------------------

    @contextmanager
    def test_isolation(self, app: Flask) -> Iterator[None]:
        """Run everything inside one outer transaction that is rolled back at the end.

        Every session the app makes (the registry's and ``get_session()``'s) joins the
        outer transaction through a SAVEPOINT, so ``commit()`` in a view works as usual
        and later requests of the same test see it, yet nothing reaches the database.
        """
        state = self._state(app)
        saved = state.sessionmaker
        with state.engine.connect() as connection:
            outer = connection.begin()
            state.sessionmaker = sessionmaker(
                bind=connection,
                autoflush=False,
                expire_on_commit=False,
                join_transaction_mode="create_savepoint",
            )
            try:
                yield
            finally:
                state.sessionmaker = saved
                outer.rollback()


_NO_CONTEXT_MESSAGE = (
    "db.session was used outside an application context. Inside a view or a `flask` "
    "command one is pushed for you; in a script, thread or test wrap the work in "
    "`with app.app_context():` (or use `db.get_session()` and close it yourself)."
)


def _current_app_context_id() -> int:
    if not has_app_context():
        raise RuntimeError(_NO_CONTEXT_MESSAGE)
    return id(_cv_app.get())


# -- engine construction -------------------------------------------------------------


def _make_engine(app: Flask, *, probe: bool = False) -> Engine:
    """Create the engine for ``DATABASE_URL`` with the options its backend needs.

    A probe engine has no pool and a short connect timeout: each ping opens a fresh
    connection, which proves the server still accepts new ones.
    """
    config = app.config
    url = _resolve_url(config["DATABASE_URL"], app.instance_path)
    options: dict[str, Any] = {
        "pool_pre_ping": True,
        "hide_parameters": True,
        "echo": bool(config.get("DATABASE_ECHO", False)),
    }
    connect_args: dict[str, Any] = {}
    backend = url.get_backend_name()
    connect_timeout = int(config["DATABASE_PING_TIMEOUT" if probe else "DATABASE_CONNECT_TIMEOUT"])
    app_name = config["DATABASE_APP_NAME"]

    if backend == "sqlite" and url.database in (None, "", ":memory:"):
        options["poolclass"] = StaticPool
        connect_args["check_same_thread"] = False
    elif probe:
        options["poolclass"] = NullPool
    else:
        options.update(_pool_options(config))

    if backend == "sqlite":
        connect_args["timeout"] = float(config["SQLITE_BUSY_TIMEOUT"])
    else:
        if backend == "postgresql":
            connect_args["connect_timeout"] = connect_timeout
            connect_args["application_name"] = app_name
        elif backend in ("mysql", "mariadb"):
            url = url.update_query_dict({"charset": "utf8mb4"})
            connect_args["connect_timeout"] = connect_timeout
            connect_args["program_name"] = app_name

    engine = create_engine(url, connect_args=connect_args, **options)
    if backend == "sqlite":
        _configure_sqlite(engine)
    if not probe:
        _all_engines.add(engine)
    return engine


def _pool_options(config: Any) -> dict[str, Any]:
    return {
        "pool_size": int(config["DATABASE_POOL_SIZE"]),
        "max_overflow": int(config["DATABASE_MAX_OVERFLOW"]),
        "pool_timeout": float(config["DATABASE_POOL_TIMEOUT"]),
        "pool_recycle": int(config["DATABASE_POOL_RECYCLE"]),
    }


def _resolve_url(raw: str | URL, instance_path: str) -> URL:
    """Parse the URL; a relative SQLite path is taken relative to the instance folder."""
    url = make_url(raw)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        if not os.path.isabs(url.database) and not url.database.startswith("file:"):
            os.makedirs(instance_path, exist_ok=True)
            url = url.set(database=os.path.join(instance_path, url.database))
    return url


def _configure_sqlite(engine: Engine) -> None:
    """Give SQLite real transactions: WAL, foreign keys, and an up-front write lock.

    Python 3.11's sqlite3 issues its own BEGIN lazily, before the first write, which
    breaks SAVEPOINTs and lets a read-then-write transaction fail at once with
    "database is locked" whatever the busy timeout. So we switch its handling off and
    emit BEGIN ourselves: BEGIN IMMEDIATE (take the write lock up front, waiting up to
    the busy timeout) except for requests whose method promises not to write.
    """
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        if engine.url.database not in (None, "", ":memory:"):
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        if has_request_context() and request.method in _READ_ONLY_METHODS:
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


# -- process lifecycle ---------------------------------------------------------------

_hooks_registered = False


def _register_process_hooks() -> None:
    """Keep pooled connections from crossing a fork, and close them at exit."""
    global _hooks_registered
    if _hooks_registered:
        return
    _hooks_registered = True
    os.register_at_fork(after_in_child=forget_inherited_connections)
    atexit.register(dispose_all_engines)


def forget_inherited_connections() -> None:
    """Drop, without closing, every pooled connection this process inherited.

    close=False: the sockets belong to the parent (e.g. the gunicorn master with
    --preload); the child drops its references and opens its own connections.
    """
    for engine in list(_all_engines):
        engine.dispose(close=False)


def dispose_all_engines() -> None:
    """Close every pooled connection, e.g. when a worker exits."""
    for engine in list(_all_engines):
        engine.dispose()




def mask_url(url: str | URL) -> str:
    """Render a database URL with its password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"



def describe_error(exc: BaseException) -> str:
    """One line that says what went wrong with the database, with no secrets in it.

    The driver's message is kept (it names the host, port or user, never the
    password); the SQL and its parameters are dropped.
    """
    original = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    message = lines[0] if lines else "no details"
    return f"{type(original).__name__}: {message}"[:300]


db = Database()
