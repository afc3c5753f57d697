"""The metrics of every gunicorn worker, summed and served by the master on a port of
their own (issue 18, point 1), and the commands that must not mind them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from flask import Flask

from myapp.exporter import parse_bind
from tests.support.apps import SECRET_KEY
from tests.support.databases import Backend
from tests.support.gunicorn import GUNICORN, ROOT, Server, start_gunicorn, stop_gunicorn
from tests.support.metrics import scrape, total
from tests.support.network import free_port

pytestmark = pytest.mark.gunicorn
# A server on PostgreSQL is enough: what is tested here does not depend on the backend.
ON_POSTGRESQL = pytest.mark.backends("postgresql")

POOL_SIZE = 3


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "metrics"


@pytest.fixture
def server(app: Flask, backend: Backend, tmp_path: Path, folder: Path) -> Iterator[Server]:
    running = start_gunicorn(backend.url.render_as_string(hide_password=False), tmp_path,
                             DATABASE_POOL_SIZE=str(POOL_SIZE), PROMETHEUS_MULTIPROC_DIR=str(folder))
    try:
        yield running
    finally:
        stop_gunicorn(running)
    assert "Traceback" not in running.log_text()


def _worker_pids(server: Server) -> set[int]:
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    return {int(pid) for pid in children}


@pytest.mark.real_commits
@ON_POSTGRESQL
def test_the_master_sums_the_requests_of_every_worker(server: Server) -> None:
    for _ in range(60):  # a fresh connection each: either worker may take it
        assert requests.get(f"{server.url}/", headers={"Connection": "close"}, timeout=10).status_code == 200
    samples = scrape(server.metrics_url)
    assert total(samples, "myapp_http_requests_total", endpoint="posts.index", method="GET", status="200") == 60
    # Each worker's pool is counted once: two live workers, summed.
    assert total(samples, "myapp_db_pool_size", server="primary") == 2 * POOL_SIZE


@pytest.mark.real_commits
@ON_POSTGRESQL
def test_the_public_port_serves_no_metrics(server: Server) -> None:
    response = requests.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 404 and "myapp_http_requests" not in response.text
    assert "myapp_http_requests_total" in requests.get(server.metrics_url, timeout=10).text


@pytest.mark.real_commits
@ON_POSTGRESQL
def test_a_worker_that_exits_leaves_the_live_gauges_and_keeps_its_counts(server: Server) -> None:
    for _ in range(20):
        requests.get(f"{server.url}/", headers={"Connection": "close"}, timeout=10)
    before = _worker_pids(server)
    os.kill(min(before), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the master replaces it; the new one builds its pool
        pids = _worker_pids(server)
        if len(pids) == 2 and pids != before and requests.get(f"{server.url}/healthz", timeout=5).ok:
            if total(scrape(server.metrics_url), "myapp_db_pool_size", server="primary") == 2 * POOL_SIZE:
                break
        time.sleep(0.2)
    samples = scrape(server.metrics_url)
    # Without child_exit's mark_process_dead the dead worker's pool would still count: 3 x.
    assert total(samples, "myapp_db_pool_size", server="primary") == 2 * POOL_SIZE
    assert total(samples, "myapp_http_requests_total", endpoint="posts.index") == 20


@pytest.mark.real_commits
@ON_POSTGRESQL
def test_figures_an_earlier_run_left_are_not_added_in(app: Flask, backend: Backend, tmp_path: Path,
                                                        folder: Path) -> None:
    folder.mkdir()
    stale = folder / "counter_424242.db"
    stale.write_bytes(b"\0" * 64)
    running = start_gunicorn(backend.url.render_as_string(hide_password=False), tmp_path,
                             PROMETHEUS_MULTIPROC_DIR=str(folder))
    try:
        assert not stale.exists()
        assert requests.get(running.metrics_url, timeout=10).status_code == 200
    finally:
        stop_gunicorn(running)


@ON_POSTGRESQL
def test_a_wrong_metrics_bind_is_refused_in_one_line(backend: Backend, tmp_path: Path) -> None:
    environment = {**os.environ, "SECRET_KEY": SECRET_KEY, "FLASK_DEBUG": "0",
                   "DATABASE_URL": backend.url.render_as_string(hide_password=False),
                   "GUNICORN_BIND": f"127.0.0.1:{free_port()}", "METRICS_BIND": "localhost"}
    result = subprocess.run([str(GUNICORN), "-c", "gunicorn.conf.py", "--no-control-socket", "wsgi:app"],
                            cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Error: METRICS_BIND must be host:port, like 127.0.0.1:9200; got 'localhost'" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("bind", ["127.0.0.1:9200", "[::1]:9300", "0.0.0.0:1"])
def test_metrics_bind_is_read_as_host_and_port(bind: str) -> None:
    host, port = parse_bind(bind)
    assert f"{host}:{port}" == bind.replace("[", "").replace("]", "")


@ON_POSTGRESQL
def test_a_command_with_a_metrics_folder_that_does_not_exist_yet_works(backend: Backend, tmp_path: Path) -> None:
    """A deploy's .env may name the folder for gunicorn; ``flask`` commands read it too."""
    folder = tmp_path / "not-yet"
    environment = {**os.environ, "SECRET_KEY": SECRET_KEY, "FLASK_APP": "myapp", "FLASK_DEBUG": "0",
                   "DATABASE_URL": backend.url.render_as_string(hide_password=False),
                   "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    flask = Path(sys.executable).with_name("flask")
    result = subprocess.run([str(flask), "db", "status"], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and folder.is_dir()


@ON_POSTGRESQL
@pytest.mark.parametrize("folder_named", [False, True], ids=["in-process", "deploy-folder"])
def test_the_flask_dev_server_serves_with_metrics_on(backend: Backend, tmp_path: Path, folder_named: bool) -> None:
    port = free_port()
    environment = {**os.environ, "SECRET_KEY": SECRET_KEY, "FLASK_APP": "myapp", "FLASK_DEBUG": "0",
                   "DATABASE_URL": backend.url.render_as_string(hide_password=False), "METRICS": "true"}
    if folder_named:
        environment["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    flask = Path(sys.executable).with_name("flask")
    log = tmp_path / "flask-run.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([str(flask), "run", "--port", str(port)], cwd=tmp_path, env=environment,
                                   stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        answer = None
        while answer is None and time.monotonic() < deadline and process.poll() is None:
            try:
                answer = requests.get(f"http://127.0.0.1:{port}/", timeout=5)
            except requests.ConnectionError:
                time.sleep(0.1)
        assert answer is not None and answer.status_code == 200, log.read_text(errors="replace")
        assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 404
    finally:
        process.terminate()
        process.wait(10)
    output = log.read_text(errors="replace")
    assert "Traceback" not in output
    assert f'"GET /" posts.index 200 ' in output and f"id={answer.headers['X-Request-ID']}" in output
