"""``GET /healthz`` served by gunicorn: myapp against bare Flask (issue 17, goal 1).

``python -m bench.healthz [--base REV] [--repeats N] [--seconds S]``

Serves, with the project's ``gunicorn.conf.py`` (2 workers x 4 threads) and
``bench/run.py``'s own ``start_server``: bare Flask (``bench.peers.bare``), myapp as the
bench serves it (``bench.project_wsgi``, CSRF off) and myapp as ``wsgi.py`` deploys it
(CSRF on, through ``bench.served_wsgi``). With ``--base REV`` the two myapp servers of
that revision (extracted as ``bench/baseline.py`` does) run in the same repeats, for a
before/after of one change. Each repeat loads every server in turn with wrk, the
order rotating (wrk: ``BENCH_CONNECTIONS``, default 8); per server it prints req/s and the workers' CPU time per request, then
the medians of the per-repeat ratios to bare Flask (req/s: higher is better; CPU:
lower is better). No database is needed: /healthz touches none (the URL only has to
parse).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from sqlalchemy.engine import make_url

from bench import loadgen
from bench.baseline import environment, extract, served_from
from bench.report import per_repeat_ratios
from bench.run import ROOT, Results, Server, log, measure, postgres_server, start_server, stop_server

PEER = "bare-flask"
ROUTE = loadgen.Route("healthz")
# name -> WSGI module; the same two for the checkout and for a --base tree
MYAPP = {"myapp": "bench.project_wsgi:app", "myapp-wsgi": "bench.served_wsgi:app"}


def start_all(folder: Path, base: Path | None) -> list[Server]:
    """Bare Flask, this checkout's myapp servers, then the base tree's (if any)."""
    url = make_url(postgres_server())
    servers = [start_server(PEER, "bench.peers.bare:app", url, folder, {})]
    for name, module in MYAPP.items():
        servers.append(start_server(name, module, url, folder, {}))
        if base is not None:
            servers.append(start_server(f"base-{name}", module, url, folder, environment(base), cwd=base))
    return servers


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
    """Medians of req/s, CPU per request, and of the per-repeat ratios to bare Flask."""
    print(f"\n{'app':16} {'req/s':>8} {'CPU µs/req':>11} {'req/s vs bare':>14} {'CPU vs bare':>12}")
    for name in names:
        cells = [c for c in results.cells if c["app"] == name]
        rps = statistics.median(c["rps"] for c in cells)
        cpu = statistics.median(c["cpu_us_per_request"] for c in cells)
        line = f"{name:16} {rps:8.0f} {cpu:11.1f}"
        if name != PEER:
            by_rps = per_repeat_ratios(results.cells, name, PEER, "healthz", "postgresql", "rps")
            by_cpu = per_repeat_ratios(results.cells, name, PEER, "healthz", "postgresql", "cpu_us_per_request")
            line += f" {statistics.median(by_rps):13.3f}x {statistics.median(by_cpu):11.3f}x"
            line += f"   (req/s ratios {', '.join(f'{r:.2f}' for r in by_rps)})"
        print(line)


def run(repeats: int, seconds: float, base: Path | None) -> None:
    results = Results()
    with tempfile.TemporaryDirectory(prefix="myapp-healthz-") as logs:
        servers = start_all(Path(logs), base)
        try:
            check_trees(servers, base)
            for server in servers:
                loadgen.run(server.url, ROUTE, 1, 8)  # warm up
            for repeat in range(repeats):
                shift = repeat % len(servers)
                for server in servers[shift:] + servers[:shift]:
                    measure(results, "postgresql", server, ROUTE, repeat, seconds)
        finally:
            for server in servers:
                stop_server(server)
    summarise(results, [server.name for server in servers])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--base", help="a git revision to serve alongside, for a before/after")
    options = parser.parse_args()
    if options.base is None:
        run(options.repeats, options.seconds, None)
        return
    with tempfile.TemporaryDirectory(prefix="myapp-healthz-base-") as extracted:
        commit = extract(options.base, Path(extracted))
        log(f"base {options.base} = {commit[:7]} in {extracted}")
        run(options.repeats, options.seconds, Path(extracted))


if __name__ == "__main__":
    main()
