"""Configuration: defaults, then ``instance/config.py``, then the environment, then
the test mapping. The environment includes ``.env`` and ``.flaskenv``, which the
``flask`` command and the gunicorn settings (``myapp.gunicorn_conf``) load through
python-dotenv."""

from __future__ import annotations

import importlib.util
import os
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask
from limits import parse_many

from .db.config import ConfigError, DatabaseSettings

__all__ = ["ConfigError", "DEFAULTS", "ENVIRONMENT_SETTINGS", "check_settings", "load_config"]


def _as_bool(value: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


# Every setting read from the environment, with how to parse it.
ENVIRONMENT_SETTINGS: dict[str, Callable[[str], Any]] = {
    "SECRET_KEY": str,
    "DATABASE_URL": str,
    "DATABASE_POOL_SIZE": int,
    "DATABASE_MAX_OVERFLOW": int,
    "DATABASE_POOL_TIMEOUT": float,
    "DATABASE_POOL_RECYCLE": int,
    "DATABASE_CONNECT_TIMEOUT": int,
    "DATABASE_PING_TIMEOUT": int,
    "DATABASE_APP_NAME": str,
    "DATABASE_ECHO": _as_bool,
    "DATABASE_STATEMENT_TIMEOUT": int,
    "DATABASE_SLOW_QUERY_MS": float,
    "DATABASE_QUERY_BUDGET": int,
    "DATABASE_COMMIT_ON_SUCCESS": _as_bool,
    "DATABASE_READ_ONLY_AUTOCOMMIT": _as_bool,
    "DATABASE_NETWORK_TIMEOUT": int,
    "DATABASE_BREAKER_THRESHOLD": int,
    "DATABASE_BREAKER_RESET": float,
    "DATABASE_BULKHEAD": int,
    "DATABASE_BULKHEAD_TIMEOUT": float,
    "DATABASE_PGBOUNCER": str,
    "DATABASE_REPLICA_URLS": str,
    "DATABASE_REPLICA_CHECK_INTERVAL": float,
    "DATABASE_REPLICA_MAX_LAG": str,
    "DATABASE_READ_FROM_HEADER": _as_bool,
    "DATABASE_READ_ONLY_MODE": _as_bool,
    "DATABASE_GALERA": str,
    "DATABASE_GALERA_SYNC_WAIT": int,
    "SQLITE_BUSY_TIMEOUT": float,
    "POSTS_PER_PAGE": int,
    "SESSION_COOKIE_SECURE": _as_bool,
    "PROXY_FIX_X_FOR": int,
    "PROXY_FIX_X_PROTO": int,
    "PROXY_FIX_X_HOST": int,
    "PROXY_FIX_X_PORT": int,
    "PROXY_FIX_X_PREFIX": int,
    "RATELIMIT_ENABLED": _as_bool,
    "RATELIMIT_STORAGE_URI": str,
    "LOGIN_RATE_LIMIT": str,
    "LOGIN_RATE_LIMIT_PER_ADDRESS": str,
    "METRICS": _as_bool,
    "REQUEST_LOG": _as_bool,
    "LOG_FORMAT": str,
}

DEFAULTS: dict[str, Any] = {
    "SECRET_KEY": None,
    "DATABASE_URL": "sqlite:///myapp.sqlite",  # relative: inside the instance folder
    # Sized for gunicorn's default here (2 workers x 4 threads): a thread never waits
    # for a connection unless it leaks one, and 2 x (5 + 5) stays far below
    # PostgreSQL's 100 and MariaDB's 151 connections.
    "DATABASE_POOL_SIZE": 5,
    "DATABASE_MAX_OVERFLOW": 5,
    # Far below gunicorn's 30 s worker timeout: a full pool answers 503, not a killed worker.
    # Alert MyappDatabasePoolSaturated (deploy/prometheus/alerts.yml): every connection of
    # the pool size checked out for 1 min, or a wait past this timeout.
    "DATABASE_POOL_TIMEOUT": 5.0,
    # Below MariaDB's 8 h wait_timeout and typical proxy idle limits.
    "DATABASE_POOL_RECYCLE": 1800,
    "DATABASE_CONNECT_TIMEOUT": 5,  # psycopg waits over two minutes without one
    "DATABASE_PING_TIMEOUT": 2,  # libpq's minimum
    "DATABASE_APP_NAME": "myapp",
    "DATABASE_ECHO": False,
    # Milliseconds a statement may run before the server cancels it (0: no limit);
    # PostgreSQL statement_timeout, MariaDB max_statement_time. SQLite has none.
    "DATABASE_STATEMENT_TIMEOUT": 0,
    "DATABASE_SLOW_QUERY_MS": 500,  # log statements slower than this (0: off)
    "DATABASE_QUERY_BUDGET": 30,  # debug and tests: warn when a request sends more
    # Commit requests that wrote and answered 2xx/3xx. Off, a view commits its own writes;
    # a forgotten commit is rolled back and alert MyappLostWrites fires at once.
    "DATABASE_COMMIT_ON_SUCCESS": False,
    # PostgreSQL: GET/HEAD requests read in autocommit until their first write.
    "DATABASE_READ_ONLY_AUTOCOMMIT": True,
    # Seconds before a connection whose server stopped answering fails (0: the kernel's
    # ~15 minutes). PostgreSQL: tcp_user_timeout and keepalives; MariaDB: PyMySQL's
    # read/write timeouts (a read may also take the statement timeout).
    "DATABASE_NETWORK_TIMEOUT": 10,
    # Failures to answer in a row (connect failures, lost connections, network
    # timeouts) that open the circuit breaker: then requests that need the database get
    # a 503 at once, and after DATABASE_BREAKER_RESET seconds one probe checks whether
    # it is back. 0: no breaker. Alert MyappDatabaseUnreachable: a breaker open on any
    # worker for over 30 s, i.e. about 30 failed probes at the default reset.
    "DATABASE_BREAKER_THRESHOLD": 3,
    "DATABASE_BREAKER_RESET": 1.0,
    # Threads of a process that may use the database at once (0: no cap); a slot is held
    # from a unit of work's start until its connection goes back (a GET reading in
    # autocommit: until each answer). A request over the cap waits
    # for a slot (at most DATABASE_POOL_TIMEOUT), but gets a 503 at once when every
    # holder has waited DATABASE_BULKHEAD_TIMEOUT seconds or more (it is stuck). gunicorn.conf.py sets it to GUNICORN_THREADS - 1,
    # so that a thread is always free for /healthz. Not on SQLite: no network to hang
    # on, and its writers queue for the lock within SQLITE_BUSY_TIMEOUT.
    "DATABASE_BULKHEAD": 0,
    "DATABASE_BULKHEAD_TIMEOUT": 0.5,
    # "transaction" behind PgBouncer's transaction pooling: no prepared statements,
    # the statement timeout set per transaction (SET LOCAL). "" (direct) otherwise.
    "DATABASE_PGBOUNCER": "",
    # PostgreSQL streaming replicas for the reads of GET/HEAD/OPTIONS requests: URLs
    # separated by commas or spaces (a list in instance/config.py); empty: none.
    "DATABASE_REPLICA_URLS": "",
    # Seconds between two health checks of the replicas, per process (jittered).
    "DATABASE_REPLICA_CHECK_INTERVAL": 1.0,
    # A replica further behind than this leaves the rotation until it catches up: a
    # time, a size, or both ("10s, 16MB"); time is counted from when the primary first
    # had WAL the replica still has not replayed, so an idle primary adds none. Alerts
    # MyappReplicaLagging (past these figures for 1 min; alerts.yml repeats them: change
    # both) and MyappNoReplicaInRotation (none in rotation for 30 s).
    "DATABASE_REPLICA_MAX_LAG": "10s, 16MB",
    # With replicas, when the primary is unreachable (its breaker open, or a connect
    # refused or timed out): GET and HEAD pages are read from a healthy replica under a
    # "read-only for now" banner, and writes get a 503 that shows what was typed.
    # False: every request that needs the database gets the 503.
    "DATABASE_READ_ONLY_MODE": True,
    # An X-Read-From header (replica <n> / primary) on every response; always on in debug.
    "DATABASE_READ_FROM_HEADER": False,
    # MariaDB Galera: "pinned" (every connection to the first ready node of the URL's
    # list: one writer, no certification conflicts between our own requests) or
    # "spread" (each new connection starts from the next node). "" : not a cluster.
    # A cluster URL lists its nodes like a PostgreSQL multi-host one:
    # mysql+pymysql://user:pw@node1:3306/db?host=node2:3306&host=node3:3306
    "DATABASE_GALERA": "",
    # wsrep_sync_wait for every connection to a Galera node: 1 makes each read wait
    # until the node has applied what the cluster had committed when the read began
    # (causal reads: a write through one node is seen by a read on any); 0: off.
    "DATABASE_GALERA_SYNC_WAIT": 1,
    "SQLITE_BUSY_TIMEOUT": 5.0,
    "POSTS_PER_PAGE": 20,
    # Alembic's folder; None: the one installed with the package (packaged_migrations_dir).
    "MIGRATIONS_DIR": None,
    "MAX_CONTENT_LENGTH": 1024 * 1024,
    "SESSION_COOKIE_HTTPONLY": True,
    "SESSION_COOKIE_SAMESITE": "Lax",
    # Also Secure whenever the request came over HTTPS (see PROXY_FIX_X_PROTO).
    "SESSION_COOKIE_SECURE": False,
    "WTF_CSRF_TIME_LIMIT": None,  # the token lives as long as the session cookie
    # Flask-WTF's hook off: auth.check_csrf runs the same check, for unsafe methods only.
    "WTF_CSRF_CHECK_DEFAULT": False,
    # How many proxies in front of the app set each X-Forwarded-* header (0: trust
    # none). Set only what your own proxy overwrites: a client can send these too.
    "PROXY_FIX_X_FOR": 0,
    "PROXY_FIX_X_PROTO": 0,
    "PROXY_FIX_X_HOST": 0,
    "PROXY_FIX_X_PORT": 0,
    "PROXY_FIX_X_PREFIX": 0,
    # Failed logins allowed per username and per client address (the limits
    # library's syntax, e.g. "5 per minute;20 per hour"). None: on, except under TESTING.
    "RATELIMIT_ENABLED": None,
    "RATELIMIT_STORAGE_URI": "myapp-db://",  # the app's own database, shared by workers
    "LOGIN_RATE_LIMIT": "5 per minute",
    "LOGIN_RATE_LIMIT_PER_ADDRESS": "30 per minute",
    # Prometheus metrics (README, "Operating it"). Recorded in each process; under
    # gunicorn the master sums the workers' and serves them on METRICS_BIND (a setting
    # of myapp.gunicorn_conf, 127.0.0.1:9200 by default), never on the public port.
    "METRICS": True,
    # One line per request on the "myapp.request" logger (stderr): method, path,
    # endpoint, status, duration, statements, database time, where reads went, request
    # id. Under gunicorn it takes the place of gunicorn's own access log.
    "REQUEST_LOG": True,
    "LOG_FORMAT": "text",  # or "json", one object per line, for log shippers
}

_WEAK_SECRET_KEYS = {"dev", "secret", "changeme", "change-me"}


def load_config(app: Flask, test_config: Mapping[str, Any] | None) -> None:
    """Fill ``app.config`` in precedence order and check what must be set."""
    app.config.from_mapping(DEFAULTS)
    app.config.from_pyfile("config.py", silent=True)
    app.config.update(read_environment(os.environ))
    if test_config is not None:
        app.config.from_mapping(test_config)
    _check_secret_key(app)
    _check_rate_limits(app)
    _check_log_format(app)


def check_settings() -> None:
    """Load the settings as ``create_app`` would and raise ConfigError if one is wrong.

    For a server's master process (gunicorn's ``on_starting``), so that it refuses to
    start in one line instead of every worker failing with a traceback. The database
    settings are checked by parsing them, as ``db.init_app`` does.
    """
    app = Flask("myapp", instance_relative_config=True)
    load_config(app, None)
    DatabaseSettings.from_config(app.config, app.instance_path, debug=app.debug, testing=app.testing)


# Top-level migrations/ in the source tree; setup.cfg installs it as this package.
MIGRATIONS_PACKAGE = "myapp.migrations"


def packaged_migrations_dir() -> str:
    """The folder of the installed ``myapp.migrations`` package: ``migrations/`` of the
    checkout in an editable install, ``site-packages/myapp/migrations`` from a wheel.

    Found through the import system, never relative to this file: a wheel has no
    checkout around the package. Located, not imported.
    """
    spec = importlib.util.find_spec(MIGRATIONS_PACKAGE)
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        raise ConfigError(
            f"the migrations are not installed (no package {MIGRATIONS_PACKAGE}): install myapp "
            "(pip install -e . or its wheel), or set MIGRATIONS_DIR in instance/config.py."
        )
    return str(locations[0])


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Parse the known settings present in ``environ``; a bad value is a ConfigError."""
    settings: dict[str, Any] = {}
    for name, parse in ENVIRONMENT_SETTINGS.items():
        if name in environ:
            try:
                settings[name] = parse(environ[name])
            except ValueError as exc:
                raise ConfigError(f"{name} is invalid: {exc}") from None
    return settings


def _check_secret_key(app: Flask) -> None:
    key = app.config.get("SECRET_KEY")
    if app.debug or app.testing:
        if not key:
            # Sessions of a development server last until it restarts.
            app.config["SECRET_KEY"] = secrets.token_hex(32)
        return
    if not key or key in _WEAK_SECRET_KEYS or len(key) < 32:
        raise ConfigError(
            "SECRET_KEY must be set to a random value of at least 32 characters "
            '(python -c "import secrets; print(secrets.token_hex(32))"), in .env or the environment.'
        )


def _check_log_format(app: Flask) -> None:
    if app.config["LOG_FORMAT"] not in ("text", "json"):
        raise ConfigError(f"LOG_FORMAT is invalid: {app.config['LOG_FORMAT']!r}; use text or json.")


def _check_rate_limits(app: Flask) -> None:
    for name in ("LOGIN_RATE_LIMIT", "LOGIN_RATE_LIMIT_PER_ADDRESS"):
        try:
            parse_many(str(app.config[name]))
        except ValueError:
            raise ConfigError(
                f"{name} is invalid: {app.config[name]!r}; write it like \"5 per minute\" "
                'or "5 per minute;20 per hour".'
            ) from None
