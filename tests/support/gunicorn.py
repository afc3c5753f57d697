"""Real gunicorn workers serving the project's ``gunicorn.conf.py`` on a loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from .apps import SECRET_KEY
from .network import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
GUNICORN = Path(sys.executable).with_name("gunicorn")


class Server:
    """A running gunicorn: its process, its base URL, the file it logs to, and the
    master's metrics address (empty when the test turned the exporter off)."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path, metrics_url: str = "") -> None:
        self.process, self.url, self.log, self.metrics_url = process, url, log, metrics_url

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_gunicorn(database_url: str, tmp_path: Path, app: str = "wsgi:app", config: str = "gunicorn.conf.py",
                   **env: str) -> Server:
    """Start gunicorn with the project's gunicorn.conf.py on ``app`` (the fault suite
    serves its test-only apps this way) and wait until it answers. ``config`` names
    another settings file, relative to the checkout (a negative control's)."""
    port = free_port()
    log = tmp_path / f"gunicorn-{port}.log"
    # Servers run side by side: each master serves its metrics on a port of its own.
    env.setdefault("METRICS_BIND", f"127.0.0.1:{free_port()}")
    environment = {
        **os.environ,
        "DATABASE_URL": database_url,
        "SECRET_KEY": SECRET_KEY,
        "FLASK_DEBUG": "0",
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "2",
        "GUNICORN_THREADS": "4",
        **env,
    }
    with log.open("wb") as sink:  # a file, not a pipe: nothing can block on a full pipe
        process = subprocess.Popen(
            # No control socket: gunicorn 27 puts it at one path in $HOME, which test
            # servers running side by side would fight over.
            [str(GUNICORN), "-c", config, "--no-control-socket", app],
            cwd=ROOT, env=environment, stdout=sink, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    metrics_bind = environment["METRICS_BIND"]
    server = Server(process, f"http://127.0.0.1:{port}", log, f"http://{metrics_bind}/metrics" if metrics_bind else "")
    try:
        wait_until_serving(server)
    except BaseException:
        stop_gunicorn(server)  # never leave a server behind a failed start
        raise
    return server


def wait_until_serving(server: Server, seconds: float = 60) -> None:
    """Poll /healthz; on a loaded machine a worker can take seconds to import the app."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"gunicorn exited with {server.process.returncode}:\n{server.log_text()}")
        try:
            if requests.get(f"{server.url}/healthz", timeout=5).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.1)
    raise AssertionError(f"gunicorn did not answer within {seconds:.0f} s:\n{server.log_text()}")


def stop_gunicorn(server: Server) -> None:
    """A graceful stop (SIGTERM), and a kill if the workers have not left in 30 s."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
