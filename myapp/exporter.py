"""The metrics of every gunicorn worker, served as one, from the master, on a port of
their own (``METRICS_BIND``, loopback by default): never on the public site.

prometheus_client's multiprocess mode: each worker writes its figures to files in
``PROMETHEUS_MULTIPROC_DIR``, and each scrape sums the files. The folder belongs to one
deploy: it is emptied when the master starts (figures left by an earlier run would be
added in), and a worker that exits is marked dead, so that its live gauges (connections
checked out, a breaker's state) stop counting while its counters keep their totals.

The variable must be set before any process imports prometheus_client: the master
sets it while it reads its settings, before a worker exists (``name_folder``).
This module imports prometheus_client only inside its functions for that reason.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FOLDER_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def name_folder(environ: Any = os.environ) -> tuple[str, bool]:
    """The multiprocess folder: the one the environment names, else a new temporary
    one, exported to the environment so that every worker writes there. Returns it and
    whether it was made here (then it goes when the server exits)."""
    folder = environ.get(FOLDER_VARIABLE)
    made = not folder
    if made:
        folder = environ[FOLDER_VARIABLE] = tempfile.mkdtemp(prefix="myapp-metrics-")
    Path(folder).mkdir(parents=True, exist_ok=True)
    return folder, made


def empty_folder(folder: str) -> None:
    """Once per server start: figures an earlier run left would be added in."""
    for stale in Path(folder).glob("*.db"):
        stale.unlink()


def parse_bind(bind: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) of METRICS_BIND; ValueError with the reason."""
    host, separator, port = bind.rpartition(":")
    if not separator or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"METRICS_BIND must be host:port, like 127.0.0.1:9200; got {bind!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve(bind: str) -> Any:
    """Serve the summed metrics at ``http://bind/metrics`` from a thread of this process
    (the master's: it forks workers but runs no request). Returns the server."""
    from prometheus_client import CollectorRegistry, generate_latest, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    # One collection now: whatever it imports is imported before the next fork, so no
    # child can inherit an import lock held by the serving thread.
    generate_latest(registry)
    host, port = parse_bind(bind)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics of every worker at http://%s:%d/metrics", host, port)
    return server


def forget_worker(pid: int) -> None:
    """A worker exited: its live gauges no longer count."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
