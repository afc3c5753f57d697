"""A test-only app: the real app plus fault-injection routes, configured from the environment.

Never imported by the product. gunicorn serves it as ``tests.faults.slowapp:app``
(``app`` is built on first access, from the environment gunicorn was given).

Environment switches, each a deliberate fault for a negative control:

- ``FAULTS_PRE_PING=0``: the pool hands out connections without testing them (the
  app's engines are created with ``pool_pre_ping=False``, nothing else changed).
- ``FAULTS_FORK_DISPOSE=0``: the engine is left out of the fork hooks, so pooled
  connections cross the fork as they would without ``engine.dispose(close=False)``.
- ``FAULTS_TOUCH_AT_IMPORT=1``: run a query while the app is built (in the gunicorn
  master with ``--preload``), leaving a connection in the pool.
- ``FAULTS_REPLICA_FALLBACK=0``: a read that a replica failed (connection refused or
  lost) is not re-run on the primary, and the replica is not marked down by it: the
  request fails, and only the next health check takes the replica out.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from unittest import mock

from flask import Blueprint, Flask, current_app, request
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from myapp import create_app
from myapp.db import db, engines, routing
from myapp.db.engines import _all_engines

bp = Blueprint("faults", __name__, url_prefix="/faults")


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes")


@contextmanager
def _engines_without_pre_ping() -> Iterator[list[Engine]]:
    """Have ``create_app`` build its engines with ``pool_pre_ping=False``; yield the
    engines so built.

    The app has no setting for it (pre-ping is always on), so the engine factory's
    ``create_engine`` is wrapped while the app is built: same URL, same options, only
    that one flag changed, through SQLAlchemy's public argument.
    """
    built: list[Engine] = []

    def create_engine_without_pre_ping(*args: Any, **kwargs: Any) -> Engine:
        built.append(create_engine(*args, **{**kwargs, "pool_pre_ping": False}))
        return built[-1]

    with mock.patch.object(engines, "create_engine", create_engine_without_pre_ping):
        yield built


def create_fault_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """The real app, with the routes below and the faults the environment asks for."""
    if _flag("FAULTS_PRE_PING", "1"):
        app = create_app(test_config)
    else:
        with _engines_without_pre_ping() as built:
            app = create_app(test_config)
        # Should the factory stop creating engines through that name, the fault would
        # silently not be injected and the negative controls would test nothing.
        assert app.extensions["myapp.database"].engine in built, "the app's engine kept pre-ping"
    if not _flag("FAULTS_REPLICA_FALLBACK", "1"):
        # The one test of "is this a replica failure to re-run on the primary".
        routing._unreachable = lambda error: False  # type: ignore[assignment]
    engine = app.extensions["myapp.database"].engine
    if not _flag("FAULTS_FORK_DISPOSE", "1"):
        _all_engines.discard(engine)
    app.register_blueprint(bp)
    if _flag("FAULTS_TOUCH_AT_IMPORT", "0"):
        with app.app_context():
            db.session.execute(text("SELECT 1"))
    return app


@bp.get("/sleep")
def sleep() -> dict[str, float]:
    """Hold a connection while the database sleeps: a slow or runaway query."""
    seconds = float(request.args.get("seconds", "3"))
    if db.get_engine().dialect.name == "postgresql":
        db.session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
    else:
        db.session.execute(text("SELECT SLEEP(:s)"), {"s": seconds})
    return {"slept": seconds}


@bp.get("/whoami")
def whoami() -> dict[str, int]:
    """The worker's pid and the server-side id of the connection this request used."""
    if db.get_engine().dialect.name == "postgresql":
        backend = db.session.scalar(text("SELECT pg_backend_pid()"))
    else:
        backend = db.session.scalar(text("SELECT CONNECTION_ID()"))
    return {"pid": os.getpid(), "backend": int(backend)}


@bp.get("/lose-connection")
def lose_connection() -> dict[str, int]:
    """Query, then have the server end this request's connection before the teardown:
    the session's closing ROLLBACK meets a dead connection (a restart or a kill that
    lands between a view's last statement and the end of its request)."""
    engine = db.get_engine()
    postgres = engine.dialect.name == "postgresql"
    backend = int(db.session.scalar(text("SELECT pg_backend_pid()" if postgres else "SELECT CONNECTION_ID()")))
    admin = create_engine(engine.url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            if postgres:  # waits until the backend is gone
                connection.execute(text("SELECT pg_terminate_backend(:id, 5000)"), {"id": backend})
            else:
                connection.execute(text(f"KILL CONNECTION {backend}"))
                alive = text("SELECT COUNT(*) FROM information_schema.processlist WHERE id = :id")
                for _ in range(100):
                    if not connection.scalar(alive, {"id": backend}):
                        break
                    time.sleep(0.05)
    finally:
        admin.dispose()
    return {"killed": backend}


@bp.get("/pool")
def pool() -> dict[str, int]:
    """Pool figures of this worker; the database is not consulted."""
    engine_pool = current_app.extensions["myapp.database"].engine.pool
    return {"pid": os.getpid(), "checkedout": engine_pool.checkedout(), "size": engine_pool.size()}


def __getattr__(name: str) -> Flask:
    # Built lazily so that importing this module (e.g. from a test) needs no settings.
    if name == "app":
        application = create_fault_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
