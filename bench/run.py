"""``make bench``: seed throwaway databases, serve myapp and its peers with real gunicorn,
load them in turn on loopback, and write ``docs/performance.md`` and its chart.

PostgreSQL is the main backend: every app, every route, apps interleaved within each
repeat so that a slow moment of this shared machine hits all of them alike; ratios are
taken per repeat and their median reported. SQLite and MariaDB serve myapp,
Flask-SQLAlchemy, their hand-written peer (sqlite3, PyMySQL) and bare Flask the same
way (``PHASES``); the PostgreSQL-only parts are the connection watch, the query counts
and the in-process A/B (``bench/ab.py``).

Settings (environment): ``BENCH_POSTGRES_URL`` / ``BENCH_MYSQL_URL`` (a server where
a ``myapp_bench`` database may be created and dropped; default the test URLs, then
the local services), ``BENCH_BACKENDS`` (the phases to run, of
``postgresql,sqlite,mysql``, all by default: e.g. ``BENCH_BACKENDS=mysql`` for a
MariaDB run alone), ``BENCH_SECONDS`` (per cell, default 2), ``BENCH_REPEATS`` (6: short cells, many
turns, so that a noisy moment falls on every app alike),
``BENCH_CONNECTIONS`` (8, the default 2 workers x 4 threads). ``make bench`` then runs
``bench/baseline.py``, which compares the post page with the commit before the database
layer's redesign (``BENCH_BASELINE``, ``BENCH_BASELINE_REPEATS``).
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import create_engine, delete, event, func, select, text
from sqlalchemy.engine import URL, make_url

from bench import loadgen
from myapp.models import Post, User

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).with_name("gunicorn")
RESULTS = ROOT / "bench" / "results" / "latest.json"
SECRET_KEY = secrets.token_hex(32)
DATABASE = "myapp_bench"
USERS, POSTS = 1000, 10_000
WORKERS, THREADS = 2, 4  # gunicorn.conf.py's defaults, for every app

# name -> (WSGI module, routes it is measured on, extra environment)
APPS: dict[str, tuple[str, tuple[str, ...], dict[str, str]]] = {
    "myapp": ("bench.project_wsgi:app", ("healthz", "post", "index", "create"), {}),
    "flask-sqlalchemy": ("bench.peers.fsa:app", ("healthz", "post", "index", "create"), {}),
    "flask-docs": ("bench.peers.scoped:app", ("healthz", "post", "index", "create"), {}),
    "psycopg": ("bench.peers.psycopg_raw:app", ("healthz", "post", "index", "create"), {}),
    "pymysql": ("bench.peers.pymysql_raw:app", ("healthz", "post", "index", "create"), {}),
    "sqlite3": ("bench.peers.sqlite_raw:app", ("healthz", "post", "index", "create"), {}),
    "bare-flask": ("bench.peers.bare:app", ("healthz", "post", "index", "create"), {}),
    # Before/after of two optimisations, measured in the same run.
    "myapp-full-ping": (
        "bench.project_wsgi_full_ping:app", ("post", "index"), {"DATABASE_APP_NAME": "myapp-bench-fullping"},
    ),
    "myapp-no-autocommit": (
        "bench.project_wsgi:app", ("post",),
        {"DATABASE_READ_ONLY_AUTOCOMMIT": "false", "DATABASE_APP_NAME": "myapp-bench-noac"},
    ),
    # Scale: the same app with one worker.
    "myapp-1-worker": (
        "bench.project_wsgi:app", ("post", "index"),
        {"WEB_CONCURRENCY": "1", "DATABASE_APP_NAME": "myapp-bench-1w"},
    ),
    # What the fault-handling defaults cost: the same app with the circuit breaker, the
    # bulkhead (which gunicorn.conf.py sets to threads - 1 unless it is set) and the
    # network timeouts off. The statement timeout is off (0) by default, on both sides.
    "myapp-no-faults": (
        "bench.project_wsgi:app", ("post", "index"),
        {"DATABASE_BREAKER_THRESHOLD": "0", "DATABASE_BULKHEAD": "0", "DATABASE_NETWORK_TIMEOUT": "0",
         "DATABASE_STATEMENT_TIMEOUT": "0", "DATABASE_APP_NAME": "myapp-bench-nofaults"},
    ),
}
# The apps each backend's phase serves, interleaved; on MariaDB and SQLite the raw peer
# is the driver myapp uses there.
PHASES: dict[str, tuple[str, ...]] = {
    "postgresql": (
        "myapp", "flask-sqlalchemy", "flask-docs", "psycopg", "bare-flask",
        "myapp-full-ping", "myapp-no-autocommit", "myapp-1-worker", "myapp-no-faults",
    ),
    "sqlite": ("myapp", "flask-sqlalchemy", "sqlite3", "bare-flask"),
    "mysql": ("myapp", "flask-sqlalchemy", "pymysql", "bare-flask"),
}
ROUTES = ("healthz", "post", "index", "create")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- databases ----------------------------------------------------------------------


@dataclass
class Seeded:
    url: URL
    max_post_id: int
    cookie: str  # a signed session cookie of a seeded user, valid on every app


@contextmanager
def throwaway_database(kind: str, server: str | None, name: str = DATABASE) -> Iterator[URL]:
    """``myapp_bench`` (or ``name``) on the server (SQLite: a temporary file), dropped at the end."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="myapp-bench-") as folder:
            yield make_url(f"sqlite:///{folder}/bench.sqlite")
        return
    assert server is not None
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    force = " WITH (FORCE)" if kind == "postgresql" else ""
    charset = " CHARACTER SET utf8mb4" if kind == "mysql" else ""
    try:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name}{force}"))
            connection.execute(text(f"CREATE DATABASE {name}{charset}"))
        yield make_url(server).set(database=name)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name}{force}"))
        admin.dispose()


def migrate_and_seed(url: URL) -> Seeded:
    """Migrate with the project's migrations and seed with its own ``flask seed``."""
    from alembic import command

    from myapp import create_app
    from myapp.cli import alembic_config
    from myapp.db.engines import dispose_all_engines

    app = create_app({"DATABASE_URL": url, "SECRET_KEY": SECRET_KEY})
    with app.app_context():
        command.upgrade(alembic_config(), "head")
    result = app.test_cli_runner().invoke(args=["seed", "--users", str(USERS), "--posts", str(POSTS)])
    if result.exit_code != 0:
        raise RuntimeError(f"seeding failed: {result.output}")
    engine = create_engine(url)
    with engine.begin() as connection:  # fresh planner statistics, as autovacuum would give
        connection.execute(text("ANALYZE" if url.get_backend_name() != "mysql" else "ANALYZE TABLE post, user"))
    with engine.connect() as connection:
        max_post_id = connection.execute(select(func.max(Post.id))).scalar_one()
        user_id = connection.execute(select(func.min(User.id))).scalar_one()
    engine.dispose()
    cookie = app.session_interface.get_signing_serializer(app).dumps({"user_id": user_id})  # type: ignore[attr-defined]
    dispose_all_engines()
    return Seeded(url, int(max_post_id), cookie)


def delete_bench_posts(seeded: Seeded) -> None:
    """Remove what the create route wrote, so that every cell sees the seeded data."""
    engine = create_engine(seeded.url)
    with engine.begin() as connection:
        connection.execute(delete(Post.__table__).where(Post.__table__.c.id > seeded.max_post_id))
    engine.dispose()


# -- servers ------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    metrics_url: str = ""  # its master's exporter (METRICS_BIND); "" when it serves none

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children()

    def worker_cpu_seconds(self) -> dict[int, float]:
        """CPU time (user + system, from /proc/<pid>/stat) of each worker so far, by pid."""
        seconds = {}
        for worker in self.workers():
            try:
                times = worker.cpu_times()
            except psutil.NoSuchProcess:
                continue
            seconds[worker.pid] = times.user + times.system
        return seconds


def free_ports(count: int) -> list[int]:
    """``count`` free loopback ports, all different: each socket stays bound until every
    port is picked, so the kernel cannot hand the same one out twice."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def server_environment(
    database_url: URL, port: int, metrics_port: int, extra: Mapping[str, str | None]
) -> dict[str, str]:
    """What a bench server runs with: this process's environment, the bench's settings,
    then ``extra``, where None removes a variable (so that the gunicorn settings' own
    default applies). Servers run side by side, so each master serves its workers'
    metrics on a port of its own (``METRICS_BIND``; "" in ``extra`` turns the exporter
    off), and each names its own multiprocess folder: a ``PROMETHEUS_MULTIPROC_DIR``
    inherited by all would be emptied by every master that starts, and summed over servers."""
    environment = {name: value for name, value in os.environ.items() if name != "PROMETHEUS_MULTIPROC_DIR"}
    environment.update({
        "DATABASE_URL": database_url.render_as_string(hide_password=False),
        "SECRET_KEY": SECRET_KEY,
        "FLASK_DEBUG": "0",
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": str(WORKERS),
        "GUNICORN_THREADS": str(THREADS),
        "GUNICORN_ACCESS_LOG": "/dev/null",
        "DATABASE_APP_NAME": "myapp-bench",
        "METRICS_BIND": f"127.0.0.1:{metrics_port}",
    })
    for name, value in extra.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return environment


def start_server(
    name: str, module: str, database_url: URL, folder: Path, extra: Mapping[str, str | None], tag: str = "",
    cwd: Path = ROOT,
) -> Server:
    """gunicorn with the ``gunicorn.conf.py`` of ``cwd`` (the project's), on a free loopback
    port, its metrics on another (``server_environment``)."""
    port, metrics_port = free_ports(2)
    environment = server_environment(database_url, port, metrics_port, extra)
    log_file = folder / f"{tag}{name}.log"
    with log_file.open("wb") as sink:
        process = subprocess.Popen(
            [str(GUNICORN), "-c", "gunicorn.conf.py", "--no-control-socket", module],
            cwd=cwd, env=environment, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    metrics_bind = environment.get("METRICS_BIND", "")
    metrics_url = f"http://{metrics_bind}/metrics" if metrics_bind else ""
    server = Server(name, process, f"http://127.0.0.1:{port}", log_file, metrics_url)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{log_file.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(f"{server.url}/healthz", timeout=1) as response:
                if response.status == 200 and len(server.workers()) >= int(environment["WEB_CONCURRENCY"]):
                    return server
        except OSError:
            pass
        time.sleep(0.1)
    stop_server(server)
    raise RuntimeError(f"{name} did not answer within 30 s:\n{log_file.read_text(errors='replace')}")


def stop_server(server: Server) -> None:
    """Stop gunicorn's master, then make sure its workers (by pid) are gone too."""
    try:
        workers = server.workers()
    except psutil.NoSuchProcess:
        workers = []
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    _, alive = psutil.wait_procs(workers, timeout=5)
    for worker in alive:
        log(f"{server.name}: worker {worker.pid} outlived its master; killing it")
        worker.kill()


def rss_mb(server: Server) -> list[float]:
    return [round(worker.memory_info().rss / 2**20, 1) for worker in server.workers()]


class ConnectionWatch:
    """Poll pg_stat_activity and keep each app's peak number of server-side connections."""

    def __init__(self, server: str) -> None:
        self.engine = create_engine(server, isolation_level="AUTOCOMMIT", pool_size=1)
        self.peaks: dict[str, int] = defaultdict(int)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        query = text(
            "SELECT split_part(application_name, ':', 1), count(*) FROM pg_stat_activity "
            "WHERE datname = :db AND application_name <> '' GROUP BY 1"
        )
        with self.engine.connect() as connection:
            while not self._stop.wait(0.1):
                for name, count in connection.execute(query, {"db": DATABASE}):
                    self.peaks[name] = max(self.peaks[name], count)

    def __enter__(self) -> ConnectionWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.engine.dispose()


# -- measuring ----------------------------------------------------------------------


@dataclass
class Results:
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    cells: list[dict[str, Any]] = field(default_factory=list)
    connections: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    queries: dict[str, int] = field(default_factory=dict)
    ab: list[dict[str, Any]] = field(default_factory=list)
    ab_peers: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def measure(results: Results, backend: str, server: Server, route: loadgen.Route, repeat: int, seconds: float) -> None:
    cpu_before = server.worker_cpu_seconds()
    sample = loadgen.run(server.url, route, seconds, int(os.environ.get("BENCH_CONNECTIONS", "8")))
    cpu_after = server.worker_cpu_seconds()
    # Summed over the workers alive at both ends (a replaced worker's time is lost, so say so).
    cpu = sum(cpu_after[pid] - cpu_before[pid] for pid in cpu_after.keys() & cpu_before.keys())
    results.cells.append(
        {"backend": backend, "app": server.name, "route": route.name, "repeat": repeat, **asdict(sample), "rps": sample.rps,
         "worker_cpu_s": round(cpu, 3), "cpu_us_per_request": round(cpu / sample.requests * 1e6, 1) if sample.requests else None,
         "workers_replaced": cpu_after.keys() != cpu_before.keys()}
    )
    log(f"{backend:10} {server.name:17} {route.name:7} #{repeat}: {sample.rps:7.0f} req/s  "
        f"p50 {sample.p50_ms:6.2f} ms  p99 {sample.p99_ms:6.2f} ms  errors {sample.errors}  "
        f"worker CPU {results.cells[-1]['cpu_us_per_request']} µs/request")


def measure_interleaved(
    results: Results, backend: str, servers: list[Server], route: loadgen.Route, repeats: int, seconds: float
) -> None:
    """``repeats`` turns of one route on every server, the order rotating each turn, so
    that a slow moment of the machine falls on each of them alike."""
    for repeat in range(repeats):
        shift = repeat % len(servers)
        for server in servers[shift:] + servers[:shift]:
            measure(results, backend, server, route, repeat, seconds)


def routes_for(seeded: Seeded) -> dict[str, loadgen.Route]:
    return {
        "healthz": loadgen.Route("healthz"),
        "post": loadgen.Route("post", max_id=seeded.max_post_id),
        "index": loadgen.Route("index", pages=seeded.max_post_id // 20),
        "create": loadgen.Route("create", cookie=seeded.cookie),
    }


def warm_up(servers: list[Server], seeded: Seeded) -> None:
    """A second of each route on each app: imports, connections, statement caches."""
    routes = routes_for(seeded)
    for server in servers:
        for name in APPS[server.name][1]:
            loadgen.run(server.url, routes[name], 1, 8)
        delete_bench_posts(seeded)


def run_matrix(
    results: Results, backend: str, servers: list[Server], seeded: Seeded, repeats: int, seconds: float
) -> None:
    """Every route, every app, ``repeats`` times; within a repeat the apps take turns, in
    an order that rotates from one repeat to the next."""
    routes = routes_for(seeded)
    for repeat in range(repeats):
        for name in ROUTES:
            turn = [s for s in servers if name in APPS[s.name][1]]
            shift = repeat % len(turn)
            for server in turn[shift:] + turn[:shift]:
                measure(results, backend, server, routes[name], repeat, seconds)
                if name == "create":
                    delete_bench_posts(seeded)


def count_index_queries(url: URL) -> dict[str, int]:
    """Statements one index request sends, at several page sizes and page numbers."""
    from myapp import create_app
    from myapp.db.engines import dispose_all_engines

    counts: dict[str, int] = {}
    for per_page, page in ((20, 1), (20, 400), (100, 1), (100, 80)):
        app = create_app({"DATABASE_URL": url, "SECRET_KEY": SECRET_KEY, "POSTS_PER_PAGE": per_page})
        statements: list[str] = []
        engine = app.extensions["myapp.database"].engine
        event.listen(engine, "before_cursor_execute", lambda c, cur, s, *a: statements.append(s))
        response = app.test_client().get(f"/?page={page}")
        assert response.status_code == 200, response.status_code
        counts[f"{per_page} a page, page {page}"] = sum(
            1 for s in statements if s.lstrip().upper().startswith(("SELECT", "WITH"))
        )
    dispose_all_engines()
    return counts


def backend_phase(
    results: Results, backend: str, server_url: str | None, repeats: int, seconds: float, folder: Path
) -> None:
    """Seed a throwaway database, serve the backend's ``PHASES`` apps on it and run the
    matrix; on PostgreSQL also the connection watch, worker memory, the query counts and
    the in-process A/B."""
    with throwaway_database(backend, server_url) as url:
        log(f"{backend}: migrating and seeding 1,000 users and 10,000 posts")
        seeded = migrate_and_seed(url)
        servers: list[Server] = []
        try:
            for name in PHASES[backend]:
                module, _, extra = APPS[name]
                servers.append(start_server(name, module, url, folder, extra, tag=f"{backend}-"))
            if backend == "postgresql":
                assert server_url is not None
                _postgres_matrix(results, server_url, url, servers, seeded, repeats, seconds)
            else:
                warm_up(servers, seeded)
                run_matrix(results, backend, servers, seeded, repeats, seconds)
        finally:
            for server in servers:
                stop_server(server)


def _postgres_matrix(
    results: Results, server_url: str, url: URL, servers: list[Server], seeded: Seeded, repeats: int, seconds: float
) -> None:
    """The matrix with what only PostgreSQL shows: peak connections (pg_stat_activity),
    myapp's worker memory across it, then the query counts and the in-process A/B."""
    by_name = {server.name: server for server in servers}
    with ConnectionWatch(server_url) as watch:
        warm_up(servers, seeded)
        rss_before = rss_mb(by_name["myapp"])
        run_matrix(results, "postgresql", servers, seeded, repeats, seconds)
        rss_after = rss_mb(by_name["myapp"])
    served = sum(c["requests"] for c in results.cells if c["app"] == "myapp" and c["backend"] == "postgresql")
    results.memory = {"rss_before_mb": rss_before, "rss_after_mb": rss_after, "requests": served}
    results.connections = {
        "peaks": dict(watch.peaks),
        "limit": WORKERS * (5 + 5),
        "limit_1_worker": 1 * (5 + 5),
    }
    results.queries = count_index_queries(url)
    log("in-process A/B of the database-layer changes")
    from bench import ab

    results.ab = ab.run_all(url.render_as_string(hide_password=False))
    results.ab_peers = ab.run_peers(url.render_as_string(hide_password=False))


def postgres_server() -> str:
    return (os.environ.get("BENCH_POSTGRES_URL") or os.environ.get("TEST_POSTGRES_URL")
            or "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def reachable(url: str) -> bool:
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return True
    except Exception:
        return False
    finally:
        engine.dispose()


def main() -> None:
    started = time.monotonic()
    seconds = float(os.environ.get("BENCH_SECONDS", "2"))
    repeats = int(os.environ.get("BENCH_REPEATS", "6"))
    backends = selected_backends(os.environ.get("BENCH_BACKENDS", ""))
    postgres = postgres_server()
    mysql = os.environ.get("BENCH_MYSQL_URL") or os.environ.get("TEST_MYSQL_URL") or "mysql+pymysql://root@127.0.0.1:3306/test"
    results = Results(
        machine={
            "cpus": os.cpu_count(),
            "cpu": _cpu_model(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30),
            "python": platform.python_version(),
            "system": platform.platform(terse=True),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        settings={
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": seconds,
            "repeats": repeats,
            "backends": backends,
            "phases": {backend: list(PHASES[backend]) for backend in backends},
            "connections": int(os.environ.get("BENCH_CONNECTIONS", "8")),
            "workers": WORKERS,
            "threads": THREADS,
            "load_generator": loadgen.tool(),
            "versions": _versions(),
        },
    )
    with tempfile.TemporaryDirectory(prefix="myapp-bench-logs-") as logs:
        folder = Path(logs)
        if "postgresql" in backends:
            if not reachable(postgres):
                raise SystemExit(f"PostgreSQL is not reachable at {make_url(postgres)!r}: set BENCH_POSTGRES_URL")
            backend_phase(results, "postgresql", postgres, repeats, seconds, folder)
        if "sqlite" in backends:
            backend_phase(results, "sqlite", None, repeats, seconds, folder)
        if "mysql" in backends:
            if reachable(mysql):
                backend_phase(results, "mysql", mysql, repeats, seconds, folder)
            else:
                results.notes.append(f"MariaDB was not reachable at {make_url(mysql)!r}: no MariaDB figures.")
        results.notes += traceback_notes(folder)
    results.settings["total_seconds"] = round(time.monotonic() - started)
    results.machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(asdict(results), indent=1))
    from bench import report

    report.write(asdict(results))
    log(f"done in {results.settings['total_seconds']} s: docs/performance.md")


def selected_backends(value: str) -> list[str]:
    """``BENCH_BACKENDS``: names of ``PHASES`` separated by commas; empty: all of them."""
    names = [name.strip() for name in value.split(",") if name.strip()] or list(PHASES)
    unknown = [name for name in names if name not in PHASES]
    if unknown:
        raise SystemExit(f"BENCH_BACKENDS: unknown backend(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    return [name for name in PHASES if name in names]


def traceback_notes(folder: Path) -> list[str]:
    """One note per gunicorn log of ``folder`` that holds tracebacks."""
    notes = []
    for server_log in sorted(folder.glob("*.log")):
        content = server_log.read_text(errors="replace")
        if "Traceback" in content:
            notes.append(
                f"{server_log.stem}'s gunicorn log has {content.count('Traceback')} traceback(s): "
                + "; ".join(f"`{error[:200]}`" for error in sorted(set(_raised(content))))
            )
    return notes


def _raised(log_text: str) -> list[str]:
    """The exception line that ends each traceback of a log."""
    errors, inside = [], False
    for line in log_text.splitlines():
        if line.startswith("Traceback"):
            inside = True
        elif inside and line and not line.startswith(" "):
            errors.append(line.strip())
            inside = False
    return errors


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("Flask", "SQLAlchemy", "Flask-SQLAlchemy", "psycopg", "PyMySQL", "gunicorn")
    found = {name: version(name) for name in names}
    try:
        found["wrk"] = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split()[1]
    except (OSError, IndexError):
        pass
    return found


if __name__ == "__main__":
    # Run as bench.run, the module bench/baseline.py imports: one copy of its state (SECRET_KEY).
    from bench import run

    run.main()
