"""tests/support/prometheus.py against a real Prometheus, and the report's chart of its series.

Why: the fault suite's Prometheus scenario (issue 18) relies on these helpers to start
the server, read its answers and time a series' change. A target served by the test
itself, with a counter bumped a known number of times, shows that they do, before any
metric of the app is involved. Without the server binary this skips, and fails under CI.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from tests.faults import figures
from tests.support.network import free_port
from tests.support.prometheus import BINARY, PrometheusError, available, prometheus, wall_clock
from tests.topology.fixtures import require

ROOT = Path(__file__).resolve().parent.parent
HITS = 7  # bumps before the first scrape
MORE = 3  # bumps while the server runs
FEW_SCRAPES = 3.0 + 1.0  # three scrape intervals, and a second of polling and margin


@pytest.fixture
def target() -> Iterator[tuple[str, Counter]]:
    """A metrics endpoint of the test's own: a fresh registry holding one counter (so no
    process metrics of pytest's interpreter), on a free loopback port; shut down after."""
    registry = CollectorRegistry()
    counter = Counter("probe_hits", "Times the test bumped it.", registry=registry)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{port}", counter
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_real_prometheus_scrapes_the_exact_count(target: tuple[str, Counter]) -> None:
    require(available(), f"no {BINARY}: apt-get install prometheus")
    address, counter = target
    for _ in range(HITS):
        counter.inc()
    started = time.monotonic()
    with prometheus([address], job="probe") as server:
        # Handed over once every target was scraped: no waiting for the first scrape here.
        assert server.query("up") == [({"__name__": "up", "instance": address, "job": "probe"}, 1.0)]
        assert server.value('probe_hits_total{job="probe"}') == HITS

        bumped = time.monotonic()
        counter.inc(MORE)
        seen = server.wait_until("probe_hits_total", lambda hits: hits == HITS + MORE, bumped, timeout=15)
        assert seen is not None and seen <= FEW_SCRAPES, seen
        assert server.wait_until("probe_hits_total", lambda hits: hits == 0, time.monotonic(), timeout=1) is None
        assert server.value("absent_series_of_nobody") is None

        history = server.query_range("probe_hits_total", wall_clock(started), time.time(), step=0.5)
        with pytest.raises(PrometheusError, match="parse error"):
            server.query("sum(")
        process, root = server.process, server.root
    assert process is not None and process.poll() is not None, "the server outlived its context"
    assert not root.exists(), "its folder was left behind"

    [(labels, points)] = history
    values = [value for _, value in points]
    assert labels["job"] == "probe" and values[0] == HITS and values[-1] == HITS + MORE, values
    assert values == sorted(values) and set(values) == {HITS, HITS + MORE}, values


def _report() -> ModuleType:
    """scripts/reliability_report.py as a module (scripts/ is no package); main() does not run."""
    spec = importlib.util.spec_from_file_location("reliability_report", ROOT / "scripts" / "reliability_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_recorded_series_are_drawn_into_a_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures_file = tmp_path / "figures.jsonl"
    monkeypatch.setenv("MYAPP_FIGURES", str(figures_file))
    start = 1_700_000_000.0
    breaker = [({"server": "primary", "pid": "11"}, [(start + t, float(3 <= t < 9)) for t in range(12)])]
    no_labels: dict[str, str] = {}  # a sum() keeps none
    unavailable = [(no_labels, [(start + t, math.nan if t == 0 else 2.5 * (3 <= t < 9)) for t in range(12)])]
    figures.record_series("18 probe", "postgresql", start, [
        figures.panel("breaker open", "myapp_db_breaker_open", breaker, start),
        figures.panel("503 rate", "sum(rate(myapp_http_unavailable_total[5s]))", unavailable, start, unit="1/s"),
    ], events=[(start + 3, "link down"), (start + 9, "healed")])

    [line] = figures.series_path(figures_file).read_text().splitlines()
    recording = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert recording["events"] == [{"at": 3.0, "label": "link down"}, {"at": 9.0, "label": "healed"}]
    assert recording["panels"][1]["series"][0]["points"][:2] == [[0.0, None], [1.0, 0.0]]

    report = _report()
    chart = tmp_path / "reliability-prometheus.png"
    assert report.draw_series_chart(report.read_series(figures_file), chart)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not report.draw_series_chart([], tmp_path / "none.png") and not (tmp_path / "none.png").exists()
