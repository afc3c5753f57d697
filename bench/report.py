"""Turn a run's results into ``docs/performance.md`` and ``docs/performance.png``.

``python -m bench.report`` rewrites both from ``bench/results/latest.json`` without
measuring again; the hand-written part (what was tried, profiles) is ``bench/notes.md``.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"
CHART = ROOT / "docs" / "performance.png"
NOTES = ROOT / "bench" / "notes.md"
RESULTS = ROOT / "bench" / "results" / "latest.json"
REPLICA_RESULTS = ROOT / "bench" / "results" / "replicas.json"  # bench/replicas.py

APPS = (
    "myapp", "flask-sqlalchemy", "flask-docs", "psycopg", "bare-flask",
    "myapp-1-worker", "myapp-full-ping", "myapp-no-autocommit",
)
ROUTES = {
    "healthz": "`GET /healthz` (no database)",
    "post": "`GET /posts/<id>` (random id)",
    "index": "`GET /?page=N` (20 posts + authors)",
    "create": "`POST /posts/new` (logged in)",
}
PEERS = ("flask-sqlalchemy", "psycopg", "bare-flask")


def medians(cells: list[dict[str, Any]], backend: str) -> dict[tuple[str, str], dict[str, float]]:
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for cell in cells:
        if cell["backend"] == backend:
            grouped[cell["app"], cell["route"]].append(cell)
    return {
        key: {
            "rps": statistics.median(c["rps"] for c in group),
            "p50": statistics.median(c["p50_ms"] for c in group),
            "p99": statistics.median(c["p99_ms"] for c in group),
            "errors": sum(c["errors"] for c in group),
            "runs": len(group),
        }
        for key, group in grouped.items()
    }


def ratio(cells: list[dict[str, Any]], app: str, peer: str, route: str, backend: str = "postgresql") -> float | None:
    """Median over repeats of app/peer throughput, each pair measured in the same repeat."""
    by_repeat: dict[int, dict[str, float]] = defaultdict(dict)
    for cell in cells:
        if cell["backend"] == backend and cell["route"] == route and cell["app"] in (app, peer):
            by_repeat[cell["repeat"]][cell["app"]] = cell["rps"]
    ratios = [r[app] / r[peer] for r in by_repeat.values() if app in r and peer in r and r[peer]]
    return statistics.median(ratios) if ratios else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def goals(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    cells = results["cells"]
    r = lambda app, peer, route: ratio(cells, app, peer, route)  # noqa: E731
    out: list[tuple[str, str, bool]] = []

    healthz = r("myapp", "bare-flask", "healthz")
    out.append(("1. no-database route >= 0.97x bare Flask", f"{_fmt(healthz)}x", (healthz or 0) >= 0.97))

    post_fsa, post_raw = r("myapp", "flask-sqlalchemy", "post"), r("myapp", "psycopg", "post")
    out.append((
        "2. `GET /posts/<id>` >= 1.25x Flask-SQLAlchemy and >= 0.80x psycopg",
        f"{_fmt(post_fsa)}x FSA, {_fmt(post_raw)}x psycopg",
        (post_fsa or 0) >= 1.25 and (post_raw or 0) >= 0.80,
    ))

    index_fsa = r("myapp", "flask-sqlalchemy", "index")
    queries = results.get("queries", {})
    most = max(queries.values()) if queries else None
    out.append((
        "3. `GET /?page=N` >= 1.25x Flask-SQLAlchemy, <= 2 queries at any page size and number",
        f"{_fmt(index_fsa)}x FSA; queries: " + ", ".join(f"{k}: {v}" for k, v in queries.items()),
        (index_fsa or 0) >= 1.25 and most is not None and most <= 2,
    ))

    create_fsa = r("myapp", "flask-sqlalchemy", "create")
    out.append(("4. create >= 1.0x Flask-SQLAlchemy", f"{_fmt(create_fsa)}x", (create_fsa or 0) >= 1.0))

    scale_post, scale_index = r("myapp", "myapp-1-worker", "post"), r("myapp", "myapp-1-worker", "index")
    connections = results.get("connections", {})
    peaks = connections.get("peaks", {})
    peak, peak_1w = peaks.get("myapp-bench", 0), peaks.get("myapp-bench-1w", 0)
    limit, limit_1w = connections.get("limit", 20), connections.get("limit_1_worker", 10)
    scaled = (scale_post or 0) >= 1.15 and (scale_index or 0) >= 1.15
    out.append((
        "5. throughput grows with workers (2 vs 1, >= 1.15x); connections <= workers x (pool_size + max_overflow); "
        "pool timeout (5 s) below gunicorn's timeout (30 s)",
        f"2 workers / 1 worker: {_fmt(scale_post)}x post, {_fmt(scale_index)}x index; peak connections "
        f"{peak} (limit {limit}) with 2 workers, {peak_1w} (limit {limit_1w}) with 1",
        scaled and peak <= limit and peak_1w <= limit_1w,
    ))

    memory = results.get("memory", {})
    before, after = memory.get("rss_before_mb", []), memory.get("rss_after_mb", [])
    growth = max((a - b for a, b in zip(after, before)), default=None)
    out.append((
        "6. a worker's RSS flat (< 5 MB growth; the 50,000-request soak is the fault suite's)",
        f"+{_fmt(growth, 1)} MB at most over {memory.get('requests', 0):,} requests "
        f"(workers {before} -> {after} MB)",
        growth is not None and growth < 5,
    ))
    return out


def table(results: dict[str, Any], backend: str, apps: tuple[str, ...]) -> list[str]:
    cells = results["cells"]
    stats = medians(cells, backend)
    lines = [
        "| route | app | req/s | p50 ms | p99 ms | x FSA | x psycopg | x bare Flask | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for route, label in ROUTES.items():
        for app in apps:
            s = stats.get((app, route))
            if s is None:
                continue
            ratios = [
                "" if peer == app else _fmt(ratio(cells, app, peer, route, backend)) if (peer, route) in stats else "–"
                for peer in PEERS
            ]
            name = f"**{app}**" if app == "myapp" else app
            lines.append(
                f"| {label} | {name} | {s['rps']:.0f} | {s['p50']:.2f} | {s['p99']:.2f} | "
                + " | ".join(ratios) + f" | {s['errors']} |"
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


def write(results: dict[str, Any]) -> None:
    settings, machine = results["settings"], results["machine"]
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
        "- Data: 1,000 users and 10,000 posts (`flask seed`) in a throwaway `myapp_bench` database; "
        "random post ids, random pages 1-500; posts written by the create route are deleted after each cell.",
        "",
        "![requests per second per app and route](performance.png)",
        "",
        "## Goals (PostgreSQL, ratios from the same run)",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
    ]
    for goal, measured, met in goals(results):
        lines.append(f"| {goal} | {measured} | {'met' if met else '**not met**'} |")
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
    for backend, title in (("sqlite", "SQLite"), ("mysql", "MariaDB")):
        if any(c["backend"] == backend for c in results["cells"]):
            lines += ["", f"## {title}: myapp alone", ""]
            lines += [line for line in table(results, backend, ("myapp",))]
    if REPLICA_RESULTS.exists():
        lines += replica_section(json.loads(REPLICA_RESULTS.read_text()))
    for note in results.get("notes", []):
        lines += ["", f"Note: {note}"]
    if NOTES.exists():
        lines += ["", NOTES.read_text().strip()]
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n")
    chart(results)


if __name__ == "__main__":
    write(json.loads(RESULTS.read_text()))
