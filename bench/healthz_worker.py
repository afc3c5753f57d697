"""One app of ``bench/healthz.py --in-process``: ``GET /healthz`` through gunicorn's own
request path (its parser, ``wsgi.create``, its Response with the app's headers, the
access log to /dev/null, as ``gthread``'s ``handle_request`` does), with no socket, no
threads and no load generator, so that the noise of a busy machine mostly stays out.

``python -m bench.healthz_worker MODULE:APP``; first prints the ``myapp`` it imported,
then reads batch sizes from stdin, one line a batch, and answers with the CPU time
(user + system, of this process) per request of each, in µs.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import datetime

from gunicorn import util
from gunicorn.config import Config
from gunicorn.glogging import Logger
from gunicorn.http import wsgi
from gunicorn.http.parser import RequestParser

# What wrk's wrk.format("GET", "/healthz") sends.
REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n"
CLIENT, SERVER = ("127.0.0.1", 50000), ("127.0.0.1", 8000)


class Sink:
    """The connection's socket: gunicorn's Response sends the bytes here."""

    def sendall(self, data: bytes) -> None:
        pass


def serve_one(app: Callable, config: Config, log: Logger) -> None:
    request = next(iter(RequestParser(config, [REQUEST], CLIENT)))
    started = datetime.now()
    response, environ = wsgi.create(request, Sink(), CLIENT, SERVER, config)
    environ["wsgi.multithread"] = True
    body = app(environ, response.start_response)
    try:
        for chunk in body:
            response.write(chunk)
        response.close()
    finally:
        log.access(response, request, environ, datetime.now() - started)
        body.close()
    if response.status_code != 200:
        raise RuntimeError(f"/healthz answered {response.status}")


def main(spec: str) -> None:
    config = Config()
    config.set("accesslog", os.devnull)  # as bench/run.py's servers log
    log = Logger(config)
    app = util.import_app(spec)
    for _ in range(500):  # imports, caches
        serve_one(app, config, log)
    print(sys.modules["myapp"].__file__, flush=True)
    for line in sys.stdin:
        size = int(line)
        started = time.process_time()
        for _ in range(size):
            serve_one(app, config, log)
        print(f"{(time.process_time() - started) / size * 1e6:.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
