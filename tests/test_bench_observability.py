"""Issue 18's overhead bench (bench/observability.py): servers side by side each get their
own metrics port and multiprocess folder, each variant is served with the settings it
claims, the evidence of what a server did is read right, and the report's verdict
follows the goal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url
from werkzeug.wrappers import Response

from bench.observability import (
    ACCESS_LOG, GOAL, PAIRS, VARIANTS, check_served, counted_requests, request_lines, resolved_access_log,
)
from bench.report import observability_section, observability_verdict
from bench.run import free_ports, server_environment
from tests.support.apps import SECRET_KEY, make_app

ROOT = Path(__file__).resolve().parent.parent
URL = make_url("postgresql+psycopg://bench@127.0.0.1:5432/myapp_bench_observability")


def test_every_server_serves_its_metrics_on_a_port_and_in_a_folder_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a shell may export: the exporter's default port, and one folder for everyone.
    monkeypatch.setenv("METRICS_BIND", "127.0.0.1:9200")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp/shared-by-every-server")
    monkeypatch.setenv("GUNICORN_ACCESS_LOG", "-")
    ports = free_ports(4)
    assert len(set(ports)) == 4

    first = server_environment(URL, ports[0], ports[1], {})
    second = server_environment(URL, ports[2], ports[3], {})
    assert first["METRICS_BIND"] == f"127.0.0.1:{ports[1]}" and second["METRICS_BIND"] == f"127.0.0.1:{ports[3]}"
    assert "PROMETHEUS_MULTIPROC_DIR" not in first and "PROMETHEUS_MULTIPROC_DIR" not in second  # each master names its own
    assert first["GUNICORN_ACCESS_LOG"] == "/dev/null"  # as every bench server always had

    # The variant's own settings win: "" turns the exporter off, None unsets a variable.
    off = server_environment(URL, ports[0], ports[1], {"METRICS_BIND": "", "GUNICORN_ACCESS_LOG": None})
    assert off["METRICS_BIND"] == "" and "GUNICORN_ACCESS_LOG" not in off
    assert server_environment(URL, ports[0], ports[1], {"PROMETHEUS_MULTIPROC_DIR": "/mine"})[
        "PROMETHEUS_MULTIPROC_DIR"] == "/mine"


def test_gunicorn_resolves_each_variants_access_log_as_claimed(tmp_path: Path) -> None:
    """``gunicorn --print-config`` with the project's settings: on and off-no-log write no
    access log at all, off writes it to /dev/null, as the bench's servers always did."""
    assert {name: resolved_access_log(name, URL, tmp_path) for name in VARIANTS} == ACCESS_LOG
    assert ACCESS_LOG == {"on": "None", "off": "/dev/null", "off-no-log": "None"}


@pytest.mark.parametrize(("name", "metrics", "request_log"), [
    ("on", True, True), ("off", False, False), ("off-no-log", False, False),
])
def test_each_variants_app_has_the_settings_it_claims(name: str, metrics: bool, request_log: bool, tmp_path: Path) -> None:
    """The app each variant's workers build (``bench/observed_wsgi.py`` under the variant's
    environment), its metrics and its request line on or off."""
    environment = server_environment(URL, *free_ports(2), VARIANTS[name])
    environment.update({"DATABASE_URL": f"sqlite:///{tmp_path / 'unused.sqlite'}", "SECRET_KEY": SECRET_KEY,
                        "PYTHONPATH": str(ROOT)})
    code = ("from bench.observed_wsgi import app; "
            "print(app.config['METRICS'], app.config['REQUEST_LOG'], app.config['WTF_CSRF_ENABLED'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == [str(metrics), str(request_log), "False"]
    assert f"myapp={ROOT / 'myapp' / '__init__.py'}" in done.stderr  # the line checked_imports reads


def test_the_request_lines_counted_are_the_apps_own_post_page_lines() -> None:
    from myapp.observability import _Request, _text_line

    app = make_app("sqlite://")
    lines = []
    for path, status in (("/posts/7", 200), ("/posts/8", 404), ("/healthz", 200)):
        with app.test_request_context(path):
            lines.append(_text_line(_Request("0a1b2c", 0.0), Response(status=status), 0.0042))
    gunicorn_access = '127.0.0.1 - - [07/Dec/2026:13:04:05 +0000] "GET /posts/7 HTTP/1.1" 200 2345 "-" "-"'
    text = "\n".join([*lines, gunicorn_access, "[2026-12-07 13:04:05 +0000] [42] [INFO] Booting worker"]) + "\n"
    assert request_lines(text) == 2  # both post pages, neither /healthz nor gunicorn's own lines


def test_requests_are_counted_from_the_exposition_over_every_status_and_method() -> None:
    exposition = (
        "# HELP myapp_http_requests_total Requests answered, by endpoint, method and status.\n"
        "# TYPE myapp_http_requests_total counter\n"
        'myapp_http_requests_total{endpoint="posts.detail",method="GET",status="200"} 1000.0\n'
        'myapp_http_requests_total{endpoint="posts.detail",method="GET",status="404"} 7.0\n'
        'myapp_http_requests_total{endpoint="posts.detail",method="HEAD",status="200"} 3.0\n'
        'myapp_http_requests_total{endpoint="health.healthz",method="GET",status="200"} 55.0\n'
        "# HELP myapp_db_statements_per_request Statements one request sent.\n"
        "# TYPE myapp_db_statements_per_request histogram\n"
        'myapp_db_statements_per_request_bucket{le="1.0"} 1065.0\n'
        'myapp_db_statements_per_request_bucket{le="+Inf"} 1065.0\n'
        "myapp_db_statements_per_request_count 1065.0\n"
        "myapp_db_statements_per_request_sum 1010.0\n"
    )
    assert counted_requests(exposition) == 1010


def _served(**changes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    served: dict[str, dict[str, Any]] = {
        "on": {"requests": 20_000, "log_lines": 20_006, "metrics_counted": 20_006},
        "off": {"requests": 19_000, "log_lines": 0, "metrics_counted": None},
        "off-no-log": {"requests": 21_000, "log_lines": 0, "metrics_counted": None},
    }
    for name, change in changes.items():
        served[name.replace("_", "-")].update(change)
    return served


def test_a_variant_that_is_not_what_its_settings_promise_is_refused() -> None:
    assert check_served(_served()) == []
    assert check_served(_served(on={"log_lines": 0})) == ["on: 0 request lines for 20000 post pages answered"]
    assert check_served(_served(on={"metrics_counted": None})) == [
        "on: its exporter counted None post pages for 20000 answered"]
    assert check_served(_served(on={"metrics_counted": 10_000})) != []  # one worker's files alone
    assert check_served(_served(off={"log_lines": 19_000})) == ["off: 19000 request lines in its log, expected none"]
    assert check_served(_served(off_no_log={"metrics_counted": 0})) == ["off-no-log: serves metrics, expected no exporter"]
    # --base: "on" served from another tree is held to what "on" promises.
    with_base = {**_served(), "base-on": {"requests": 100, "log_lines": 0, "metrics_counted": 100}}
    assert check_served(with_base) == ["base-on: 0 request lines for 100 post pages answered"]


def _results(cpu: dict[str, list[float]]) -> dict[str, Any]:
    cells = [
        {"backend": "postgresql", "app": name, "route": "post", "repeat": repeat, "rps": 1000.0 + repeat,
         "cpu_us_per_request": value, "p50_ms": 3.0, "p99_ms": 9.0, "errors": 0, "requests": 2000}
        for name, values in cpu.items() for repeat, value in enumerate(values)
    ]
    return {
        "command": "python -m bench.observability --repeats 5 --seconds 2", "date": "2026-12-07 15:00 UTC",
        "total_seconds": 60, "current": {"short": "abcdef1", "uncommitted_changes": False}, "goal": GOAL,
        "seconds": 2.0, "repeats": 5, "connections": 8, "workers": 2, "threads": 4, "load_generator": "wrk",
        "load_average": [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
        "variants": {name: {"settings": settings, "access_log": ACCESS_LOG[name]} for name, settings in VARIANTS.items()},
        "pairs": [list(pair) for pair in PAIRS], "served": _served(), "cells": cells, "notes": [],
    }


def test_the_verdict_is_the_median_of_the_per_repeat_cpu_ratios_against_the_goal() -> None:
    off = [700.0, 800.0, 600.0, 900.0, 750.0]
    # Per repeat on / off: 1.02 1.01 1.04 1.00 1.02: median 1.02, at goal.
    met = _results({"on": [714.0, 808.0, 624.0, 900.0, 765.0], "off": off, "off-no-log": off})
    middle, verdict = observability_verdict(met)
    assert middle == pytest.approx(1.02) and verdict is True
    section = "\n".join(observability_section(met))
    assert "(`on` / `off` <= 1.03x): met**" in section
    assert "| `on` / `off`: worker CPU per request (lower is better) | 1.02x (+2.0 %) |" in section
    # Per repeat 1.05 1.04 1.06 1.02 1.05: median 1.05, over it; the medians of each side alone
    # (the table above the ratios) are not what the verdict reads.
    missed = _results({"on": [735.0, 832.0, 636.0, 918.0, 787.5], "off": off, "off-no-log": off})
    middle, verdict = observability_verdict(missed)
    assert middle == pytest.approx(1.05) and verdict is False
    assert "(`on` / `off` <= 1.03x): not met**" in "\n".join(observability_section(missed))
    assert observability_verdict(_results({"on": [700.0], "off-no-log": [700.0]})) == (None, None)


def test_the_module_runs_alone_as_documented() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.observability", "--help"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True)
    assert "--repeats" in done.stdout and "--seconds" in done.stdout
