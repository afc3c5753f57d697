"""Gunicorn for the fault suite: the site or a fault app, started once all its workers boot.

The throwaway database servers the fault tests break are in tests/support/servers.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
from sqlalchemy.engine import URL

from tests.support.gunicorn import Server, start_gunicorn, stop_gunicorn
from tests.support.servers import START_TIMEOUT


@contextmanager
def gunicorn(
    database_url: URL | str, workdir: Path, *, fault_app: bool = False, app: str | None = None,
    config: str = "gunicorn.conf.py", **env: str
) -> Iterator[Server]:
    """Real gunicorn workers (``gunicorn.conf.py``) on ``database_url``, stopped at the end.

    With ``fault_app`` they serve ``tests.faults.slowapp:app`` instead of ``wsgi:app``;
    ``app`` names any other target, ``config`` another gunicorn settings file. A URL
    string is passed as it is (a libpq multi-host URL, say).
    Waits until every worker has booted, not just the first to answer.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    target = app or ("tests.faults.slowapp:app" if fault_app else "wsgi:app")
    rendered = database_url if isinstance(database_url, str) else database_url.render_as_string(hide_password=False)
    server = start_gunicorn(rendered, workdir, app=target, config=config, **env)
    try:
        _wait_for_workers(server, int(env.get("WEB_CONCURRENCY", "2")))
        yield server
    finally:
        stop_gunicorn(server)


def _wait_for_workers(server: Server, workers: int) -> None:
    """Wait until gunicorn answers and has booted all its workers."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"gunicorn exited with {server.process.returncode}:\n{server.log_text()}")
        booted = server.log_text().count("Booting worker with pid")
        try:
            if booted >= workers and requests.get(f"{server.url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gunicorn did not answer within {START_TIMEOUT} s:\n{server.log_text()}")
