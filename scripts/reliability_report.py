"""Run the fault suite and write docs/reliability.md and docs/reliability.png from its figures.

Usage (``make reliability`` runs the first form)::

    python scripts/reliability_report.py [extra pytest arguments]
    python scripts/reliability_report.py --from-figures figures.jsonl   # redraw only

Every fault test calls ``tests.faults.figures.record``; with ``MYAPP_FIGURES`` naming a
file, each figure lands there as one JSON line. This script sets it, runs
``pytest -m faults``, and turns the lines into a table (scenario, backend, what was
injected, the figure, its goal, met or not) and a bar chart, so the document is
produced by a command and never typed by hand. The exit status is non-zero when a
test failed or a figure missed its goal.

A test that ran a Prometheus server also records the series it scraped (breaker state,
503 rate, replica lag...) beside the figures, in ``<figures stem>.series.jsonl``; they
are drawn over time in docs/reliability-prometheus.png (see ``draw_series_chart``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
CHART = ROOT / "docs" / "reliability.png"
SERIES_CHART = ROOT / "docs" / "reliability-prometheus.png"
SERIES_SUFFIX = ".series.jsonl"  # as tests/faults/figures.py names the file beside the figures
# The servers .ci/run and the README use, unless the environment names others.
DEFAULT_SERVERS = {
    "TEST_POSTGRES_URL": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "TEST_MYSQL_URL": "mysql+pymysql://root@127.0.0.1:3306/test",
}


@dataclass
class TestOutcome:
    name: str
    outcome: str  # passed, failed, error, skipped
    seconds: float


@dataclass
class Run:
    command: str
    exit_code: int
    seconds: float
    tests: list[TestOutcome]


def run_suite(figures: Path, extra: list[str]) -> Run:
    """Run ``pytest -m faults`` with the figures going to ``figures``."""
    junit = figures.with_suffix(".xml")
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "faults", "-q",
               f"--junitxml={junit}", *extra]
    environment = {**DEFAULT_SERVERS, **os.environ, "MYAPP_FIGURES": str(figures)}
    shown = "MYAPP_FIGURES=<temp file> python -m pytest -m faults" + (" " + " ".join(extra) if extra else "")
    print(f"reliability: {shown}", flush=True)
    started = time.monotonic()
    exit_code = subprocess.call(command, cwd=ROOT, env=environment)
    return Run(shown, exit_code, time.monotonic() - started, read_junit(junit))


def run_soaks(figures: Path, requests: int) -> list[str]:
    """The RSS soak (scenario 5, ``scripts/soak.py``) on SQLite and PostgreSQL; its
    figures go to the same file. Returns the commands, for the doc."""
    environment = {**DEFAULT_SERVERS, **os.environ, "MYAPP_FIGURES": str(figures)}
    commands = []
    for url in (None, environment["TEST_POSTGRES_URL"]):
        command = [sys.executable, "scripts/soak.py", "--requests", str(requests)]
        if url:
            command += ["--database-url", url]
        shown = "python " + " ".join(command[1:])
        print(f"reliability: {shown}", flush=True)
        subprocess.call(command, cwd=ROOT, env=environment)  # a missed goal shows as a figure
        commands.append(shown)
    return commands


def read_junit(path: Path) -> list[TestOutcome]:
    if not path.exists():
        return []
    tests = []
    for case in ElementTree.parse(path).iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
        module = case.get("classname", "").replace(".", "/")
        tests.append(TestOutcome(f"{module}.py::{case.get('name')}", outcome, float(case.get("time", 0))))
    return tests


def read_figures(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_series(figures: Path) -> list[dict[str, Any]]:
    """The Prometheus recordings saved beside a figures file (none when no test made one)."""
    return read_figures(figures.with_suffix(SERIES_SUFFIX))


def _scenario_key(entry: dict[str, Any]) -> tuple[int, str, str]:
    match = re.match(r"(\d+)", entry["scenario"])
    return (int(match.group(1)) if match else 999, entry["scenario"], entry["backend"])


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def write_doc(figures: list[dict[str, Any]], run: Run | None, chart: bool, series_chart: bool = False) -> None:
    figures = sorted(figures, key=_scenario_key)
    missed = [f for f in figures if not f["met"]]
    lines = [
        "# Reliability",
        "",
        "Generated by `make reliability` (`scripts/reliability_report.py`); do not edit by hand.",
        "Each row is a figure measured by a test of the fault suite (`pytest -m faults`): what was",
        "injected, what was measured, the goal, and whether it was met. Negative controls turn a",
        "protection off on purpose: their goal is that the harness *sees* the failure.",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    ]
    if run is not None:
        passed = sum(t.outcome == "passed" for t in run.tests)
        lines += [
            f"- Command: `{run.command}`; exit code {run.exit_code}; {passed} of {len(run.tests)} tests "
            f"passed in {run.seconds:.0f} s.",
        ]
    lines += [
        f"- Figures: {len(figures)}; at their goal: {len(figures) - len(missed)}; missed: {len(missed)}.",
        "- Servers: scenarios 1-3 run on throwaway PostgreSQL and MariaDB servers the tests start",
        "  themselves (`tests/support/servers.py`); 11-15 on throwaway topologies they start once per",
        "  session (`tests/topology/`: standbys, PgBouncer, network namespaces, a three-node",
        "  MariaDB Galera cluster); the others on the shared test servers.",
        "- The worker-RSS figures of scenario 5 come from `scripts/soak.py` (one gunicorn",
        "  worker, 50,000 requests after a warm-up) on SQLite and PostgreSQL, run by the same command.",
        "",
    ]
    if chart:
        lines += [f"![figures of the fault suite]({CHART.name})", ""]
    if series_chart:
        lines += ["Series that a Prometheus server of the fault suite scraped from gunicorn every second,",
                  "over the faults the test injected (dashed lines):", "",
                  f"![series scraped by Prometheus]({SERIES_CHART.name})", ""]
    lines += [
        "| scenario | backend | injected | figure | value | goal | met |",
        "|---|---|---|---|--:|---|---|",
    ]
    for f in figures:
        met = "yes" if f["met"] else "**no**"
        lines.append(
            f"| {_cell(f['scenario'])} | {f['backend']} | {_cell(f['injected'])} | {_cell(f['figure'])} "
            f"| {_value(f['value'])} | {_cell(f['goal'])} | {met} |"
        )
    if run is not None and run.tests:
        lines += ["", "## Tests", "", "| test | outcome | seconds |", "|---|---|--:|"]
        for test in run.tests:
            outcome = test.outcome if test.outcome == "passed" else f"**{test.outcome}**"
            lines.append(f"| `{test.name}` | {outcome} | {test.seconds:.1f} |")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _group(entry: dict[str, Any]) -> str:
    """The scenario's short name and backend: "1 restart under load · mysql"."""
    name = re.split(r" \(|, ", entry["scenario"])[0]
    return f"{name} · {entry['backend']}"


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend, or None (with a note) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("reliability: matplotlib is not installed (pip install -e '.[bench]'); no chart", file=sys.stderr)
        return None
    return plt


def draw_chart(figures: list[dict[str, Any]]) -> bool:
    """One bar per scenario number and backend: how many of its figures (negative
    controls included) met their goal, in green, and how many missed, in red."""
    plt = _pyplot()
    if plt is None or not figures:
        return False
    groups: dict[tuple[int, str], list[int]] = {}
    names: dict[tuple[int, str], str] = {}
    for entry in sorted(figures, key=_scenario_key):
        key = (_scenario_key(entry)[0], entry["backend"])
        names.setdefault(key, _group(entry))  # the first (plain) scenario of that number names it
        groups.setdefault(key, [0, 0])[0 if entry["met"] else 1] += 1
    keys = sorted(groups)
    labels = [names[key] for key in keys]
    met = [groups[key][0] for key in keys]
    missed = [groups[key][1] for key in keys]
    positions = list(range(len(labels)))
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.3 * len(labels) + 1.2)))
    ax.barh(positions, met, color="#2e7d32", label="at goal")
    ax.barh(positions, missed, left=met, color="#c62828", label="missed")
    for position, (ok, bad) in enumerate(zip(met, missed)):
        ax.text(ok + bad, position, f" {ok}/{ok + bad}", va="center", fontsize=8)
    ax.set_yticks(positions, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("figures measured (values in docs/reliability.md)")
    ax.set_title("Fault suite: figures at their goal, per scenario and backend")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(CHART, dpi=100)
    plt.close(fig)
    return True


def _legend_name(labels: dict[str, str]) -> str:
    """A series' labels without the ones every series of a run shares."""
    shown = {name: value for name, value in labels.items() if name not in ("job", "instance", "__name__")}
    return ", ".join(f"{name}={value}" for name, value in sorted(shown.items())) or "all"


def draw_series_chart(recordings: list[dict[str, Any]], path: Path = SERIES_CHART) -> bool:
    """Draw Prometheus series over time: one column per recording, one row per panel title.

    A recording is one line of ``<figures stem>.series.jsonl``, written by
    ``tests.faults.figures.record_series``::

        {"scenario": "18 ...", "backend": "postgresql",
         "start": 1700000000.0,                       # Unix seconds: t = 0 of the x axis
         "events": [{"at": 12.0, "label": "link down"}, ...],   # seconds since start
         "panels": [{"title": "breaker open (workers)", "unit": "", "query": "<PromQL>",
                     "series": [{"labels": {"server": "primary", ...},
                                 "points": [[0.0, 0.0], [1.0, 1.0], [2.0, null], ...]}]}],
         "at": "2024-01-01T00:00:00Z"}

    Point times are seconds since ``start``; a null value (NaN, no sample) is a gap. Events
    are dashed vertical lines. Returns False, drawing nothing, without recordings or matplotlib.
    """
    plt = _pyplot() if recordings else None
    if plt is None:
        return False
    titles = list(dict.fromkeys(panel["title"] for run in recordings for panel in run["panels"]))
    fig, axes = plt.subplots(len(titles), len(recordings), squeeze=False, sharex="col",
                             figsize=(5.5 * len(recordings), 2.2 * len(titles) + 0.8))
    for column, run in enumerate(recordings):
        axes[0][column].set_title(f"{run['scenario']} · {run['backend']}", fontsize=9)
        axes[-1][column].set_xlabel("seconds")
        panels = {panel["title"]: panel for panel in run["panels"]}
        for row, title in enumerate(titles):
            _draw_panel(axes[row][column], panels.get(title), title, run["events"], name_events=row == 0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _draw_panel(ax: Any, panel: dict[str, Any] | None, title: str, events: list[dict[str, Any]],
                name_events: bool) -> None:
    """One panel's series as lines (null values as gaps), under the run's events (named
    on the top row only, so that the labels do not hide the lines of every row)."""
    ax.set_ylabel(title + (f" ({panel['unit']})" if panel and panel["unit"] else ""), fontsize=8)
    for event in events:
        ax.axvline(event["at"], color="#757575", linestyle="--", linewidth=0.8)
        if name_events:
            ax.annotate(event["label"], (event["at"], 1), xycoords=("data", "axes fraction"), fontsize=7,
                        rotation=90, va="top", ha="right", color="#616161")
    if panel is None:
        ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", fontsize=8)
        return
    for series in panel["series"]:
        times = [t for t, _ in series["points"]]
        values = [float("nan") if v is None else v for _, v in series["points"]]
        ax.plot(times, values, linewidth=1.2, label=_legend_name(series["labels"]))
    if panel["series"]:
        ax.legend(fontsize=7, loc="best")  # where it hides the fewest points and event labels
    ax.tick_params(labelsize=8)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-figures", type=Path, help="redraw from an existing JSONL file, run nothing")
    parser.add_argument("--soak-requests", type=int, default=50_000, help="requests per soak (0: no soak)")
    args, extra = parser.parse_known_args(argv)
    run: Run | None = None
    if args.from_figures:
        figures, series = read_figures(args.from_figures), read_series(args.from_figures)
    else:
        with tempfile.TemporaryDirectory(prefix="myapp-figures-") as folder:
            path = Path(folder) / "figures.jsonl"
            run = run_suite(path, extra)
            if args.soak_requests:
                run_soaks(path, args.soak_requests)
            figures, series = read_figures(path), read_series(path)
    write_doc(figures, run, chart=draw_chart(figures), series_chart=draw_series_chart(series))
    missed = sum(not f["met"] for f in figures)
    print(f"reliability: {len(figures)} figures, {missed} missed; wrote {DOC.relative_to(ROOT)}")
    if run is not None and run.exit_code != 0:
        return run.exit_code
    return 1 if missed or not figures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
