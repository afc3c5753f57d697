"""Figures measured by the fault suite, collected for ``docs/reliability.md``.

Each fault test calls :func:`record` with what it injected and what it measured. The
records go, one JSON object per line, to the file named by ``MYAPP_FIGURES`` (the
report command sets it); without it they are dropped, so a plain test run writes nothing.

A test that ran a Prometheus server (issue 18) also calls :func:`record_series` with
the series it scraped; they go next to the figures, to ``<figures stem>.series.jsonl``,
and the report draws them (``draw_series_chart`` in scripts/reliability_report.py
documents the shape of a line).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SERIES_SUFFIX = ".series.jsonl"


def record(
    scenario: str,
    backend: str,
    injected: str,
    figure: str,
    value: float,
    goal: str,
    met: bool,
) -> None:
    """Append one measured figure; ``value`` is the number a chart can draw."""
    target = os.environ.get("MYAPP_FIGURES")
    if not target:
        return
    entry = {
        "scenario": scenario,
        "backend": backend,
        "injected": injected,
        "figure": figure,
        "value": value,
        "goal": goal,
        "met": met,
        "at": _now(),
    }
    _append(Path(target), entry)


def _append(path: Path, entry: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as sink:
        sink.write(json.dumps(entry) + "\n")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def series_path(figures: Path) -> Path:
    """Where the series of a figures file go: beside it, same stem (figures.series.jsonl)."""
    return figures.with_suffix(SERIES_SUFFIX)


def _finite(value: float) -> float | None:
    """NaN and infinities (a rate over no samples) become null: strict JSON, and a gap in the line."""
    return value if math.isfinite(value) else None


def panel(title: str, query: str, result: Sequence[tuple[dict[str, str], Sequence[tuple[float, float]]]],
          start: float, unit: str = "") -> dict[str, Any]:
    """One chart panel from a range query's result (``Prometheus.query_range``): its times
    become seconds since ``start`` (Unix seconds), so that panels of one run line up."""
    return {
        "title": title,
        "unit": unit,
        "query": query,
        "series": [
            {"labels": dict(labels), "points": [[round(t - start, 3), _finite(v)] for t, v in points]}
            for labels, points in result
        ],
    }


def record_series(scenario: str, backend: str, start: float, panels: Sequence[dict[str, Any]],
                  events: Sequence[tuple[float, str]] = ()) -> None:
    """Append one run's scraped series (panels made by :func:`panel`) and its events
    ((Unix seconds, what happened): "link down", "replica stopped"...) for the report's chart."""
    target = os.environ.get("MYAPP_FIGURES")
    if not target:
        return
    entry = {
        "scenario": scenario,
        "backend": backend,
        "start": start,
        "events": [{"at": round(at - start, 3), "label": label} for at, label in events],
        "panels": list(panels),
        "at": _now(),
    }
    _append(series_path(Path(target)), entry)
