"""The app exactly as a tree's ``wsgi.py`` serves it, for ``bench/baseline.py``.

gunicorn runs in the served tree (this checkout, or the baseline extracted into a
temporary folder), which puts that folder first on ``sys.path``; ``wsgi`` and ``myapp``
come from there. Each worker writes one line naming the files it imported, so that the
bench can check that a baseline worker runs the baseline's ``myapp`` and not the
checkout installed in the venv (editable).
"""

import os
import sys

import myapp
from wsgi import app  # noqa: F401 (served)

print(
    f"bench-served pid={os.getpid()} myapp={myapp.__file__} wsgi={sys.modules['wsgi'].__file__}",
    file=sys.stderr, flush=True,
)
