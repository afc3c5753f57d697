"""The post page of this checkout against the baseline, the commit before the redesign of
the database layer (issue 16), served side by side in one run.

Both sides are served by gunicorn with their own tree's ``gunicorn.conf.py`` and
``wsgi.py`` (2 workers x 4 threads, the fault-handling defaults on), from the same venv
and on the same seeded PostgreSQL database. The baseline is extracted with
``git archive`` into a temporary folder, which comes first on the baseline server's
``PYTHONPATH``; each worker logs the ``myapp`` it imported (``bench/served_wsgi.py``) and
the comparison stops if a baseline worker runs this checkout's code. ``GET /posts/<id>``
(random ids) is loaded on the two in turn, their order alternating, for every repeat;
each cell records req/s and the workers' CPU time (user + system, from /proc) per
request; the report gives the medians of the per-repeat ratios.

``make bench`` runs it after ``bench/run.py``, and ``make bench-baseline`` alone
(``python -m bench.baseline``): on a database of its own (``myapp_bench_baseline``), then
``docs/performance.md`` is rewritten with its section.

Settings (environment): ``BENCH_BASELINE`` (a git revision, default ``BASELINE``),
``BENCH_BASELINE_REPEATS`` (10, at least 5), ``BENCH_SECONDS`` (per cell, 2),
``BENCH_CONNECTIONS`` (8), ``BENCH_POSTGRES_URL``.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url

from bench import loadgen
from bench.run import (
    DATABASE, ROOT, SECRET_KEY, THREADS, WORKERS, Results, Server, log, measure_interleaved, migrate_and_seed, postgres_server,
    reachable, start_server, stop_server, throwaway_database, traceback_notes,
)

BASELINE = "0fa6e80"  # main's head before the redesign of myapp/db/ landed
RESULTS = ROOT / "bench" / "results" / "baseline.json"
TREE = ("myapp", "wsgi.py", "gunicorn.conf.py")  # what serving needs; not bench/, which stays this checkout's
MODULE = "bench.served_wsgi:app"
SIDES = ("current", "baseline")
SERVED = re.compile(r"^bench-served pid=(\d+) myapp=(\S+)", re.MULTILINE)


class BaselineUnavailable(RuntimeError):
    """The baseline revision cannot be extracted (not a git checkout, unknown revision)."""


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        raise BaselineUnavailable(f"git {' '.join(args)}: {detail.strip()}") from None
    return done.stdout.strip()


def extract(revision: str, folder: Path) -> str:
    """The served files of ``revision`` (``TREE``) into ``folder``; returns the full commit id."""
    commit = _git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", commit, *TREE], stdout=subprocess.PIPE)
    assert archive.stdout is not None
    untar = subprocess.run(["tar", "-x", "-C", str(folder)], stdin=archive.stdout, capture_output=True)
    archive.stdout.close()
    if archive.wait() != 0 or untar.returncode != 0:
        raise BaselineUnavailable(f"git archive {commit} {' '.join(TREE)} failed: {untar.stderr.decode().strip()}")
    return commit


def environment(tree: Path) -> dict[str, str]:
    """What a server of an extracted ``tree`` needs: its folder before everything, then this
    checkout for ``bench.served_wsgi`` (the venv's editable ``myapp`` only comes after both)."""
    return {"PYTHONPATH": os.pathsep.join((str(tree), str(ROOT)))}


def served_from(server: Server, timeout: float = 10) -> dict[int, str]:
    """The ``myapp/__init__.py`` each live worker imported, from its line in the server's log."""
    deadline = time.monotonic() + timeout
    while True:
        lines = {int(pid): path for pid, path in SERVED.findall(server.log.read_text(errors="replace"))}
        workers = {worker.pid for worker in server.workers()}
        if workers <= lines.keys() or time.monotonic() > deadline:
            return {pid: lines.get(pid, "(no line)") for pid in sorted(workers)}
        time.sleep(0.2)


def checked_imports(server: Server, root: Path) -> dict[int, str]:
    """The ``myapp`` each worker imported, refusing a server whose workers run another
    tree's code: a baseline worker on this checkout's myapp would compare it with itself."""
    imported = served_from(server)
    wrong = {pid: path for pid, path in imported.items() if not Path(path).is_relative_to(root / "myapp")}
    if wrong:
        raise RuntimeError(f"{server.name} workers did not import myapp from {root}: {wrong}")
    log(f"{server.name}: every worker imported {sorted(set(imported.values()))}")
    return imported


def describe(commit: str) -> dict[str, str]:
    """A commit's id, short id and subject, for a report's header."""
    return {"commit": commit, "short": commit[:7], "subject": _git("log", "-1", "--format=%s", commit)}


def changed_here() -> bool:
    """Whether this checkout's served files differ from its HEAD (uncommitted changes)."""
    return bool(_git("status", "--porcelain", "--", *TREE))


def compare(url: URL, max_post_id: int, folder: Path, command: str, revision: str | None = None) -> dict[str, Any]:
    revision = revision or os.environ.get("BENCH_BASELINE") or BASELINE
    repeats = max(5, int(os.environ.get("BENCH_BASELINE_REPEATS", "10")))
    seconds = float(os.environ.get("BENCH_SECONDS", "2"))
    started = time.monotonic()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    current = {**describe(_git("rev-parse", "HEAD")), "uncommitted_changes": changed_here()}
    measured = Results()
    imported: dict[str, dict[int, str]] = {}
    with tempfile.TemporaryDirectory(prefix="myapp-baseline-") as extracted:
        tree = Path(extracted)
        baseline = describe(extract(revision, tree))
        log(f"baseline {revision} = {baseline['short']} ({baseline['subject'][:60]}) extracted into {tree}")
        roots = {"current": ROOT, "baseline": tree}
        servers: list[Server] = []
        try:
            for side in SIDES:
                extra = environment(tree) if side == "baseline" else {}
                servers.append(start_server(side, MODULE, url, folder, {**extra, "DATABASE_APP_NAME": f"myapp-bench-{side}"},
                                            tag="baseline-", cwd=roots[side]))
            route = loadgen.Route("post", max_id=max_post_id)
            for server in servers:  # imports, connections, statement caches
                loadgen.run(server.url, route, 1, 8)
            for server in servers:
                imported[server.name] = checked_imports(server, roots[server.name])
            measure_interleaved(measured, "postgresql", servers, route, repeats, seconds)
        finally:
            for server in servers:
                stop_server(server)
        in_process = cpu_in_process(url, max_post_id, roots, environment(tree), batches=2 * repeats)
    same_code = not current["uncommitted_changes"] and (
        _git("rev-parse", f"{current['commit']}:myapp") == _git("rev-parse", f"{baseline['commit']}:myapp")
    )
    results: dict[str, Any] = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "revision": revision,
        "baseline": baseline,
        "current": current,
        "same_myapp": same_code,
        "seconds": seconds,
        "repeats": repeats,
        "connections": int(os.environ.get("BENCH_CONNECTIONS", "8")),
        "workers": WORKERS,
        "threads": THREADS,
        "load_generator": loadgen.tool(),
        "load_average": [load_at_start, [round(x, 2) for x in os.getloadavg()]],
        "total_seconds": round(time.monotonic() - started),
        "imported": {side: {str(pid): path for pid, path in paths.items()} for side, paths in imported.items()},
        "cells": measured.cells,
        "in_process": in_process,
        "notes": [],
    }
    from bench.report import _fmt, ratio

    log(f"current / baseline, medians of {repeats} per-repeat ratios: req/s "
        f"{_fmt(ratio(measured.cells, 'current', 'baseline', 'post'), 3)}x, worker CPU per request "
        f"{_fmt(ratio(measured.cells, 'current', 'baseline', 'post', key='cpu_us_per_request'), 3)}x")
    return results


BATCH = 300  # requests per in-process batch: about half a second of CPU


def cpu_in_process(url: URL, max_post_id: int, roots: dict[str, Path], baseline_env: dict[str, str],
                   batches: int) -> dict[str, list[float]]:
    """CPU µs per request of each side in process (``bench/cpu_worker.py``), one process a
    side, their batches alternating: the steadier figure on a busy machine."""
    workers: dict[str, subprocess.Popen[str]] = {}
    try:
        for side, root in roots.items():
            env = {**os.environ, "DATABASE_URL": url.render_as_string(hide_password=False),
                   "SECRET_KEY": SECRET_KEY, **(baseline_env if side == "baseline" else {"PYTHONPATH": str(ROOT)})}
            workers[side] = subprocess.Popen([sys.executable, "-m", "bench.cpu_worker", str(max_post_id)], cwd=root,
                                             env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            imported = workers[side].stdout.readline().strip()  # type: ignore[union-attr]
            if not Path(imported).is_relative_to(root / "myapp"):
                raise RuntimeError(f"the {side} CPU worker imported {imported}, not {root / 'myapp'}")
        per_request: dict[str, list[float]] = {side: [] for side in workers}
        for batch in range(batches):
            for side in (SIDES if batch % 2 == 0 else SIDES[::-1]):
                workers[side].stdin.write(f"{BATCH}\n")  # type: ignore[union-attr]
                workers[side].stdin.flush()  # type: ignore[union-attr]
                per_request[side].append(float(workers[side].stdout.readline()))  # type: ignore[union-attr]
    finally:
        for worker in workers.values():
            worker.stdin.close()  # type: ignore[union-attr]
            worker.wait(30)
    ratios = [now / before for now, before in zip(per_request["current"], per_request["baseline"])]
    log(f"in process, CPU per request current / baseline: median of {batches} batch pairs "
        f"{statistics.median(ratios):.3f}x")
    return per_request


def save(results: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))


def main() -> None:
    """``make bench-baseline``: the comparison alone, then the report rewritten."""
    started = time.monotonic()
    server = postgres_server()
    if not reachable(server):
        raise SystemExit(f"PostgreSQL is not reachable at {make_url(server)!r}: set BENCH_POSTGRES_URL")
    with tempfile.TemporaryDirectory(prefix="myapp-bench-logs-") as logs, \
            throwaway_database("postgresql", server, name=f"{DATABASE}_baseline") as url:
        log("PostgreSQL: migrating and seeding 1,000 users and 10,000 posts")
        seeded = migrate_and_seed(url)
        try:
            results = compare(url, seeded.max_post_id, Path(logs), command="make bench-baseline")
        except BaselineUnavailable as error:
            raise SystemExit(f"No comparison with the baseline: {error}") from None
        results["notes"] = traceback_notes(Path(logs))
    results["total_seconds"] = round(time.monotonic() - started)
    save(results)
    from bench import report

    report.write(json.loads(report.RESULTS.read_text()), main_chart=False)
    log(f"done in {results['total_seconds']} s: {RESULTS.relative_to(ROOT)}, docs/performance.md")


if __name__ == "__main__":
    main()
