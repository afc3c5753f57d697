"""``GET /healthz``: myapp against bare Flask (issue 17, goal 1), served by gunicorn or in process.

``python -m bench.healthz [--in-process] [--base REV] [--repeats N] [--seconds S]``

Served (the default), with the project's ``gunicorn.conf.py`` (2 workers x 4 threads)
and ``bench/run.py``'s own ``start_server``: bare Flask (``bench.peers.bare``), myapp as
the bench serves it (``bench.project_wsgi``, CSRF off) and myapp as ``wsgi.py`` deploys
it (CSRF on, through ``bench.served_wsgi``). Each repeat loads every server in turn
with wrk (``BENCH_CONNECTIONS``, default 8), the order rotating; per server it prints
req/s and the workers' CPU time per request.

``--in-process``: the same apps, one process each (``bench/healthz_worker.py``), each
request through gunicorn's own parser, response and access log but without sockets,
threads or wrk; batches of 2,000 requests alternate between the processes. On this
shared machine the served CPU per request moves by 30 % between repeats; this one by a
few percent.

With ``--base REV`` the two myapp apps of that revision (extracted as
``bench/baseline.py`` does) run in the same repeats, for a before/after of one change.
The summary gives the medians of the per-repeat ratios to bare Flask (req/s: higher is
better; CPU: lower is better) and to the base twin. No database is needed: /healthz
touches none (the URL only has to parse).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from sqlalchemy.engine import make_url

from bench import loadgen
from bench.baseline import environment, extract, served_from
from bench.report import per_repeat_ratios
from bench.run import (
    ROOT, SECRET_KEY, Results, Server, log, measure_interleaved, postgres_server, start_server, stop_server,
)

PEER = "bare-flask"
ROUTE = loadgen.Route("healthz")
# name -> WSGI module; the same two for the checkout and for a --base tree
MYAPP = {"myapp": "bench.project_wsgi:app", "myapp-wsgi": "bench.served_wsgi:app"}
BATCH = 2000  # requests per in-process batch: about a third of a second of CPU


def sides(base: Path | None) -> list[tuple[str, str, Path | None]]:
    """(name, WSGI module, extracted tree or None for this checkout) of every app measured."""
    listed: list[tuple[str, str, Path | None]] = [(PEER, "bench.peers.bare:app", None)]
    for name, module in MYAPP.items():
        listed.append((name, module, None))
        if base is not None:
            listed.append((f"base-{name}", module, base))
    return listed


def start_all(folder: Path, base: Path | None) -> list[Server]:
    """Bare Flask, this checkout's myapp servers, and the base tree's (if any)."""
    url = make_url(postgres_server())
    return [start_server(name, module, url, folder, environment(tree) if tree else {}, cwd=tree or ROOT)
            for name, module, tree in sides(base)]


def check_trees(servers: list[Server], base: Path | None) -> None:
    """Each myapp-wsgi worker must have imported the myapp of its own tree."""
    for server in servers:
        if server.name.endswith("myapp-wsgi"):
            root = base if server.name.startswith("base-") and base is not None else ROOT
            wrong = {pid: path for pid, path in served_from(server).items()
                     if not Path(path).is_relative_to(root / "myapp")}
            if wrong:
                raise RuntimeError(f"{server.name} did not import myapp from {root}: {wrong}")


def summarise(results: Results, names: list[str]) -> None:
    """Medians of req/s, CPU per request, and of the per-repeat ratios to bare Flask
    (and of each checkout app to its --base twin)."""
    served = results.cells[0]["rps"] is not None
    print(f"\n{'app':16} {'req/s':>8} {'CPU µs/req':>11} {'req/s vs bare':>14} {'CPU vs bare':>12}")
    for name in names:
        cells = [c for c in results.cells if c["app"] == name]
        rps = f"{statistics.median(c['rps'] for c in cells):8.0f}" if served else f"{'-':>8}"
        line = f"{name:16} {rps} {statistics.median(c['cpu_us_per_request'] for c in cells):11.1f}"
        if name != PEER:
            line += f" {_ratios(results, name, PEER, served)}"
        print(line)
    for name in names:
        if f"base-{name}" in names:
            print(f"{name} / base-{name}: {_ratios(results, name, f'base-{name}', served)}")


def _ratios(results: Results, name: str, other: str, served: bool) -> str:
    by_cpu = per_repeat_ratios(results.cells, name, other, "healthz", "postgresql", "cpu_us_per_request")
    text = f"CPU per request {statistics.median(by_cpu):.3f}x (per repeat {', '.join(f'{r:.2f}' for r in by_cpu)})"
    if served:
        by_rps = per_repeat_ratios(results.cells, name, other, "healthz", "postgresql", "rps")
        text = f"req/s {statistics.median(by_rps):.3f}x (per repeat {', '.join(f'{r:.2f}' for r in by_rps)}); " + text
    return text


def run_served(repeats: int, seconds: float, base: Path | None) -> None:
    results = Results()
    with tempfile.TemporaryDirectory(prefix="myapp-healthz-") as logs:
        servers = start_all(Path(logs), base)
        try:
            check_trees(servers, base)
            for server in servers:
                loadgen.run(server.url, ROUTE, 1, 8)  # warm up
            measure_interleaved(results, "postgresql", servers, ROUTE, repeats, seconds)
        finally:
            for server in servers:
                stop_server(server)
    summarise(results, [server.name for server in servers])


def run_in_process(batches: int, base: Path | None) -> None:
    """One worker process per app; their batches alternate, the order rotating."""
    results, workers = Results(), {}
    environ = {**os.environ, "SECRET_KEY": SECRET_KEY, "DATABASE_URL": postgres_server()}
    try:
        for name, module, tree in sides(base):
            path = environment(tree) if tree else {"PYTHONPATH": str(ROOT)}
            workers[name] = subprocess.Popen(
                [sys.executable, "-m", "bench.healthz_worker", module], cwd=tree or ROOT, env={**environ, **path},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
            imported = Path(workers[name].stdout.readline().strip())  # type: ignore[union-attr]
            if not imported.is_relative_to((tree or ROOT) / "myapp"):
                raise RuntimeError(f"{name} imported {imported}, not the myapp of {tree or ROOT}")
        for batch in range(batches):
            order = list(workers)
            for name in order[batch % len(order):] + order[:batch % len(order)]:
                workers[name].stdin.write(f"{BATCH}\n")  # type: ignore[union-attr]
                workers[name].stdin.flush()  # type: ignore[union-attr]
                cpu = float(workers[name].stdout.readline())  # type: ignore[union-attr]
                results.cells.append({"backend": "postgresql", "app": name, "route": "healthz", "repeat": batch,
                                      "rps": None, "cpu_us_per_request": cpu})
    finally:
        for worker in workers.values():
            worker.stdin.close()  # type: ignore[union-attr]
            worker.wait(30)
    summarise(results, list(workers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-process", action="store_true", help="through gunicorn's code, no sockets (steadier)")
    parser.add_argument("--repeats", type=int, default=7, help="served repeats, or in-process batches (x3)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per served cell")
    parser.add_argument("--base", help="a git revision to measure alongside, for a before/after")
    options = parser.parse_args()

    def measure_all(base: Path | None) -> None:
        if options.in_process:
            run_in_process(3 * options.repeats, base)
        else:
            run_served(options.repeats, options.seconds, base)

    if options.base is None:
        measure_all(None)
        return
    with tempfile.TemporaryDirectory(prefix="myapp-healthz-base-") as extracted:
        commit = extract(options.base, Path(extracted))
        log(f"base {options.base} = {commit[:7]} in {extracted}")
        measure_all(Path(extracted))


if __name__ == "__main__":
    main()
