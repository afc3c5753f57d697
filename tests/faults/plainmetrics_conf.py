"""A test-only gunicorn settings file: the project's settings without the multiprocess setup.

Never used by the product. Scenario 18's negative control (tests/faults/test_prometheus.py)
starts gunicorn with ``-c tests/faults/plainmetrics_conf.py``: the same workers, threads,
timeouts and hooks as ``myapp.gunicorn_conf``, but no ``PROMETHEUS_MULTIPROC_DIR`` and
no summing exporter. The master serves prometheus_client's plain default registry on
``METRICS_BIND`` instead, as a naive setup would (``start_http_server`` in ``when_ready``).
Each worker then counts its requests in its own memory, where no scrape of the master
can see them: the counts must not add up.
"""

from __future__ import annotations

import os
from typing import Any

# Where this control's master serves its registry. The project's settings must not see
# the address: with one they would name a multiprocess folder for every worker.
_plain_bind = os.environ.get("METRICS_BIND", "")
os.environ["METRICS_BIND"] = ""
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

from myapp.gunicorn_conf import *  # noqa: E402,F401,F403  (workers, threads, timeouts, hooks)
from myapp.gunicorn_conf import metrics_bind as _project_metrics_bind  # noqa: E402

assert _project_metrics_bind == "", "the project's settings still serve their exporter"
assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ, "the multiprocess folder is still named"


def when_ready(server: Any) -> None:  # type: ignore[no-redef]
    """Serve the master's own default registry (its process metrics; none of a worker's)."""
    if not _plain_bind:
        return
    from prometheus_client import start_http_server

    from myapp.exporter import parse_bind

    host, port = parse_bind(_plain_bind)
    start_http_server(port, addr=host)
