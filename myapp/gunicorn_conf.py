"""gunicorn settings, installed with the package; each can be overridden from the
environment (or a ``.env`` file in the working folder).

From any folder, also from a wheel (README, "Deploying from a wheel")::

    flask --app myapp db upgrade     # migrations first, as their own step
    gunicorn -c python:myapp.gunicorn_conf 'myapp:create_app()'

The top-level ``gunicorn.conf.py`` of a checkout imports these settings.
"""

from __future__ import annotations

import os
import shutil
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
# The app's own line per request (REQUEST_LOG, on by default) carries what gunicorn's
# access log does and more: gunicorn's stays off unless asked for.
# (Read as myapp.config reads it: "" is false. A value it refuses stops on_starting.)
_app_logs_requests = os.environ.get("REQUEST_LOG", "true").strip().lower() in ("1", "true", "yes", "on")
accesslog = os.environ.get("GUNICORN_ACCESS_LOG", None if _app_logs_requests else "-")
preload_app = os.environ.get("GUNICORN_PRELOAD", "").lower() in ("1", "true", "yes")

# Prometheus metrics of every worker, summed, served by the master on their own port
# (README, "Operating it"); "" turns the exporter off. The folder must be named before
# any worker imports prometheus_client, so here, while the master reads its settings.
metrics_bind = os.environ.get("METRICS_BIND", "127.0.0.1:9200")
if metrics_bind:
    from myapp.exporter import name_folder

    metrics_folder, _made_metrics_folder = name_folder()


def on_starting(server: Any) -> None:
    # Refuse to start in one line when a setting is missing or invalid (SECRET_KEY),
    # instead of every worker failing to boot with a traceback.
    from myapp.config import ConfigError, check_settings

    try:
        check_settings()
    except ConfigError as error:
        raise SystemExit(f"Error: {error.format_message()}") from None
    if metrics_bind:
        from myapp.exporter import empty_folder, parse_bind

        try:
            parse_bind(metrics_bind)
        except ValueError as error:
            raise SystemExit(f"Error: {error}") from None
        empty_folder(metrics_folder)


def when_ready(server: Any) -> None:
    if metrics_bind:
        from myapp.exporter import serve

        try:
            serve(metrics_bind)
        except OSError as error:  # the port is taken: the site itself can still serve
            server.log.error("metrics not served on %s: %s", metrics_bind, error)


def on_exit(server: Any) -> None:
    if metrics_bind and _made_metrics_folder:
        shutil.rmtree(metrics_folder, ignore_errors=True)


def child_exit(server: Any, worker: Any) -> None:
    if metrics_bind:
        from myapp.exporter import forget_worker

        forget_worker(worker.pid)


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
