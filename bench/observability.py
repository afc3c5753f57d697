"""What issue 18's request log line and Prometheus metrics cost on the post page, served
by gunicorn (issue 18, point 3; goal: at most 3 % more worker CPU per request).

    python -m bench.observability [--repeats N] [--seconds S] [--base REV]     (make bench-observability)

Three servers of this checkout, each serving ``bench/observed_wsgi.py`` (the bench's
myapp, CSRF off) with the project's ``gunicorn.conf.py`` (2 workers x 4 threads) on the
same seeded PostgreSQL database (``myapp_bench_observability``), and ports of their own
(``run.start_server``); they differ by these settings alone:

- ``on``, issue 18's defaults: ``METRICS=true``, ``REQUEST_LOG=true`` (the app's line,
  text, goes to gunicorn's stderr: the server's log file), ``METRICS_BIND`` on a free port
  (so the master names a multiprocess folder and every worker writes its figures there),
  ``GUNICORN_ACCESS_LOG`` unset (the settings turn gunicorn's access log off when the
  app writes its own line);
- ``off``, the site before issue 18 as the bench's servers always ran it:
  ``METRICS=false``, ``REQUEST_LOG=false``, ``METRICS_BIND=""`` (no exporter, no
  multiprocess folder), gunicorn's access log to /dev/null;
- ``off-no-log``, the stricter control: as ``off`` with gunicorn's access log off too, so
  that ``on`` against it is the whole cost of our line and the metrics.

``GET /posts/<id>`` (random ids) is loaded on the three in turn by
``run.measure_interleaved`` (the order rotating every repeat); each cell records req/s and
the workers' CPU time (user + system, from /proc) per request, and the report gives the
medians of the per-repeat ratios. Checked before the load: every worker imported this
checkout's ``myapp``, and gunicorn's access log setting of each variant as gunicorn
resolves it (``--print-config``). After it: the request lines in each server's log, and
the requests ``on``'s exporter counted over its workers, against what wrk saw answered.

``--base REV`` serves a fourth server, ``base-on``: ``on``'s settings on that revision's
``myapp`` (extracted as ``bench/baseline.py`` extracts its baseline), for a before/after of
a change to the line or the metrics measured in the same run (``on`` / ``base-on``).

``make bench`` runs it after ``bench/baseline.py``; then ``docs/performance.md`` is rewritten
with its section and ``docs/performance-observability.png``. Settings (environment):
``BENCH_OBSERVABILITY_REPEATS`` (20, at least 5), ``BENCH_SECONDS`` (per cell, 2),
``BENCH_CONNECTIONS`` (8), ``BENCH_POSTGRES_URL``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url

from bench import loadgen
from bench.baseline import changed_here, checked_imports, describe, environment, extract
from bench.run import (
    DATABASE, GUNICORN, ROOT, THREADS, WORKERS, Results, Server, free_ports, log, measure_interleaved,
    migrate_and_seed, postgres_server, reachable, server_environment, start_server, stop_server,
    throwaway_database, traceback_notes,
)

RESULTS = ROOT / "bench" / "results" / "observability.json"
MODULE = "bench.observed_wsgi:app"
GOAL = 1.03  # issue 18: logs plus metrics cost at most 3 % more worker CPU per request
# name -> the settings it differs by (None: unset, so that the gunicorn settings' default
# applies). Unnamed here: METRICS_BIND, a free port of the server's own (run.start_server);
# GUNICORN_ACCESS_LOG, /dev/null as for every bench server.
VARIANTS: dict[str, dict[str, str | None]] = {
    "on": {
        "METRICS": "true", "REQUEST_LOG": "true", "LOG_FORMAT": "text", "GUNICORN_ACCESS_LOG": None,
        "BENCH_APP_REQUEST_LOG": None, "DATABASE_APP_NAME": "myapp-bench-obs-on",
    },
    "off": {
        "METRICS": "false", "REQUEST_LOG": "false", "METRICS_BIND": "", "BENCH_APP_REQUEST_LOG": None,
        "DATABASE_APP_NAME": "myapp-bench-obs-off",
    },
    "off-no-log": {
        "METRICS": "false", "REQUEST_LOG": None, "BENCH_APP_REQUEST_LOG": "false", "METRICS_BIND": "",
        "GUNICORN_ACCESS_LOG": None, "DATABASE_APP_NAME": "myapp-bench-obs-nolog",
    },
}
# gunicorn's accesslog setting each variant must resolve to ("None": no access log at all).
ACCESS_LOG = {"on": "None", "off": "/dev/null", "off-no-log": "None"}
PAIRS = (("on", "off"), ("on", "off-no-log"))  # (measured, control) for the ratios
BASE = "base-on"  # --base: "on" served from another revision's tree
ENDPOINT = "posts.detail"
# The app's text line for a post page (myapp.observability._text_line).
REQUEST_LINE = re.compile(
    r'^\S+ \S+ "GET /posts/\d+" posts\.detail \d{3} [\d.]+ms db=\d+/[\d.]+ms reads=\S+ id=\S+$', re.MULTILINE
)


def resolved_access_log(name: str, url: URL, folder: Path, tree: Path | None = None) -> str:
    """gunicorn's ``accesslog`` for a variant, as ``gunicorn --print-config`` resolves it
    from the settings of this checkout (or of ``tree``) and the variant's environment
    (nothing is started)."""
    settings = VARIANTS[name] if tree is None else {**VARIANTS["on"], **environment(tree)}
    variables = server_environment(url, *free_ports(2), settings)
    if variables.get("METRICS_BIND"):  # the settings name a multiprocess folder while they load
        variables["PROMETHEUS_MULTIPROC_DIR"] = str(folder / f"print-config-{name}")
    done = subprocess.run(
        [str(GUNICORN), "-c", "gunicorn.conf.py", "--print-config", MODULE], cwd=tree or ROOT, env=variables,
        capture_output=True, text=True, timeout=60,
    )
    found = re.search(r"^accesslog\s*=\s*(.*)$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"gunicorn --print-config for {name} failed:\n{done.stdout}{done.stderr}")
    return found.group(1).strip()


def request_lines(log_text: str) -> int:
    """The app's request lines for post pages in a server's log."""
    return len(REQUEST_LINE.findall(log_text))


def counted_requests(exposition: str, endpoint: str = ENDPOINT) -> int:
    """``myapp_http_requests_total`` of ``endpoint`` in an exposition text, over every
    method, status and worker (the master sums the workers' files)."""
    from prometheus_client.parser import text_string_to_metric_families

    return round(sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == "myapp_http_requests_total" and sample.labels.get("endpoint") == endpoint
    ))


def scrape(server: Server) -> str | None:
    """The exposition text of the server's master, or None when it serves none."""
    if not server.metrics_url:
        return None
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        return str(response.read().decode())


def check_served(served: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What each variant's server did, against what its settings promise: ``on`` wrote a
    line and counted a request for each post page answered, the others neither. Returns
    the failures (empty: every variant is what it claims)."""
    failures = []
    for name, seen in served.items():
        answered, lines, counted = seen["requests"], seen["log_lines"], seen["metrics_counted"]
        if name in ("on", BASE):
            # The server counts requests wrk gave up waiting for at the end of a cell, so
            # it may count a few more than wrk saw answered, never fewer.
            if not answered <= lines <= answered * 1.01 + 50:
                failures.append(f"{name}: {lines} request lines for {answered} post pages answered")
            if counted is None or not answered <= counted <= answered * 1.01 + 50:
                failures.append(f"{name}: its exporter counted {counted} post pages for {answered} answered")
        else:
            if lines:
                failures.append(f"{name}: {lines} request lines in its log, expected none")
            if counted is not None:
                failures.append(f"{name}: serves metrics, expected no exporter")
    return failures


def compare(url: URL, max_post_id: int, folder: Path, command: str, repeats: int, seconds: float,
            base: tuple[Path, dict[str, str]] | None = None) -> dict[str, Any]:
    """The variants side by side; with ``base`` (an extracted tree and its commit), also
    ``on`` served from that tree."""
    started = time.monotonic()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    variants = {**VARIANTS, **({BASE: {**VARIANTS["on"], **environment(base[0])}} if base else {})}
    trees = {name: ROOT for name in VARIANTS} | ({BASE: base[0]} if base else {})
    access_logs = {name: resolved_access_log(name, url, folder, None if trees[name] == ROOT else trees[name])
                   for name in variants}
    wrong = {name: value for name, value in access_logs.items() if value != ACCESS_LOG.get(name, ACCESS_LOG["on"])}
    if wrong:
        raise RuntimeError(f"gunicorn's accesslog is not what the variants need: {wrong}, expected {ACCESS_LOG}")
    measured = Results()
    route = loadgen.Route("post", max_id=max_post_id)
    servers: list[Server] = []
    served: dict[str, dict[str, Any]] = {}
    imported: dict[str, dict[int, str]] = {}
    try:
        for name, extra in variants.items():
            servers.append(start_server(name, MODULE, url, folder, extra, tag="observability-", cwd=trees[name]))
        warm_up = {server.name: loadgen.run(server.url, route, 1, 8).requests for server in servers}
        for server in servers:
            imported[server.name] = checked_imports(server, trees[server.name])
        measure_interleaved(measured, "postgresql", servers, route, repeats, seconds)
        time.sleep(0.5)  # the last lines reach the log files
        for server in servers:
            exposition = scrape(server)
            served[server.name] = {
                "requests": warm_up[server.name] + sum(c["requests"] for c in measured.cells if c["app"] == server.name),
                "log_lines": request_lines(server.log.read_text(errors="replace")),
                "metrics_counted": None if exposition is None else counted_requests(exposition),
                "metrics_url": server.metrics_url,
            }
    finally:
        for server in servers:
            stop_server(server)
    failures = check_served(served)
    if failures:
        raise RuntimeError("a variant is not what its settings promise: " + "; ".join(failures))
    from bench.report import _fmt, ratio

    pairs = [*PAIRS, *([("on", BASE)] if base else [])]
    for measured_name, control in pairs:
        log(f"{measured_name} / {control}, medians of {repeats} per-repeat ratios: worker CPU per request "
            f"{_fmt(ratio(measured.cells, measured_name, control, 'post', key='cpu_us_per_request'), 3)}x, "
            f"req/s {_fmt(ratio(measured.cells, measured_name, control, 'post'), 3)}x")
    return {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "current": {**describe(subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                               text=True, check=True).stdout.strip()),
                    "uncommitted_changes": changed_here()},
        "goal": GOAL,
        "seconds": seconds,
        "repeats": repeats,
        "connections": int(os.environ.get("BENCH_CONNECTIONS", "8")),
        "workers": WORKERS,
        "threads": THREADS,
        "load_generator": loadgen.tool(),
        "load_average": [load_at_start, [round(x, 2) for x in os.getloadavg()]],
        "total_seconds": round(time.monotonic() - started),
        "variants": {name: {"settings": {key: value for key, value in extra.items() if key != "PYTHONPATH"},
                            "access_log": access_logs[name]} for name, extra in variants.items()},
        "pairs": [list(pair) for pair in pairs],
        "base": base[1] if base else None,
        "imported": {name: {str(pid): path for pid, path in paths.items()} for name, paths in imported.items()},
        "served": served,
        "cells": measured.cells,
        "notes": [],
    }


def save(results: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.observability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=int(os.environ.get("BENCH_OBSERVABILITY_REPEATS", "20")),
                        help="interleaved repeats, at least 5 (BENCH_OBSERVABILITY_REPEATS, 20)")
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("BENCH_SECONDS", "2")),
                        help="seconds per cell (BENCH_SECONDS, 2)")
    parser.add_argument("--base", help="also serve 'on' from this git revision, for a before/after of a change")
    options = parser.parse_args(argv)
    repeats = max(5, options.repeats)
    command = f"python -m bench.observability --repeats {repeats} --seconds {options.seconds:g}" + (
        f" --base {options.base}" if options.base else "")
    started = time.monotonic()
    server = postgres_server()
    if not reachable(server):
        raise SystemExit(f"PostgreSQL is not reachable at {make_url(server)!r}: set BENCH_POSTGRES_URL")
    with tempfile.TemporaryDirectory(prefix="myapp-bench-logs-") as logs, \
            tempfile.TemporaryDirectory(prefix="myapp-observability-base-") as extracted, \
            throwaway_database("postgresql", server, name=f"{DATABASE}_observability") as url:
        base = None
        if options.base:
            base = (Path(extracted), {**describe(extract(options.base, Path(extracted))), "revision": options.base})
            log(f"base {options.base} = {base[1]['short']} ({base[1]['subject'][:60]}) extracted into {extracted}")
        log("PostgreSQL: migrating and seeding 1,000 users and 10,000 posts")
        seeded = migrate_and_seed(url)
        results = compare(url, seeded.max_post_id, Path(logs), command, repeats, options.seconds, base)
        results["notes"] = traceback_notes(Path(logs))
    results["total_seconds"] = round(time.monotonic() - started)
    save(results)
    from bench import report

    report.write(json.loads(report.RESULTS.read_text()), main_chart=False)
    log(f"done in {results['total_seconds']} s: {RESULTS.relative_to(ROOT)}, docs/performance.md")


if __name__ == "__main__":
    main()
