"""gunicorn settings, installed with the package; each can be overridden from the
environment (or a ``.env`` file in the working folder).

From any folder, also from a wheel (README, "Deploying from a wheel")::

    flask --app myapp db upgrade     # migrations first, as their own step
    gunicorn -c python:myapp.gunicorn_conf 'myapp:create_app()'

The top-level ``gunicorn.conf.py`` of a checkout imports these settings.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from dotenv import find_dotenv, load_dotenv

# The working folder's .env, as the flask command reads it; this file's own folder
# is site-packages in a wheel deploy.
load_dotenv(find_dotenv(usecwd=True))

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
# Keep threads <= DATABASE_POOL_SIZE so that no thread waits for a connection.
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
# The bulkhead: at most threads - 1 of them wait on the database, so one is always free
# for /healthz (and for any page that needs no database) when the database hangs.
os.environ.setdefault("DATABASE_BULKHEAD", str(max(1, threads - 1)))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = 20
accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "-")
preload_app = os.environ.get("GUNICORN_PRELOAD", "").lower() in ("1", "true", "yes")


def on_starting(server: Any) -> None:
    # Refuse to start in one line when a setting is missing or invalid (SECRET_KEY),
    # instead of every worker failing to boot with a traceback.
    from myapp.config import ConfigError, check_settings

    try:
        check_settings()
    except ConfigError as error:
        raise SystemExit(f"Error: {error.format_message()}") from None


def post_fork(server: Any, worker: Any) -> None:
    # Pooled connections must never cross a fork (myapp.db.engines also registers an
    # os.register_at_fork hook; this makes the rule visible where workers are made).
    # Only a preloaded app can have any, and importing myapp here, before the worker
    # installs its signal handlers, would let a SIGTERM in that window get lost.
    # (Loading this module imports the bare myapp package, never myapp.db.engines.)
    engine = sys.modules.get("myapp.db.engines")
    if engine is not None:
        engine.forget_inherited_connections()


def worker_exit(server: Any, worker: Any) -> None:
    # Close pooled connections so the database does not wait for them to time out.
    from myapp.db.engines import dispose_all_engines

    dispose_all_engines()
