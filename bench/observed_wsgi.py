"""myapp as ``bench/project_wsgi.py`` serves it (CSRF off), for ``bench/observability.py``.

Every variant of that comparison serves this module, so that they differ by their
settings alone. ``BENCH_APP_REQUEST_LOG=false`` builds the app with its request line off
whatever ``REQUEST_LOG`` says: the gunicorn settings read ``REQUEST_LOG`` too, and turn
gunicorn's own access log on ("-") when it is false, so the variant with neither line
leaves ``REQUEST_LOG`` unset for gunicorn and turns the app's line off here.

Each worker writes one line naming the ``myapp`` it imported (the format of
``bench/served_wsgi.py``), so that the bench can check it serves the checkout it runs from.
"""

import os
import sys

import myapp
from myapp import create_app

_settings: dict[str, object] = {"WTF_CSRF_ENABLED": False}
if os.environ.get("BENCH_APP_REQUEST_LOG", "").lower() == "false":
    _settings["REQUEST_LOG"] = False

app = create_app(_settings)

print(f"bench-served pid={os.getpid()} myapp={myapp.__file__} wsgi={__file__}", file=sys.stderr, flush=True)
