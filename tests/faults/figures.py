"""Figures measured by the fault suite, collected for ``docs/reliability.md``.

Each fault test calls :func:`record` with what it injected and what it measured. The
records go, one JSON object per line, to the file named by ``MYAPP_FIGURES`` (the
report command sets it); without it they are dropped, so a plain test run writes nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


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
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as sink:
        sink.write(json.dumps(entry) + "\n")
