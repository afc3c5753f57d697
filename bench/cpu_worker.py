"""One side of bench/baseline.py's in-process comparison: the app as its own ``wsgi.py``
builds it (found first on ``PYTHONPATH``), with the gunicorn settings' bulkhead, loaded
with batches of ``GET /posts/<id>``; for each batch it prints the CPU time (user +
system, of this process) per request, in µs.

Reads the batch size from stdin, one line a batch. No HTTP and no gunicorn, so the
comparison sees the layers' own CPU, not the machine's noise around them.
"""

from __future__ import annotations

import os
import random
import sys
import time



def main(max_post_id: int) -> None:
    os.environ.setdefault("DATABASE_BULKHEAD", "3")  # what gunicorn.conf.py sets for 4 threads
    import myapp
    from wsgi import app  # this side's own, first on the path

    client = app.test_client()
    paths = [f"/posts/{random.randint(1, max_post_id)}" for _ in range(500)]
    for path in paths[:200]:  # imports, connections, statement caches
        assert client.get(path).status_code == 200, path
    print(myapp.__file__, flush=True)
    for line in sys.stdin:
        size = int(line)
        started = time.process_time()
        for number in range(size):
            client.get(paths[number % len(paths)])
        print(f"{(time.process_time() - started) / size * 1e6:.1f}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
