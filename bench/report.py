"""Turn a run's results into ``docs/performance.md`` and ``docs/performance.png``.

``python -m bench.report`` rewrites both from ``bench/results/latest.json`` without
measuring again, with the sections of ``bench/baseline.py``, ``bench/observability.py``,
``bench/replicas.py`` and ``bench/galera.py`` from their own results files (and the
charts of all but the replicas');
the hand-written part (what was tried, profiles) is ``bench/notes.md``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"
CHART = ROOT / "docs" / "performance.png"
NOTES = ROOT / "bench" / "notes.md"
RESULTS = ROOT / "bench" / "results" / "latest.json"
REPLICA_RESULTS = ROOT / "bench" / "results" / "replicas.json"  # bench/replicas.py
GALERA_RESULTS = ROOT / "bench" / "results" / "galera.json"  # bench/galera.py
GALERA_CHART = ROOT / "docs" / "performance-galera.png"
BASELINE_RESULTS = ROOT / "bench" / "results" / "baseline.json"  # bench/baseline.py
BASELINE_CHART = ROOT / "docs" / "performance-baseline.png"
OBSERVABILITY_RESULTS = ROOT / "bench" / "results" / "observability.json"  # bench/observability.py
OBSERVABILITY_CHART = ROOT / "docs" / "performance-observability.png"

APPS = (
    "myapp", "flask-sqlalchemy", "flask-docs", "psycopg", "bare-flask",
    "myapp-1-worker", "myapp-full-ping", "myapp-no-autocommit", "myapp-no-faults",
)
# The apps of the other backends' phases (bench/run.py's PHASES), and each backend's
# hand-written peer on the driver myapp uses there (the "raw" columns and goals).
BACKEND_APPS = {
    "postgresql": APPS,
    "mysql": ("myapp", "flask-sqlalchemy", "pymysql", "bare-flask"),
    "sqlite": ("myapp", "flask-sqlalchemy", "sqlite3", "bare-flask"),
}
BACKEND_TITLES = {"postgresql": "PostgreSQL", "mysql": "MariaDB", "sqlite": "SQLite"}
RAW = {"postgresql": ("psycopg", "psycopg"), "mysql": ("pymysql", "PyMySQL"), "sqlite": ("sqlite3", "sqlite3")}
RAW_GOAL = 0.75  # issue 17: myapp >= 0.75x its raw peer on MariaDB and SQLite, in req/s and in CPU
FAULTS_GOAL = 1.03  # issue 17: the fault-handling defaults cost <= 3 % of worker CPU per request
ROUTES = {
    "healthz": "`GET /healthz` (no database)",
    "post": "`GET /posts/<id>` (random id)",
    "index": "`GET /?page=N` (20 posts + authors)",
    "create": "`POST /posts/new` (logged in)",
}


def medians(cells: list[dict[str, Any]], backend: str) -> dict[tuple[str, str], dict[str, Any]]:
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for cell in cells:
        if cell["backend"] == backend:
            grouped[cell["app"], cell["route"]].append(cell)
    return {
        key: {
            "rps": statistics.median(c["rps"] for c in group),
            "cpu": _median_or_none([c.get("cpu_us_per_request") for c in group]),
            "p50": statistics.median(c["p50_ms"] for c in group),
            "p99": statistics.median(c["p99_ms"] for c in group),
            "errors": sum(c["errors"] for c in group),
            "runs": len(group),
        }
        for key, group in grouped.items()
    }


def _median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def per_repeat_ratios(
    cells: list[dict[str, Any]], app: str, peer: str, route: str, backend: str = "postgresql", key: str = "rps"
) -> list[float]:
    """app/peer of ``key`` (throughput unless told) in each repeat that measured both."""
    by_repeat: dict[int, dict[str, float]] = defaultdict(dict)
    for cell in cells:
        if cell["backend"] == backend and cell["route"] == route and cell["app"] in (app, peer) and cell.get(key) is not None:
            by_repeat[cell["repeat"]][cell["app"]] = cell[key]
    return [r[app] / r[peer] for _, r in sorted(by_repeat.items()) if app in r and peer in r and r[peer]]


def ratio(
    cells: list[dict[str, Any]], app: str, peer: str, route: str, backend: str = "postgresql", key: str = "rps"
) -> float | None:
    """Median over repeats of app/peer throughput (or ``key``), each pair measured in the same repeat."""
    ratios = per_repeat_ratios(cells, app, peer, route, backend, key)
    return statistics.median(ratios) if ratios else None


def cpu_ratio(cells: list[dict[str, Any]], app: str, peer: str, route: str, backend: str = "postgresql") -> float | None:
    """Median over repeats of peer/app worker CPU per request: the app's requests per CPU
    second relative to the peer's, so that, like req/s, higher is better for the app."""
    return ratio(cells, peer, app, route, backend, key="cpu_us_per_request")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


Goal = tuple[str, str, "bool | None"]

# Issue 17's PostgreSQL goals: (route, peer, minimum ratio), each in req/s and in CPU.
PEER_GOALS = (
    ("post", "psycopg", 0.80),
    ("post", "flask-sqlalchemy", 1.40),
    ("index", "psycopg", 1.00),
    ("create", "psycopg", 0.80),
    ("healthz", "bare-flask", 0.97),
)
PEER_LABELS = {"psycopg": "raw psycopg", "flask-sqlalchemy": "Flask-SQLAlchemy", "bare-flask": "bare Flask"}


def goals(results: dict[str, Any]) -> list[Goal]:
    """The goals with what was measured and whether it meets them (None: not measured)."""
    if not any(c["backend"] == "postgresql" for c in results["cells"]):
        return backend_goals(results)
    return peer_goals(results) + backend_goals(results) + standing_goals(results)


def peer_goals(results: dict[str, Any]) -> list[Goal]:
    """I17-1 to 4: myapp against a peer on one route, in req/s and in worker CPU."""
    cells, out = results["cells"], []
    numbers = {"post": "1", "index": "2", "create": "3", "healthz": "4"}
    for route, peer, minimum in PEER_GOALS:
        by_rps, by_cpu = ratio(cells, "myapp", peer, route), cpu_ratio(cells, "myapp", peer, route)
        met = None if by_rps is None or by_cpu is None else by_rps >= minimum and by_cpu >= minimum
        out.append((
            f"I17-{numbers[route]}. {ROUTES[route]} >= {minimum:.2f}x {PEER_LABELS[peer]}, in req/s and in CPU",
            f"{_fmt(by_rps)}x req/s, {_fmt(by_cpu)}x CPU", met,
        ))
    return out


def standing_goals(results: dict[str, Any]) -> list[Goal]:
    """Earlier issues' goals, kept: scaling with workers, connections, flat memory, queries."""
    cells = results["cells"]
    queries = results.get("queries", {})
    most = max(queries.values()) if queries else None
    out: list[Goal] = [(
        "`GET /?page=N`: at most 2 queries at any page size and number",
        ", ".join(f"{k}: {v}" for k, v in queries.items()) or "not counted", None if most is None else most <= 2,
    )]
    scale_post, scale_index = ratio(cells, "myapp", "myapp-1-worker", "post"), ratio(cells, "myapp", "myapp-1-worker", "index")
    connections = results.get("connections", {})
    peaks = connections.get("peaks", {})
    peak, peak_1w = peaks.get("myapp-bench", 0), peaks.get("myapp-bench-1w", 0)
    limit, limit_1w = connections.get("limit", 20), connections.get("limit_1_worker", 10)
    out.append((
        "throughput grows with workers (2 vs 1, >= 1.15x); connections <= workers x (pool_size + max_overflow)",
        f"2 workers / 1 worker: {_fmt(scale_post)}x post, {_fmt(scale_index)}x index; peak connections "
        f"{peak} (limit {limit}) with 2 workers, {peak_1w} (limit {limit_1w}) with 1",
        (scale_post or 0) >= 1.15 and (scale_index or 0) >= 1.15 and peak <= limit and peak_1w <= limit_1w,
    ))
    memory = results.get("memory", {})
    before, after = memory.get("rss_before_mb", []), memory.get("rss_after_mb", [])
    growth = max((a - b for a, b in zip(after, before)), default=None)
    out.append((
        "a worker's RSS flat (< 5 MB growth; the 50,000-request soak is the fault suite's)",
        f"+{_fmt(growth, 1)} MB at most over {memory.get('requests', 0):,} requests (workers {before} -> {after} MB)",
        growth is not None and growth < 5,
    ))
    return out


def backend_goals(results: dict[str, Any]) -> list[Goal]:
    """Issue 17's goals: myapp against the raw driver on MariaDB and SQLite (5), and what
    the fault-handling defaults cost in worker CPU (6)."""
    cells = results["cells"]
    out: list[tuple[str, str, bool | None]] = []
    for backend in ("mysql", "sqlite"):
        raw, label = RAW[backend]
        title = BACKEND_TITLES[backend]
        for metric, measure in (("req/s", ratio), ("worker CPU per request", cpu_ratio)):
            found = {route: measure(cells, "myapp", raw, route, backend) for route in ROUTES}
            measured = ", ".join(f"{route} {_fmt(value)}{'' if value is None else 'x'}" for route, value in found.items())
            values = list(found.values())
            met = None if None in values else all(v is not None and v >= RAW_GOAL for v in values)
            out.append((
                f"I17-5. {title}: each route >= {RAW_GOAL:.2f}x raw {label}, in {metric}"
                + (" (requests per CPU second)" if metric != "req/s" else ""),
                measured if met is not None else f"{measured} (not measured in this run)", met,
            ))
    costs = {
        route: ratio(cells, "myapp", "myapp-no-faults", route, key="cpu_us_per_request") for route in ("post", "index")
    }
    throughput = {route: ratio(cells, "myapp", "myapp-no-faults", route) for route in ("post", "index")}
    values = list(costs.values())
    met = None if None in values else all(v is not None and v <= FAULTS_GOAL for v in values)
    out.append((
        "I17-6. fault-handling defaults cost <= 3 % of worker CPU per request (myapp vs myapp-no-faults, "
        "median of per-repeat CPU ratios; PostgreSQL)",
        "; ".join(
            f"{route}: CPU {_change(costs[route])}, req/s {_change(throughput[route])}" for route in costs
        ) + ("" if met is not None else " (not measured in this run)"),
        met,
    ))
    return out


def table(results: dict[str, Any], backend: str, apps: tuple[str, ...]) -> list[str]:
    """Every app and route of ``backend``: medians, and ratios (medians of per-repeat
    ratios) to Flask-SQLAlchemy, the backend's raw peer and bare Flask, in req/s and,
    for the first two, in worker CPU (requests per CPU second: higher is better)."""
    cells = results["cells"]
    stats = medians(cells, backend)
    raw, raw_label = RAW[backend]
    lines = [
        f"| route | app | req/s | worker CPU µs/request | p50 ms | p99 ms | x FSA | x FSA CPU | x {raw_label} "
        f"| x {raw_label} CPU | x bare Flask | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for route, label in ROUTES.items():
        for app in apps:
            s = stats.get((app, route))
            if s is None:
                continue
            ratios = []
            for peer, with_cpu in (("flask-sqlalchemy", True), (raw, True), ("bare-flask", False)):
                measured = (peer, route) in stats and peer != app
                ratios.append(_fmt(ratio(cells, app, peer, route, backend)) if measured else "" if peer == app else "–")
                if with_cpu:
                    ratios.append(_fmt(cpu_ratio(cells, app, peer, route, backend)) if measured else "" if peer == app else "–")
            name = f"**{app}**" if app == "myapp" else app
            lines.append(
                f"| {label} | {name} | {s['rps']:.0f} | {_fmt(s['cpu'], 0)} | {s['p50']:.2f} | {s['p99']:.2f} | "
                + " | ".join(ratios) + f" | {s['errors']} |"
            )
    return lines


def faults_section(results: dict[str, Any]) -> list[str]:
    """myapp with its fault-handling defaults against the same app with them off."""
    cells = results["cells"]
    stats = medians(cells, "postgresql")
    if not any(("myapp-no-faults", route) in stats for route in ROUTES):
        return []
    lines = [
        "",
        "## The fault-handling defaults on and off (PostgreSQL)",
        "",
        "`myapp` runs with its defaults: the circuit breaker (`DATABASE_BREAKER_THRESHOLD=3`), the bulkhead "
        "(`DATABASE_BULKHEAD`, which `gunicorn.conf.py` sets to threads - 1 = 3) and the network timeouts "
        "(`DATABASE_NETWORK_TIMEOUT=10`: TCP user timeout and keepalives). `myapp-no-faults` is the same app with "
        "`DATABASE_BREAKER_THRESHOLD=0`, `DATABASE_BULKHEAD=0` and `DATABASE_NETWORK_TIMEOUT=0`; "
        "`DATABASE_STATEMENT_TIMEOUT` is 0 (its default) on both. Ratios are on / off, medians of per-repeat ratios; "
        "for CPU, above 1 means the defaults cost CPU.",
        "",
        "| route | on req/s | off req/s | on / off req/s | on CPU µs/request | off CPU µs/request "
        "| on / off CPU (per repeat: lowest – highest) |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for route in ("post", "index"):
        on, off = stats.get(("myapp", route)), stats.get(("myapp-no-faults", route))
        if on is None or off is None:
            continue
        cpu = per_repeat_ratios(cells, "myapp", "myapp-no-faults", route, key="cpu_us_per_request")
        lines.append(
            f"| {ROUTES[route]} | {on['rps']:.0f} | {off['rps']:.0f} | "
            f"{_change(ratio(cells, 'myapp', 'myapp-no-faults', route))} | {_fmt(on['cpu'], 0)} | {_fmt(off['cpu'], 0)} | "
            f"{_change(statistics.median(cpu) if cpu else None)} ({_fmt(min(cpu, default=None))} – "
            f"{_fmt(max(cpu, default=None))}) |"
        )
    return lines


def chart(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = medians(results["cells"], "postgresql")
    apps = [a for a in APPS if not a.startswith("myapp-")]
    colours = {"myapp": "#1f6feb", "flask-sqlalchemy": "#d29922", "flask-docs": "#8957e5", "psycopg": "#2da44e", "bare-flask": "#8b949e"}
    fig, axes = plt.subplots(1, len(ROUTES), figsize=(14, 4.2))
    for axis, (route, label) in zip(axes, ROUTES.items()):
        values = [stats.get((app, route), {}).get("rps", 0) for app in apps]
        bars = axis.bar(range(len(apps)), values, color=[colours[a] for a in apps])
        axis.set_title(label.replace("`", ""), fontsize=9)
        axis.set_xticks(range(len(apps)), apps, rotation=35, ha="right", fontsize=8)
        axis.tick_params(axis="y", labelsize=8)
        for bar, value in zip(bars, values):
            axis.annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=7)
    axes[0].set_ylabel("requests/s (median)")
    fig.suptitle("PostgreSQL, gunicorn 2 workers x 4 threads, wrk 8 connections on loopback", fontsize=10)
    fig.tight_layout()
    fig.savefig(CHART, dpi=110)
    plt.close(fig)


def _change(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x ({(value - 1) * 100:+.1f} %)"


def median_interval(values: list[float]) -> tuple[float, float, float] | None:
    """A distribution-free interval of the median of ``values``: from the k-th smallest to the
    k-th largest, k the largest giving at least 95 % coverage (at least 1), and that coverage
    (binomial; it assumes independent repeats, which a busy machine's slow minutes are not)."""
    n = len(values)
    if n < 3:
        return None
    below = lambda k: sum(math.comb(n, i) for i in range(k)) / 2**n  # noqa: E731 (P(fewer than k below the median))
    k = max([1] + [k for k in range(1, n // 2 + 1) if below(k) <= 0.025])
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k], 1 - 2 * below(k)


def _interval(values: list[float]) -> str:
    found = median_interval(values)
    if found is None:
        return "–"
    low, high, coverage = found
    verdict = "includes 1.00: no change resolved" if low <= 1 <= high else "excludes 1.00"
    return f"{low:.2f} – {high:.2f} ({coverage:.1%}; {verdict})"


def baseline_section(baseline: dict[str, Any]) -> list[str]:
    """This checkout's post page against the commit before the database layer's redesign
    (``bench/baseline.py``, in ``make bench`` or a run of its own)."""
    cells, base, current = baseline["cells"], baseline["baseline"], baseline["current"]
    rps = per_repeat_ratios(cells, "current", "baseline", "post")
    cpu = per_repeat_ratios(cells, "current", "baseline", "post", key="cpu_us_per_request")
    rps_median = statistics.median(rps) if rps else None
    cpu_median = statistics.median(cpu) if cpu else None
    here = f"`{current['short']}`" + (" with uncommitted changes" if current["uncommitted_changes"] else "")
    lines = [
        "",
        f"## The post page against the baseline (`{base['short']}`, before the database layer's redesign)",
        "",
        f"`{baseline['command']}` ({baseline['date']}, {baseline['total_seconds']} s; `bench/baseline.py`): "
        f"`GET /posts/<id>` (random ids) of this checkout ({here}) and of the baseline `{baseline['revision']}` = "
        f"`{base['short']}` (\"{base['subject'][:90]}\"), extracted with `git archive`. Each side is served by "
        f"gunicorn with its own tree's `gunicorn.conf.py` and `wsgi.py` ({baseline['workers']} workers x "
        f"{baseline['threads']} threads, the fault-handling defaults on), from the same venv, on the same seeded "
        f"PostgreSQL database; {baseline['load_generator']} with {baseline['connections']} connections, "
        f"{baseline['seconds']:g} s cells, {baseline['repeats']} repeats alternating which side goes first. "
        "Worker CPU is the user + system time of the gunicorn workers (from /proc, summed over the workers) "
        "divided by the requests of the cell; it moves less than req/s when other work takes the cores. "
        f"Every worker checked which `myapp` it imported: the baseline's "
        f"{len(baseline['imported'].get('baseline', {}))} from the extracted tree, the current "
        f"{len(baseline['imported'].get('current', {}))} from this checkout. Load average "
        f"{baseline['load_average'][0]} at the start, {baseline['load_average'][1]} at the end.",
        "",
        f"![the post page, current and baseline, per repeat]({BASELINE_CHART.name})",
        "",
        "| side | req/s (median) | worker CPU µs/request (median) | p50 ms | p99 ms | errors |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for side, label in (("current", f"current ({here})"), ("baseline", f"baseline (`{base['short']}`)")):
        mine = [c for c in cells if c["app"] == side]
        cpus = [c["cpu_us_per_request"] for c in mine if c.get("cpu_us_per_request") is not None]
        lines.append(
            f"| {label} | {statistics.median(c['rps'] for c in mine):.0f} | "
            f"{_fmt(statistics.median(cpus) if cpus else None, 0)} | {statistics.median(c['p50_ms'] for c in mine):.2f} | "
            f"{statistics.median(c['p99_ms'] for c in mine):.2f} | {sum(c['errors'] for c in mine)} |"
        )
    lines += [
        "",
        "| current / baseline | median of the per-repeat ratios | interval of that median (its coverage) "
        "| lowest – highest repeat |",
        "|---|--:|--:|--:|",
        f"| req/s (higher is better) | {_change(rps_median)} | {_interval(rps)} | "
        f"{_fmt(min(rps, default=None))} – {_fmt(max(rps, default=None))} |",
        f"| worker CPU per request (lower is better) | {_change(cpu_median)} | {_interval(cpu)} | "
        f"{_fmt(min(cpu, default=None))} – {_fmt(max(cpu, default=None))} |",
        "",
    ]
    if rps_median is not None and cpu_median is not None:
        lines.append(
            f"Changed from the baseline: throughput {(rps_median - 1) * 100:+.1f} %, worker CPU per request "
            f"{(cpu_median - 1) * 100:+.1f} %."
            + (" Both sides run the same `myapp` (equal git trees), so these figures are the noise of the method "
               "on this machine, not a change." if baseline.get("same_myapp") else "")
        )
    lines += _in_process_lines(baseline.get("in_process"))
    if any(c.get("workers_replaced") for c in cells):
        lines.append("A worker was replaced during at least one cell: that cell's CPU misses the replaced worker.")
    for note in baseline.get("notes", []):
        lines += ["", f"Note: {note}"]
    return lines


def _in_process_lines(in_process: dict[str, list[float]] | None) -> list[str]:
    """The same page in process (``bench/cpu_worker.py``): CPU per request without HTTP
    and gunicorn, batches of the two sides alternating."""
    if not in_process or not in_process.get("current"):
        return []
    ratios = [now / before for now, before in zip(in_process["current"], in_process["baseline"])]
    return [
        "",
        f"In process, the same page without HTTP or gunicorn (each side in its own process, "
        f"{len(ratios)} alternating batches of 300 requests, CPU time of the process): current "
        f"{statistics.median(in_process['current']):.0f} µs, baseline {statistics.median(in_process['baseline']):.0f} µs "
        f"per request; current / baseline {_change(statistics.median(ratios))} "
        f"({_fmt(min(ratios))} – {_fmt(max(ratios))} over the batches). It leaves out the costs both sides share "
        "(the HTTP server, the threads), so it resolves the layers' difference where the served cells cannot.",
    ]


def _per_repeat_lines(axis: Any, cells: list[dict[str, Any]], key: str, title: str,
                      sides: dict[str, tuple[str, str]]) -> None:
    """One line per side (``sides``: name -> (label, colour)) of ``key`` in each repeat."""
    for side, (label, colour) in sides.items():
        mine = sorted((c["repeat"], c[key]) for c in cells if c["app"] == side and c.get(key) is not None)
        axis.plot([r for r, _ in mine], [v for _, v in mine], "o-", color=colour, label=label)
    axis.set_title(f"GET /posts/<id>: {title}, each repeat", fontsize=9)
    axis.set_xlabel("repeat", fontsize=8)
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=7, loc="lower right")
    axis.tick_params(labelsize=8)


def _ratio_column(axis: Any, position: float, ratios: list[float], colour: str) -> None:
    """Per-repeat ratios as dots at ``position``, their median as a bar and the median's
    interval (``median_interval``) as a band beside it."""
    axis.plot([position] * len(ratios), ratios, "o", color="black", markersize=4, alpha=0.6)
    if not ratios:
        return
    middle = statistics.median(ratios)
    axis.hlines(middle, position - 0.25, position + 0.25, color=colour, linewidth=2)
    interval = median_interval(ratios)
    if interval is not None:  # the median's interval (>= 95 % coverage when there are enough repeats)
        axis.vlines(position + 0.3, interval[0], interval[1], color=colour, linewidth=4, alpha=0.35)
    axis.annotate(f"{middle:.2f}x", (position + 0.36, middle), va="center", fontsize=8)


def baseline_chart(baseline: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, short = baseline["cells"], baseline["baseline"]["short"]
    colours = {"current": "#1f6feb", "baseline": "#8b949e"}
    labels = {"current": f"current ({baseline['current']['short']})", "baseline": f"baseline ({short})"}
    sides = {side: (labels[side], colours[side]) for side in ("current", "baseline")}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for axis, key, title in ((axes[0], "rps", "req/s"), (axes[1], "cpu_us_per_request", "worker CPU µs/request")):
        _per_repeat_lines(axis, cells, key, title, sides)
    for n, (key, label) in enumerate((("rps", "req/s"), ("cpu_us_per_request", "CPU/request"))):
        _ratio_column(axes[2], n, per_repeat_ratios(cells, "current", "baseline", "post", key=key), colours["current"])
    axes[2].axhline(1.0, color="#8b949e", linestyle="--", linewidth=1)
    axes[2].set_xticks([0, 1], ["req/s\n(higher is better)", "worker CPU/request\n(lower is better)"], fontsize=8)
    axes[2].set_xlim(-0.6, 1.8)
    axes[2].set_title("current / baseline: dots per repeat, bar median,\nband its interval (order statistics)", fontsize=9)
    axes[2].tick_params(axis="y", labelsize=8)
    fig.suptitle(f"This checkout against {short} (before the database layer's redesign), PostgreSQL, gunicorn "
                 f"{baseline['workers']} workers x {baseline['threads']} threads, {baseline['repeats']} interleaved repeats",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(BASELINE_CHART, dpi=110)
    plt.close(fig)


OBSERVABILITY_COLOURS = {"on": "#1f6feb", "off": "#8b949e", "off-no-log": "#2da44e", "base-on": "#d29922"}
OBSERVABILITY_ROLES = {
    "on": "issue 18's defaults",
    "off": "the site before issue 18, as the bench always served it",
    "off-no-log": "stricter control: no request line at all",
}


def _settings_text(settings: dict[str, str | None]) -> str:
    shown = [f"`{name}={value}`" if value is not None else f"`{name}` unset"
             for name, value in settings.items() if name != "DATABASE_APP_NAME"]
    return ", ".join(shown)


def observability_verdict(observability: dict[str, Any]) -> tuple[float | None, bool | None]:
    """Issue 18's overhead goal: the median of the per-repeat on / off ratios of worker CPU
    per request, and whether it is at most the goal (None: not measured)."""
    cells = observability["cells"]
    cpu = per_repeat_ratios(cells, "on", "off", "post", key="cpu_us_per_request")
    if not cpu:
        return None, None
    middle = statistics.median(cpu)
    return middle, middle <= observability["goal"]


def observability_section(observability: dict[str, Any]) -> list[str]:
    """Issue 18's request line and metrics on against off on the post page
    (``bench/observability.py``, in ``make bench`` or a run of its own)."""
    cells, current, goal = observability["cells"], observability["current"], observability["goal"]
    here = f"`{current['short']}`" + (" with uncommitted changes" if current["uncommitted_changes"] else "")
    served = observability["served"]
    lines = [
        "",
        "## Request log and metrics on and off (issue 18, the post page, PostgreSQL)",
        "",
        f"`{observability['command']}` ({observability['date']}, {observability['total_seconds']} s; "
        f"`bench/observability.py`, also run by `make bench`): `GET /posts/<id>` (random ids) of this checkout "
        f"({here}) served by {len(observability['variants'])} gunicorn servers with the project's `gunicorn.conf.py` "
        f"({observability['workers']} workers x {observability['threads']} threads, the fault-handling defaults on) "
        "on the same seeded PostgreSQL database, all serving `bench/observed_wsgi.py` (the bench's myapp, CSRF off). "
        "They differ by the settings below alone; every server has its own port and, where the exporter is on, "
        "its own `METRICS_BIND` port (its master then names its own multiprocess folder, and the workers write "
        "their figures there). gunicorn's access log is its `accesslog` setting as `gunicorn --print-config` "
        "resolves it for that environment. "
        f"{observability['load_generator']} with {observability['connections']} connections, "
        f"{observability['seconds']:g} s cells, {observability['repeats']} repeats, the servers taking turns in "
        "an order that rotates each repeat (`run.measure_interleaved`). Worker CPU is the user + system time "
        "of the gunicorn workers (from /proc) over a cell, divided by its requests. Load average "
        f"{observability['load_average'][0]} at the start, {observability['load_average'][1]} at the end.",
        "",
        "| variant | settings | gunicorn's access log | post pages answered (wrk) | the app's request lines "
        "in the server's log | post pages counted by its `/metrics` |",
        "|---|---|---|--:|--:|--:|",
    ]
    for name, variant in observability["variants"].items():
        seen = served.get(name, {})
        exporter = " (and `METRICS_BIND` a free port)" if seen.get("metrics_url") else ""
        counted = seen.get("metrics_counted")
        base = observability.get("base") or {}
        role = OBSERVABILITY_ROLES.get(name) or f"`on` served from `{base.get('short')}` (`--base {base.get('revision')}`)"
        lines.append(
            f"| `{name}`: {role} | {_settings_text(variant['settings'])}{exporter} | "
            f"{'off' if variant['access_log'] == 'None' else '`' + variant['access_log'] + '`'} | "
            f"{seen.get('requests', 0):,} | {seen.get('log_lines', 0):,} | "
            f"{'no exporter' if counted is None else f'{counted:,}'} |"
        )
    lines += [
        "",
        f"![the post page, request log and metrics on and off, per repeat]({OBSERVABILITY_CHART.name})",
        "",
        "| variant | req/s (median) | worker CPU µs/request (median) | p50 ms | p99 ms | errors |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for name in observability["variants"]:
        mine = [c for c in cells if c["app"] == name]
        if not mine:
            continue
        cpus = [c["cpu_us_per_request"] for c in mine if c.get("cpu_us_per_request") is not None]
        lines.append(
            f"| `{name}` | {statistics.median(c['rps'] for c in mine):.0f} | "
            f"{_fmt(statistics.median(cpus) if cpus else None, 0)} | {statistics.median(c['p50_ms'] for c in mine):.2f} | "
            f"{statistics.median(c['p99_ms'] for c in mine):.2f} | {sum(c['errors'] for c in mine)} |"
        )
    lines += [
        "",
        "| ratio | median of the per-repeat ratios | interval of that median (its coverage) | lowest – highest repeat |",
        "|---|--:|--:|--:|",
    ]
    for measured, control in observability["pairs"]:
        for key, label in (("cpu_us_per_request", "worker CPU per request (lower is better)"),
                           ("rps", "req/s (higher is better)")):
            ratios = per_repeat_ratios(cells, measured, control, "post", key=key)
            lines.append(
                f"| `{measured}` / `{control}`: {label} | {_change(statistics.median(ratios) if ratios else None)} | "
                f"{_interval(ratios)} | {_fmt(min(ratios, default=None))} – {_fmt(max(ratios, default=None))} |"
            )
    middle, met = observability_verdict(observability)
    if middle is not None:
        cpu = per_repeat_ratios(cells, "on", "off", "post", key="cpu_us_per_request")
        interval = median_interval(cpu)
        lines += [
            "",
            f"**Goal (issue 18, point 3): logs plus metrics on cost at most {(goal - 1) * 100:.0f} % more worker CPU "
            f"per request than off (`on` / `off` <= {goal:.2f}x): {'met' if met else 'not met'}** "
            f"(`on` / `off` {_change(middle)})."
            + ("" if interval is None else
               f" The interval of that median, {interval[0]:.2f} – {interval[1]:.2f}, "
               + (f"lies under {goal:.2f}x." if interval[1] <= goal else
                  f"lies over {goal:.2f}x." if interval[0] > goal else
                  f"straddles {goal:.2f}x: this run cannot tell on which side of the goal the cost is.")),
        ]
    if any(c.get("workers_replaced") for c in cells):
        lines.append("A worker was replaced during at least one cell: that cell's CPU misses the replaced worker.")
    for note in observability.get("notes", []):
        lines += ["", f"Note: {note}"]
    return lines


def observability_chart(observability: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, goal = observability["cells"], observability["goal"]
    sides = {name: (name, OBSERVABILITY_COLOURS.get(name, "#d29922")) for name in observability["variants"]}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for axis, key, title in ((axes[0], "cpu_us_per_request", "worker CPU µs/request"), (axes[1], "rps", "req/s")):
        _per_repeat_lines(axis, cells, key, title, sides)
    columns = [(measured, control, key) for measured, control in observability["pairs"]
               for key in ("cpu_us_per_request", "rps")]
    for n, (measured, control, key) in enumerate(columns):
        _ratio_column(axes[2], n, per_repeat_ratios(cells, measured, control, "post", key=key),
                      OBSERVABILITY_COLOURS.get(control, "#1f6feb"))
    axes[2].axhline(1.0, color="#8b949e", linestyle="--", linewidth=1)
    axes[2].axhline(goal, color="#cf222e", linestyle=":", linewidth=1, label=f"goal: CPU <= {goal:.2f}x")
    axes[2].set_xticks(range(len(columns)), [
        f"{measured} / {control}\n{'CPU/request' if key != 'rps' else 'req/s'}" for measured, control, key in columns
    ], fontsize=7)
    axes[2].set_xlim(-0.6, len(columns) - 0.2)
    axes[2].set_title("ratios: dots per repeat, bar median,\nband its interval (order statistics)", fontsize=9)
    axes[2].legend(fontsize=7, loc="lower left")
    axes[2].tick_params(axis="y", labelsize=8)
    fig.suptitle(f"Request log and metrics on and off, GET /posts/<id>, PostgreSQL, gunicorn {observability['workers']} "
                 f"workers x {observability['threads']} threads, {observability['repeats']} interleaved repeats",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(OBSERVABILITY_CHART, dpi=110)
    plt.close(fig)


def replica_section(replicas: dict[str, Any]) -> list[str]:
    """The read replicas' figures (``bench/replicas.py``, a run of its own)."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for cell in replicas["served"]:
        grouped[cell["app"]].append(cell)
    by_repeat = {(cell["app"], cell["repeat"]): cell["rps"] for cell in replicas["served"]}
    lines = [
        "",
        "## Read replicas (PostgreSQL, a primary and two streaming standbys on this machine)",
        "",
        f"`{replicas['command']}` ({replicas['date']}, {replicas['total_seconds']} s; `bench/replicas.py`): "
        f"`GET /posts/<id>` served by gunicorn (2 workers x 4 threads) with 0, 1 and 2 replicas, "
        f"{replicas['load_generator']}, {replicas['seconds']:g} s cells, {replicas['repeats']} interleaved repeats. "
        "Every server shares the same 2 cores, so a replica adds no capacity here: read the ratios as the "
        "cost of routing, not as the gain a second host would bring.",
        "",
        "| replicas | req/s (median) | p50 ms | p99 ms | errors | / 0 replicas (median of per-repeat ratios) |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for app, cells in grouped.items():
        ratios = [by_repeat[app, cell["repeat"]] / by_repeat["0 replicas", cell["repeat"]]
                  for cell in cells if by_repeat.get(("0 replicas", cell["repeat"]))]
        lines.append(
            f"| {app} | {statistics.median(c['rps'] for c in cells):.0f} | "
            f"{statistics.median(c['p50_ms'] for c in cells):.2f} | {statistics.median(c['p99_ms'] for c in cells):.2f} | "
            f"{sum(c['errors'] for c in cells)} | {_fmt(statistics.median(ratios) if ratios else None)} |"
        )
    lines += [
        "",
        "What read-your-writes costs per request, in process (`GET /posts/<id>` through the test client, "
        "batches of 100 interleaved in random order, median of 30):",
        "",
        "| case | µs/request | statements per request, by server |",
        "|---|--:|---|",
    ]
    for row in replicas["check_cost"]:
        statements = ", ".join(f"{server}: {count:g}" for server, count in row["statements_per_request"].items())
        lines.append(f"| {row['case']} | {row['us_per_request']} | {statements} |")
    return lines


def _galera_by_mode(galera: dict[str, Any], test: str) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for cell in galera["cells"]:
        if cell["test"] == test:
            grouped[cell["mode"]].append(cell)
    return grouped


def _spread_over_pinned(cells: list[dict[str, Any]]) -> float | None:
    """Median over rounds of spread/pinned acknowledged writes per second, each pair from one round."""
    by_round: dict[int, dict[str, float]] = defaultdict(dict)
    for cell in cells:
        by_round[cell["repeat"]][cell["mode"]] = cell["acknowledged_per_second"]
    ratios = [r["spread"] / r["pinned"] for r in by_round.values() if r.get("pinned") and "spread" in r]
    return statistics.median(ratios) if ratios else None


def galera_section(galera: dict[str, Any]) -> list[str]:
    """Galera pinned against spread, and causal reads (``bench/galera.py``, a run of its own)."""
    reads = galera["reads"]
    lines = [
        "",
        "## Galera: pinned vs spread (MariaDB, a three-node cluster on this machine)",
        "",
        f"`{galera['command']}` ({galera['date']}, {galera['total_seconds']} s of which "
        f"{galera['cluster_start_seconds']} s starting the cluster; `bench/galera.py`; "
        f"{galera['versions']['server']}, Galera {galera['versions']['galera']}). In process: Flask test "
        f"clients in {galera['threads']} threads, one app with `DATABASE_GALERA=pinned` (every connection on "
        "node 1) and one with `spread` (new connections rotate over the nodes; the pool hands them out in turn), "
        f"{galera['rounds']} rounds alternating which mode goes first, each cell capped at "
        f"{galera['cell_seconds_cap']:g} s. Conflicting edits: every thread edits the same post "
        f"{galera['edits_per_thread']} times (the form, then the save with the version it read; 302 is "
        "acknowledged, 409 a conflict the user is shown). New posts: every thread publishes "
        f"{galera['posts_per_thread']} posts as its own author. Certification failures and brute-force aborts "
        "are the deltas of `wsrep_local_cert_failures` and `wsrep_local_bf_aborts` summed over the nodes; "
        "retries are `db.retrying()`'s log records. The three nodes and the threads share the same 2 cores: "
        "spreading adds no capacity here, so the figures show what the conflicts cost, not what three hosts "
        "would give.",
        "",
        f"![Galera: acknowledged writes per second, pinned and spread; causal reads]({GALERA_CHART.name})",
        "",
        "| writes | mode | acknowledged/s (median) | spread / pinned | acknowledged | 409 | cert failures "
        "| bf aborts | retries | 5xx | checkouts by node |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for test, label in (("conflicting edits", "one post edited by every thread"),
                        ("new posts", "new posts, one author per thread")):
        grouped = _galera_by_mode(galera, test)
        ratio_text = _fmt(_spread_over_pinned([c for cells in grouped.values() for c in cells]))
        for mode, cells in grouped.items():
            nodes: Counter[str] = Counter()
            for cell in cells:
                nodes.update(cell["checkouts_by_node"])
            total = sum(nodes.values()) or 1
            spread = ", ".join(f"{node} {100 * n / total:.0f}%" for node, n in sorted(nodes.items()))
            lines.append(
                f"| {label} | {mode} | {statistics.median(c['acknowledged_per_second'] for c in cells):.1f} | "
                f"{ratio_text if mode == 'spread' else ''} | "
                + " | ".join(str(sum(c[key] for c in cells)) for key in (
                    "acknowledged", "conflicts_409", "cert_failures", "bf_aborts", "retries", "server_errors"))
                + f" | {spread} |"
            )
    mismatched = [c for c in galera["cells"] if c["test"] == "conflicting edits" and not c.get("versions_match")]
    lines += [
        "",
        "Every conflicting-edits cell ends with the post's version equal to 1 + its acknowledged edits "
        "(no acknowledged edit lost or doubled)"
        + (": yes." if not mismatched else f": **no**, in {len(mismatched)} cells."),
        "",
        f"Causal reads (`GET /posts/<id>` on node 1, pinned, in process; batches of {reads['batch']} random "
        f"existing ids alternating between the three apps in random order, median of {reads['batches']}). "
        "The reference app reaches node 1 by a plain URL: no Galera handling, so no readiness check "
        "(`DO 1`, refused by a node that is not ready) at checkout and the server's `wsrep_sync_wait` (0). Under writes, one more "
        "thread publishes posts through node 2 meanwhile, so that node 1 has writesets to apply "
        "before a causal read may run:",
        "",
        "| cluster | app | µs/request | sync_wait 1 / 0 | sync_wait 1 / no Galera handling |",
        "|---|---|--:|--:|--:|",
    ]
    for condition in reads["conditions"]:
        label = condition["condition"]
        if condition.get("background_writes"):
            label += f" ({condition['background_writes']} posts, {condition['background_errors']} failed)"
        for n, case in enumerate(condition["cases"]):
            ratios = f"{condition['ratio']:.2f} | {condition['ratio_to_plain']:.2f}" if n == 0 else " | "
            lines.append(f"| {label if n == 0 else ''} | `{case['case']}` | {case['us_per_request']} | {ratios} |")
    return lines


def galera_chart(galera: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"pinned": "#1f6feb", "spread": "#d29922"}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for axis, test in zip(axes, ("conflicting edits", "new posts")):
        grouped = _galera_by_mode(galera, test)
        modes = list(grouped)
        values = [statistics.median(c["acknowledged_per_second"] for c in grouped[mode]) for mode in modes]
        bars = axis.bar(range(len(modes)), values, color=[colours.get(mode, "#8b949e") for mode in modes])
        for position, mode in enumerate(modes):  # each round's figure
            axis.plot([position] * len(grouped[mode]), [c["acknowledged_per_second"] for c in grouped[mode]],
                      "o", color="black", markersize=3)
        axis.set_xticks(range(len(modes)), modes, fontsize=8)
        axis.set_title(f"{test}: acknowledged/s", fontsize=9)
        for bar, value, mode in zip(bars, values, modes):  # inside the bar, clear of the dots
            cert = sum(c["cert_failures"] for c in grouped[mode])
            axis.annotate(f"{value:.1f}/s\n{cert} cert failures", (bar.get_x() + bar.get_width() / 2, value * 0.1),
                          ha="center", va="bottom", fontsize=7, color="white")
        axis.margins(y=0.1)
        axis.tick_params(axis="y", labelsize=8)
    conditions = galera["reads"]["conditions"]
    cases = [case["case"] for case in conditions[0]["cases"]]
    width = 0.8 / len(cases)
    shades = ["#2da44e", "#8b949e", "#d0d7de"]
    for n, case in enumerate(cases):
        values = [condition["cases"][n]["us_per_request"] for condition in conditions]
        positions = [c + (n - (len(cases) - 1) / 2) * width for c in range(len(conditions))]
        bars = axes[2].bar(positions, values, width, label=case, color=shades[n % len(shades)])
        for bar, value in zip(bars, values):
            axes[2].annotate(f"{value}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                             fontsize=6)
    axes[2].set_xticks(range(len(conditions)), ["idle" if c["condition"] == "idle cluster" else "under writes"
                                                for c in conditions], fontsize=8)
    axes[2].set_title("GET /posts/<id>, node 1: µs/request (median)", fontsize=9)
    axes[2].legend(fontsize=6, loc="upper left")
    axes[2].margins(y=0.15)
    axes[2].tick_params(axis="y", labelsize=8)
    fig.suptitle(f"MariaDB Galera, 3 nodes on one 2-core machine, {galera['threads']} threads in process "
                 f"(dots: each of {galera['rounds']} rounds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(GALERA_CHART, dpi=110)
    plt.close(fig)


def postgres_sections(results: dict[str, Any]) -> list[str]:
    """The PostgreSQL table, its connection peaks, the before/after variants and the
    in-process A/B tables."""
    lines: list[str] = []
    lines += ["", "## PostgreSQL: every app", ""]
    lines += table(results, "postgresql", APPS)
    connections = results.get("connections", {})
    if connections:
        lines += [
            "",
            "Peak server-side connections seen in `pg_stat_activity` (polled every 0.1 s) per app: "
            + ", ".join(f"{k}: {v}" for k, v in sorted(connections.get("peaks", {}).items()))
            + f". myapp's bound is workers x (pool_size + max_overflow) = {connections.get('limit')}.",
        ]
    variants = [
        ("free pre-ping on a quiet socket (vs a SELECT round trip at every checkout)", "myapp-full-ping", ("post", "index")),
        ("GET requests read in autocommit (vs BEGIN ... ROLLBACK)", "myapp-no-autocommit", ("post",)),
    ]
    lines += [
        "",
        "## Optimisations, before and after in the same run (PostgreSQL)",
        "",
        "| change | route | after req/s | before req/s | after / before |",
        "|---|---|--:|--:|--:|",
    ]
    stats = medians(results["cells"], "postgresql")
    for label, before, routes in variants:
        for route in routes:
            if (before, route) in stats and ("myapp", route) in stats:
                lines.append(
                    f"| {label} | {ROUTES[route]} | {stats['myapp', route]['rps']:.0f} | "
                    f"{stats[before, route]['rps']:.0f} | {_fmt(ratio(results['cells'], 'myapp', before, route))} |"
                )
    if results.get("ab"):
        lines += [
            "",
            "The same changes measured in process (`bench/ab.py`: no gunicorn, batches of requests",
            "alternating between the app and its \"before\" within a fraction of a second, median of",
            "the per-pair ratios), which this busy machine disturbs far less:",
            "",
            "| change | route | after µs/request | before µs/request | after / before throughput |",
            "|---|---|--:|--:|--:|",
        ]
        for row in results["ab"]:
            lines.append(
                f"| {row['change']} | `GET {row['route'].replace('{}', 'N')}` | {row['after_us']} | "
                f"{row['before_us']} | {row['ratio']:.2f} ({row['pairs']} pairs) |"
            )
    if results.get("ab_peers"):
        lines += [
            "",
            "## myapp against the peers in process (PostgreSQL)",
            "",
            "The served figures above move by up to 2x between repeats on this busy machine. The",
            "same comparison without gunicorn or HTTP, with batches alternating between myapp and",
            "the peer within a fraction of a second (`bench/ab.py`), resolves the database layers'",
            "difference much better (the Flask, HTTP and gunicorn costs it leaves out are the same",
            "for every app, so served ratios sit closer to 1 than these):",
            "",
            "| comparison | route | myapp µs/request | peer µs/request | myapp / peer throughput |",
            "|---|---|--:|--:|--:|",
        ]
        for row in results["ab_peers"]:
            lines.append(
                f"| {row['change']} | `GET {row['route'].replace('{}', 'N')}` | {row['after_us']} | "
                f"{row['before_us']} | {row['ratio']:.2f} ({row['pairs']} pairs) |"
            )
    return lines


FLAMES = (
    ("post-before", "myapp's post page before issue 17's changes"),
    ("post-after", "myapp's post page after them"),
    ("post-psycopg-raw", "the raw psycopg peer's post page"),
    ("post-obs-on", "myapp's post page with issue 18's request line and metrics on (`--app obs-on`)"),
    ("post-obs-off", "the same with them off and gunicorn's access log to /dev/null (`--app obs-off`)"),
)


def flame_section() -> list[str]:
    """The served post page's flame graphs (``make bench-flame``), where they exist."""
    found = [(label, what) for label, what in FLAMES if (DOC.parent / "flame" / f"{label}.svg").exists()]
    if not found:
        return []
    lines = [
        "", "## Where the post page's time goes, served (flame graphs)", "",
        "py-spy on both gunicorn workers under wrk, the stack of the thread holding the GIL "
        "(`python -m bench.flame --label LABEL`); each page below has the costs by layer and the top functions.",
        "",
    ]
    for label, what in found:
        lines += [f"- [{what}](flame/{label}.md)", "", f"  ![{what}](flame/{label}.svg)", ""]
    return lines


def write(results: dict[str, Any], main_chart: bool = True) -> None:
    """The whole document from every results file; ``main_chart=False`` leaves
    ``performance.png`` as the last ``make bench`` drew it (a run of another bench)."""
    settings, machine = results["settings"], results["machine"]
    has_postgresql = any(c["backend"] == "postgresql" for c in results["cells"])
    lines = [
        "# Performance",
        "",
        "Generated by `make bench` (`bench/run.py`, then `bench/report.py`); do not edit by hand:",
        "the hand-written part is `bench/notes.md`. Raw figures: `bench/results/latest.json`.",
        "",
        f"- Date: {settings['date']}; whole run {settings.get('total_seconds', '?')} s.",
        f"- Machine: {machine['cpus']} cores ({machine['cpu']}), {machine['memory_gb']} GiB, "
        f"{machine['system']}, Python {machine['python']}; load average "
        f"{machine['load_average_at_start']} at start, {machine.get('load_average_at_end')} at the end. "
        "The machine is shared with other work running at the same time, so absolute numbers are noisy; "
        "the ratios, taken between apps measured in the same repeat, are what to read.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in settings["versions"].items()) + ".",
        f"- Servers: gunicorn with the project's `gunicorn.conf.py` for every app (gthread, "
        f"{settings['workers']} workers x {settings['threads']} threads, its defaults; access log to /dev/null). "
        "myapp is `create_app()` with CSRF off (`bench/project_wsgi.py`) and its default pool (5 + 5, 5 s timeout).",
        f"- Load: {settings['load_generator']} on loopback, {settings['connections']} keep-alive connections, "
        f"{settings['seconds']:g} s per cell after a 1 s warm-up, {settings['repeats']} repeats with the apps "
        "interleaved (their order rotates each repeat); medians. Ratios are medians of per-repeat ratios.",
        "- Worker CPU per request: the user + system time of an app's gunicorn workers over a cell (from /proc), "
        "divided by the cell's requests. It moves less than req/s when other work takes the cores. Ratios in CPU "
        "(\"CPU\" columns) are the peer's µs over the app's: the app's requests per CPU second relative to the "
        "peer's, so that above 1 is better for the app, as in req/s.",
        "- Backends: PostgreSQL serves every app below; MariaDB and SQLite serve myapp, Flask-SQLAlchemy, "
        "their hand-written raw peer (PyMySQL, sqlite3) and bare Flask"
        + (f" (this run: {', '.join(BACKEND_TITLES.get(b, b) for b in settings['backends'])})"
           if settings.get("backends") else "") + ".",
        "- Data: 1,000 users and 10,000 posts (`flask seed`) in a throwaway `myapp_bench` database; "
        "random post ids, random pages 1-500; posts written by the create route are deleted after each cell.",
        "",
        "![requests per second per app and route](performance.png)",
        "",
        "## Goals (ratios from the same run; PostgreSQL unless the goal names its backend)",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
    ]
    for goal, measured, met in goals(results):
        verdict = "not measured" if met is None else "met" if met else "**not met**"
        lines.append(f"| {goal} | {measured} | {verdict} |")
    baseline = json.loads(BASELINE_RESULTS.read_text()) if BASELINE_RESULTS.exists() else None
    if baseline is not None:
        lines += baseline_section(baseline)
    if has_postgresql:
        lines += postgres_sections(results)
        lines += faults_section(results)
    observability = json.loads(OBSERVABILITY_RESULTS.read_text()) if OBSERVABILITY_RESULTS.exists() else None
    if observability is not None:
        lines += observability_section(observability)
    for backend in ("mysql", "sqlite"):
        if any(c["backend"] == backend for c in results["cells"]):
            raw_label = RAW[backend][1]
            lines += [
                "", f"## {BACKEND_TITLES[backend]}: myapp, Flask-SQLAlchemy, raw {raw_label} and bare Flask", "",
                f"The same routes, data and servers as PostgreSQL's, the apps interleaved the same way. The raw peer "
                f"(`bench/peers/{'pymysql_raw' if backend == 'mysql' else 'sqlite_raw'}.py`) is hand-written "
                f"{raw_label} with one connection per thread, each statement its own transaction: the floor "
                f"of what this backend costs through the driver myapp uses on it. Unlike the psycopg peer, its "
                f"index page picks the page's ids from the `(created_at, id)` index before joining, as myapp's "
                f"query does: the psycopg peer's plain join with `ORDER BY ... OFFSET` is "
                + ("planned by MariaDB as a temporary table and a filesort of every post (about 100x slower)"
                   if backend == "mysql" else "run by SQLite through every skipped row (about 40x the CPU)")
                + ", which would be no floor.",
                "",
            ]
            lines += table(results, backend, BACKEND_APPS[backend])
    if REPLICA_RESULTS.exists():
        lines += replica_section(json.loads(REPLICA_RESULTS.read_text()))
    galera = json.loads(GALERA_RESULTS.read_text()) if GALERA_RESULTS.exists() else None
    if galera is not None:
        lines += galera_section(galera)
    for note in results.get("notes", []):
        lines += ["", f"Note: {note}"]
    lines += flame_section()
    if NOTES.exists():
        lines += ["", NOTES.read_text().strip()]
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n")
    if main_chart and has_postgresql:
        chart(results)
    if galera is not None:
        galera_chart(galera)
    if baseline is not None:
        baseline_chart(baseline)
    if observability is not None:
        observability_chart(observability)


if __name__ == "__main__":
    write(json.loads(RESULTS.read_text()))
