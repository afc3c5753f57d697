"""Flame graphs of one route as gunicorn serves it: py-spy on every worker under load.

    python -m bench.flame [--app myapp|fsa|psycopg|bare|obs-on|obs-off|obs-off-no-log]
                          [--route post|index|healthz|create] [--rev GITREV] [--seconds 20]
                          [--rate 200] [--all-active] [--inclusive TEXT ...] [--label NAME]

``make bench-flame FLAME_ARGS='...'`` runs it. Issue 17: profile the served post page
before optimising it. The app is served exactly as ``make bench`` serves it (the
project's ``gunicorn.conf.py``, 2 workers x 4 threads, on a seeded throwaway PostgreSQL
database: ``bench/run.py``); ``--rev`` serves that git revision of myapp instead, extracted
and checked the way ``bench/baseline.py`` serves its baseline (its ``wsgi.py`` as is).

After a warm-up the route is loaded (wrk, or ``bench/loadgen.py``'s client) while one
``py-spy record --format raw`` per worker samples it: by default only the thread holding
the GIL, so the samples show where the workers' Python code spends CPU (py-spy's own idle
test counts threads waiting for the database as busy; ``--all-active`` keeps it). The
workers' stacks are merged into ``docs/flame/<label>.svg`` (``bench/flamegraph.py``) and ``docs/flame/<label>.md``:
requests, worker CPU per request (from /proc) and the costs by layer and by function, and
with ``--inclusive TEXT`` the samples whose stack passes through a frame naming TEXT.
The ``obs-*`` apps are ``bench/observability.py``'s variants (issue 18's request line and
metrics on, off, off without any access log), served with their settings.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url

from bench import loadgen
from bench.baseline import MODULE, changed_here, checked_imports, describe, environment, extract
from bench.flamegraph import render
from bench.run import (
    APPS, DATABASE, ROOT, THREADS, WORKERS, Results, Seeded, Server, delete_bench_posts, log, measure,
    migrate_and_seed, postgres_server, reachable, routes_for, start_server, stop_server, throwaway_database,
    traceback_notes,
)
from bench.stacks import LAYER_NAMES, Stack, by_layer, fold, inclusive, layer_of, merge, self_time

OUT = ROOT / "docs" / "flame"
CHOICES = {"myapp": "myapp", "fsa": "flask-sqlalchemy", "psycopg": "psycopg", "bare": "bare-flask"}
OBSERVED = {"obs-on": "on", "obs-off": "off", "obs-off-no-log": "off-no-log"}  # bench/observability.py's VARIANTS
TOP_FUNCTIONS = 15


@dataclass
class Options:
    app: str
    route: str
    rev: str | None
    seconds: float
    rate: int
    gil: bool
    label: str
    argv: list[str]
    inclusive: tuple[str, ...] = ()


@dataclass
class Recording:
    """What one profiled window gave: merged stacks, busy samples per worker, seconds
    sampled, and the load's cell (requests, req/s, worker CPU) as ``bench/run.py`` measures it."""

    stacks: Counter[Stack]
    busy: dict[int, int]
    seconds: float
    cell: dict[str, Any]
    lags: list[str]  # py-spy's warnings that it fell behind its rate


def parse(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.flame", description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", choices=sorted([*CHOICES, *OBSERVED]), default="myapp")
    parser.add_argument("--route", choices=("post", "index", "healthz", "create"), default="post")
    parser.add_argument("--rev", help="serve this git revision of myapp (extracted as bench/baseline.py does)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the profiled load (20)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second per worker (200)")
    parser.add_argument("--all-active", action="store_true",
                        help="sample every thread py-spy deems active (its default), not only the GIL holder")
    parser.add_argument("--label", help="output name under docs/flame/ (default <route>-<app>)")
    parser.add_argument("--inclusive", action="append", default=[], metavar="TEXT",
                        help="also count the samples whose stack passes through a frame naming TEXT (a file such "
                             "as myapp/observability.py, or a function); repeatable")
    args = parser.parse_args(argv)
    if args.rev and args.app != "myapp":
        parser.error("--rev serves a revision of myapp: use it with --app myapp")
    if args.rev and args.route == "create":
        parser.error("--rev serves that revision's wsgi.py as is, CSRF on: create would only measure refusals")
    label = args.label or f"{args.route}-{args.app}" + (f"-{args.rev}" if args.rev else "")
    if not re.fullmatch(r"[\w.-]+", label):
        parser.error(f"--label {label!r}: letters, digits, '.', '-' and '_' only")
    return Options(args.app, args.route, args.rev, args.seconds, args.rate, not args.all_active, label, argv,
                   tuple(args.inclusive))


def _head() -> dict[str, Any]:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    return {**describe(commit), "uncommitted_changes": changed_here()}


@contextmanager
def served(options: Options, url: URL, folder: Path) -> Iterator[tuple[Server, dict[str, Any]]]:
    """The chosen app under gunicorn, and a description of the code it runs; stopped at the end."""
    if options.rev is None:
        if options.app in OBSERVED:
            from bench.observability import MODULE as OBSERVED_MODULE
            from bench.observability import VARIANTS

            module, extra = OBSERVED_MODULE, VARIANTS[OBSERVED[options.app]]
        else:
            module, _, extra = APPS[CHOICES[options.app]]
        server = start_server(options.app, module, url, folder, extra, tag="flame-")
        try:
            yield server, _head()
        finally:
            stop_server(server)
        return
    with tempfile.TemporaryDirectory(prefix="myapp-flame-") as extracted:
        tree = Path(extracted)
        source = {**describe(extract(options.rev, tree)), "revision": options.rev}
        server = start_server(f"myapp-{source['short']}", MODULE, url, folder, environment(tree), tag="flame-", cwd=tree)
        try:
            checked_imports(server, tree)
            yield server, source
        finally:
            stop_server(server)


def py_spy() -> str:
    """The venv's py-spy (the bench extras install it), else one on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy is missing: pip install -e '.[bench]' (make bench-flame does)")
    return found


def start_spy(pid: int, options: Options, folder: Path) -> subprocess.Popen[bytes]:
    """``py-spy record`` on one worker until interrupted; ``--function`` gives a function one
    frame name whatever line it is on. Blocking mode: a stack read while the worker runs
    can be torn (seen with ``--nonblocking``), and the pause costs the worker no CPU time."""
    command = [py_spy(), "record", "--pid", str(pid), "--rate", str(options.rate), "--format", "raw", "--function",
               "--output", str(folder / f"{pid}.txt"), *(["--gil"] if options.gil else [])]
    with (folder / f"{pid}.log").open("wb") as sink:
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_sampling(pid: int, spy: subprocess.Popen[bytes], folder: Path, timeout: float = 20) -> None:
    """Return once py-spy says it samples ``pid``; refuse if it exits or stays silent."""
    deadline = time.monotonic() + timeout
    log_file = folder / f"{pid}.log"
    while "Sampling process" not in log_file.read_text(errors="replace"):
        if spy.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"py-spy did not attach to worker {pid}:\n{log_file.read_text(errors='replace')}")
        time.sleep(0.05)


def stop_spy(pid: int, spy: subprocess.Popen[bytes], folder: Path) -> None:
    """Interrupt py-spy, which then writes its file; refuse if it wrote none."""
    if spy.poll() is None:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    if not (folder / f"{pid}.txt").exists():
        spy_log = (folder / f"{pid}.log").read_text(errors="replace")
        raise RuntimeError(f"py-spy wrote no stacks for worker {pid}:\n{spy_log}")


def record(server: Server, route: loadgen.Route, options: Options, folder: Path) -> Recording:
    """Load ``route`` for the chosen seconds with every worker sampled, then gather the stacks."""
    spies = {worker.pid: start_spy(worker.pid, options, folder) for worker in server.workers()}
    measured = Results()
    try:
        for pid, spy in spies.items():
            wait_sampling(pid, spy, folder)
        started = time.monotonic()
        measure(measured, "postgresql", server, route, 0, options.seconds)
    finally:
        for pid, spy in spies.items():
            stop_spy(pid, spy, folder)
    sampled = time.monotonic() - started
    per_worker = {pid: fold((folder / f"{pid}.txt").read_text().splitlines()) for pid in spies}
    lags = [f"py-spy on worker {pid}: {line.strip()}" for pid in spies
            for line in (folder / f"{pid}.log").read_text(errors="replace").splitlines() if "behind" in line]
    busy = {pid: sum(stacks.values()) for pid, stacks in per_worker.items()}
    return Recording(merge(per_worker.values()), busy, sampled, measured.cells[-1], lags[:10])


def warm_up(server: Server, route: loadgen.Route, seeded: Seeded) -> None:
    """Three seconds of the route: imports, connections, statement caches, template caches."""
    loadgen.run(server.url, route, 3, int(os.environ.get("BENCH_CONNECTIONS", "8")))
    if route.name == "create":
        delete_bench_posts(seeded)


def profile(options: Options) -> tuple[Recording, dict[str, Any], list[str]]:
    """Seed, serve, warm up and record: the profile, the served code and the server's notes."""
    server_url = postgres_server()
    if not reachable(server_url):
        raise SystemExit(f"PostgreSQL is not reachable at {make_url(server_url)!r}: set BENCH_POSTGRES_URL")
    with tempfile.TemporaryDirectory(prefix="myapp-flame-logs-") as logs, \
            throwaway_database("postgresql", server_url, name=f"{DATABASE}_flame") as url:
        folder = Path(logs)
        log("PostgreSQL: migrating and seeding 1,000 users and 10,000 posts")
        seeded = migrate_and_seed(url)
        route = routes_for(seeded)[options.route]
        with served(options, url, folder) as (server, source):
            warm_up(server, route, seeded)
            log(f"{server.name} {route.name}: {options.seconds:g} s of load, py-spy on {len(server.workers())} workers")
            recording = record(server, route, options, folder)
        if route.name == "create":
            delete_bench_posts(seeded)
        notes = traceback_notes(folder)
    return recording, source, notes


def layer_table(stacks: Counter[Stack]) -> list[str]:
    """The share of samples by layer, largest first (layers without samples left out)."""
    layers, total = by_layer(stacks), max(sum(stacks.values()), 1)
    rows = ["| layer | samples | share |", "|---|---:|---:|"]
    for name in sorted(LAYER_NAMES, key=lambda name: -layers[name]):
        if layers[name]:
            rows.append(f"| {name} | {layers[name]} | {100 * layers[name] / total:.1f} % |")
    return rows


def function_table(stacks: Counter[Stack]) -> list[str]:
    """The functions the samples ended in most often (their own code, callees excluded)."""
    functions, total = self_time(stacks), max(sum(stacks.values()), 1)
    rows = ["| function (file) | layer | self samples | share |", "|---|---|---:|---:|"]
    for name, count in functions.most_common(TOP_FUNCTIONS):
        cell = name.replace("|", "\\|")
        rows.append(f"| `{cell}` | {layer_of(name)} | {count} | {100 * count / total:.1f} % |")
    return rows


def inclusive_table(stacks: Counter[Stack], parts: tuple[str, ...]) -> list[str]:
    """For each of ``parts``, the samples whose stack passes through a frame naming it."""
    total = max(sum(stacks.values()), 1)
    rows = ["| frames naming | samples (with callees) | share |", "|---|---:|---:|"]
    for part in parts:
        count = inclusive(stacks, part)
        rows.append(f"| `{part.replace('|', chr(92) + '|')}` | {count} | {100 * count / total:.1f} % |")
    return rows


def header(options: Options, recording: Recording, source: dict[str, Any], load: list[list[float]]) -> list[str]:
    """What was served and measured, for the summary's first lines."""
    cell, busy, workers = recording.cell, sum(recording.busy.values()), len(recording.busy)
    threads = busy / max(options.rate * recording.seconds * workers, 1)
    cores = cell["worker_cpu_s"] / max(cell["seconds"] * workers, 1e-9)
    code = f"`{source['short']}` ({source['subject']})"
    if source.get("uncommitted_changes"):
        code += ", with uncommitted changes to the served files"
    return [
        f"# Flame graph: {options.app}, {options.route} route (`{options.label}`)", "",
        f"![flame graph of {options.label}]({options.label}.svg)", "",
        f"- Command: `{' '.join(['python -m bench.flame', *options.argv])}`",
        f"- Served code: {code}" + (f", revision `{options.rev}`" if options.rev else ""),
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average at start and end "
        f"{load[0]} / {load[1]} (2 cores, shared)",
        f"- Served by gunicorn with the project's gunicorn.conf.py, {WORKERS} workers x {THREADS} threads, "
        f"on a seeded PostgreSQL database; {loadgen.tool()} with {os.environ.get('BENCH_CONNECTIONS', '8')} "
        f"connections for {options.seconds:g} s after a 3 s warm-up",
        f"- Requests: {cell['requests']} ({cell['errors']} errors), {cell['rps']:.0f} req/s while profiled; "
        f"worker CPU {cell['cpu_us_per_request']} µs per request (user + system, /proc)",
        f"- Samples: {busy} busy thread samples from {workers} workers, py-spy at {options.rate} Hz for "
        f"{recording.seconds:.1f} s: {threads:.2f} busy threads per worker on average",
        f"- Sampled: {SAMPLED[options.gil]}",
        *([f"- Coverage: the samples hold the GIL {threads:.2f} of the time per worker (at the nominal rate), "
           f"the workers used {cores:.2f} of a core each (/proc): the rest is system time and C code that runs "
           "without the GIL (socket reads and writes, libpq), which Python stacks cannot place, plus ticks "
           "py-spy missed on this loaded machine (see the notes)"] if options.gil else []),
    ]


SAMPLED = {
    True: "only the thread holding the GIL at each tick (`py-spy --gil`, this script's default): the Python "
          "code that runs, which is where a worker's Python CPU goes. py-spy's own idle exclusion was tried "
          "first and counts waiting threads as busy here (psycopg's `Connection.wait` for the database's "
          "reply, gunicorn's `select`, `Condition.wait` in the thread pool: half the samples), so it is "
          "`--all-active`, not the default.",
    False: "every thread py-spy deems active (`--all-active`: py-spy's default, idle threads excluded by "
           "their OS state). On gunicorn's gthread workers this counts threads waiting for the database, "
           "for `select` or for the thread pool as busy: read the shares as busy-or-waiting time, not CPU.",
}


EXPLAIN = [
    "", "## How to read", "",
    "- Layer: each sample is charged to the innermost frame of its stack that belongs to a named package "
    "group; standard-library frames (socket, re, datetime, threading...) count for the named code that "
    "called them. So the layer table is self time by layer, and it sums to 100 %. \"other\" holds stacks "
    "with no named frame at all.",
    "- Top functions: the frame each sample ended in, whatever its package (stdlib frames appear here under "
    "their own name); a function's callees are not in its count.",
    "- py-spy sees Python frames only: time inside a C extension (psycopg's binary module, SQLAlchemy's "
    "Cython helpers, MarkupSafe's speedups) counts for the Python function that called it.",
    "- The SVG: boxes coloured by layer, root at the bottom; hover a box for its frame and samples.",
]


def summary(options: Options, recording: Recording, source: dict[str, Any], load: list[list[float]],
            notes: list[str]) -> str:
    lines = header(options, recording, source, load)
    mode = "GIL holder" if options.gil else "active threads"
    lines += ["", f"## Top costs by layer (self time, {mode})", "", *layer_table(recording.stacks)]
    lines += ["", f"## Top {TOP_FUNCTIONS} functions by self time", "", *function_table(recording.stacks)]
    if options.inclusive:
        lines += ["", "## Inclusive samples of chosen code (its callees included)", "",
                  *inclusive_table(recording.stacks, options.inclusive)]
    lines += EXPLAIN
    notes = recording.lags + notes
    lines += ["", "## Notes", "", *(f"- {note}" for note in notes or ["py-spy kept its rate; no tracebacks in the server log."])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    options = parse(sys.argv[1:] if argv is None else argv)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    recording, source, notes = profile(options)
    load = [load_at_start, [round(x, 2) for x in os.getloadavg()]]
    if not recording.stacks:
        raise SystemExit("py-spy recorded no busy samples: nothing to draw")
    OUT.mkdir(parents=True, exist_ok=True)
    mode = "GIL holder" if options.gil else "active threads"
    title = f"{options.app} {options.route} ({source['short']}): {sum(recording.stacks.values())} samples, {mode}"
    (OUT / f"{options.label}.svg").write_text(render(recording.stacks, title))
    (OUT / f"{options.label}.md").write_text(summary(options, recording, source, load, notes))
    log(f"{recording.cell['rps']:.0f} req/s, {recording.cell['cpu_us_per_request']} µs CPU/request: "
        f"docs/flame/{options.label}.svg and .md")


if __name__ == "__main__":
    main()
