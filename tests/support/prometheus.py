"""A throwaway Prometheus server (Debian's /usr/bin/prometheus) that scrapes what a test names.

Why a real server: issue 18 asks to see the series an operator graphs and alerts on move
in Prometheus itself (its scrape of the exposition format, its staleness handling, PromQL
over what it stored), not only in the text of a /metrics page. Each server is the test's
own: its configuration, storage and log in a temporary folder, a free loopback port, one
scrape a second. It is stopped by its PID and its folder removed, whatever happens.

Clocks: ``at``, ``start`` and ``end`` of a query are Unix seconds, as Prometheus counts.
``wait_until`` measures from a ``time.monotonic()`` value, as the fault tests note their
events (``cut_at``, ``healed_at``); ``wall_clock`` turns such a value into Unix seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from tests.topology.netns import wait_for

from .network import free_port

BINARY = Path("/usr/bin/prometheus")
READY_TIMEOUT = 30.0  # ready in about a second; every target scraped once in about 6 (see _scraped_all)
HTTP_TIMEOUT = 10.0
STOP_TIMEOUT = 30.0

Labels = dict[str, str]
Point = tuple[float, float]  # (Unix seconds, value)


class PrometheusError(RuntimeError):
    """The server refused a query (bad PromQL, a result of a kind we do not read)."""


def available() -> bool:
    """True when the server binary is here; tests pass this to their skip-or-fail check."""
    return os.access(BINARY, os.X_OK)


def wall_clock(monotonic: float) -> float:
    """Unix seconds of a past ``time.monotonic()`` reading, to query around a fault test's events."""
    return time.time() - (time.monotonic() - monotonic)


def _duration(seconds: float) -> str:
    """Prometheus durations take units, not fractions: 0.5 s is written 500ms."""
    return f"{round(seconds * 1000)}ms"


def scrape_config(targets: Sequence[str], scrape_interval: float, job: str) -> dict[str, Any]:
    """One job over static ``host:port`` targets, scraped at /metrics every ``scrape_interval``.

    The timeout equals the interval: Prometheus refuses a timeout longer than it."""
    every = _duration(scrape_interval)
    return {
        "global": {"scrape_interval": every, "scrape_timeout": every, "evaluation_interval": every},
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": list(targets)}]},
        ],
    }


class Prometheus:
    """One server process. Use :func:`prometheus`, which stops it and removes its folder."""

    def __init__(self, root: Path, targets: Sequence[str], scrape_interval: float, job: str) -> None:
        self.root = root
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.job = job
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Write the configuration (JSON is YAML, so no YAML library), start, and wait until
        ready and every target has been scraped once (bounded)."""
        config = self.root / "prometheus.yml"
        config.write_text(json.dumps(scrape_config(self.targets, self.scrape_interval, self.job)))
        command = [
            str(BINARY), f"--config.file={config}", f"--storage.tsdb.path={self.root / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=info",
        ]
        with self.log.open("ab") as sink:  # a file, never a pipe that could fill up
            self.process = subprocess.Popen(command, cwd=self.root, stdin=subprocess.DEVNULL,
                                            stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_for(self._ready, READY_TIMEOUT, "prometheus to be ready", interval=0.1)
            wait_for(self._scraped_all, READY_TIMEOUT, "prometheus to scrape every target", interval=0.1)
        except TimeoutError as error:
            self.stop()
            raise AssertionError(f"{error}:\n{self.log_tail()}") from None

    def _ready(self) -> bool:
        """/-/ready answers 200 once storage is open and the first configuration loaded."""
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.log_tail()}")
        try:
            return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def _scraped_all(self) -> bool:
        """Every target tried once, so that ``up`` has a value (0 or 1) for each. Ready is
        not enough: the discovery manager hands targets over about 5 s after the start."""
        active = self._api("targets", state="active")["activeTargets"]
        tried = {target["labels"]["instance"] for target in active if target["health"] != "unknown"}
        return tried >= set(self.targets)

    def stop(self) -> None:
        """SIGTERM to its PID (it closes its storage and exits), SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- queries --------------------------------------------------------------------

    def _api(self, path: str, **params: Any) -> dict[str, Any]:
        """GET one HTTP API endpoint; its ``data``, or PrometheusError with the server's reason."""
        response = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=HTTP_TIMEOUT)
        try:
            body = response.json()
        except ValueError:
            raise PrometheusError(f"{path} answered {response.status_code}: {response.text[:200]}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"{params.get('query')!r}: {body.get('errorType')}: {body.get('error')}")
        data: dict[str, Any] = body["data"]
        return data

    def query(self, expr: str, at: float | None = None) -> list[tuple[Labels, float]]:
        """An instant query: (labels, value) per series; a scalar comes as one series with no labels."""
        data = self._api("query", query=expr, **({} if at is None else {"time": at}))
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr!r} gave a {data['resultType']}, not an instant vector or a scalar")
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The one value of ``expr`` (wrap it in sum() or the like), None while it has no series."""
        result = self.query(expr, at)
        if len(result) > 1:
            raise PrometheusError(f"{expr!r} has {len(result)} series, not one: {[labels for labels, _ in result]}")
        return result[0][1] if result else None

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[tuple[Labels, list[Point]]]:
        """A range query from ``start`` to ``end`` (Unix seconds): (labels, [(time, value), ...]) per series."""
        data = self._api("query_range", query=expr, start=start, end=end, step=step)
        return [(item["metric"], [(float(t), float(v)) for t, v in item["values"]]) for item in data["result"]]

    def wait_until(self, expr: str, predicate: Callable[[float | None], bool], since: float,
                   timeout: float, interval: float = 0.25) -> float | None:
        """Poll ``value(expr)`` until ``predicate`` holds; the seconds from ``since`` (a
        ``time.monotonic()`` reading) to the poll that saw it, or None after ``timeout``.

        The figure includes up to one scrape interval and one poll: a bound, not an instant."""
        try:
            wait_for(lambda: predicate(self.value(expr)), timeout, f"{expr!r} to hold", interval=interval)
        except TimeoutError:
            return None
        return time.monotonic() - since


@contextmanager
def prometheus(targets: Sequence[str], *, scrape_interval: float = 1.0, job: str = "myapp") -> Iterator[Prometheus]:
    """A ready server that has scraped ``targets`` (``host:port``) at /metrics once; stopped
    by its PID and removed at the end. A target nobody serves yet is fine: ``up`` is 0."""
    if not available():
        raise FileNotFoundError(f"{BINARY}: apt-get install prometheus (its own service need not run)")
    root = Path(tempfile.mkdtemp(prefix="myapp-prometheus-"))
    server = Prometheus(root, targets, scrape_interval, job)
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
