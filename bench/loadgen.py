"""Load on loopback, bounded in time: wrk (Debian's package) with ``wrk/route.lua``, or,
when wrk is missing, a small thread-per-connection Python client with the same
routes, the same random ids and the same result fields."""

from __future__ import annotations

import http.client
import json
import random
import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

LUA = Path(__file__).resolve().parent / "wrk" / "route.lua"
FORM_BODY = "title=Bench+post&body=Written+by+wrk"


@dataclass
class Route:
    name: str
    max_id: int = 10_000  # /posts/<random 1..max_id>
    pages: int = 500  # /?page=<random 1..pages>
    cookie: str = ""  # signed session cookie of a logged-in user, for "create"


@dataclass
class Sample:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def tool() -> str:
    return "wrk" if shutil.which("wrk") else "python"


def run(url: str, route: Route, seconds: float, connections: int) -> Sample:
    """Hammer ``url`` on one route for ``seconds`` with ``connections`` keep-alive connections."""
    if tool() == "wrk":
        return _run_wrk(url, route, seconds, connections)
    return _run_python(url, route, seconds, connections)


def _run_wrk(url: str, route: Route, seconds: float, connections: int) -> Sample:
    command = [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s", "-s", str(LUA), url,
        "--", route.name, str(route.max_id), str(route.pages), route.cookie,
    ]
    output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("BENCH "))
    data = json.loads(line[len("BENCH "):])
    return Sample(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        errors=data["errors"],
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
    )


def _path(route: Route, rng: random.Random) -> tuple[str, str]:
    if route.name == "post":
        return "GET", f"/posts/{rng.randint(1, route.max_id)}"
    if route.name == "index":
        return "GET", f"/?page={rng.randint(1, route.pages)}"
    if route.name == "create":
        return "POST", "/posts/new"
    return "GET", "/healthz"


def _run_python(url: str, route: Route, seconds: float, connections: int) -> Sample:
    parts = urlsplit(url)
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"session={route.cookie}"}

    def client(seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
        mine: list[float] = []
        failed = 0
        while time.perf_counter() < deadline:
            method, path = _path(route, rng)
            started = time.perf_counter()
            try:
                if method == "POST":
                    conn.request(method, path, body=FORM_BODY, headers=headers)
                else:
                    conn.request(method, path)
                response = conn.getresponse()
                response.read()
                if response.status >= 400:
                    failed += 1
            except (OSError, http.client.HTTPException):
                failed += 1
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
                continue
            mine.append(time.perf_counter() - started)
        conn.close()
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies) or [0.0]
    return Sample(
        requests=len(latencies),
        seconds=elapsed,
        errors=errors[0],
        p50_ms=statistics.median(ordered) * 1000,
        p99_ms=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
    )
