"""Fixtures: one throwaway database per backend, an app per test, isolation through
the registry, and a check that no connection or app context outlives a test.

Backends: SQLite always; PostgreSQL and MariaDB when ``TEST_POSTGRES_URL`` and
``TEST_MYSQL_URL`` are set. Under ``CI`` a missing or unreachable backend fails
the run instead of skipping it.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql
import pytest
from flask import Flask, has_app_context
from flask.testing import FlaskClient
from sqlalchemy import create_engine, delete, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError

from myapp import create_app
from myapp.db import Base, db
from myapp.db.session import AppSession

BACKENDS = {"sqlite": None, "postgresql": "TEST_POSTGRES_URL", "mysql": "TEST_MYSQL_URL"}
SECRET_KEY = "test-secret-key-" + "x" * 32


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_commits: run without the rollback-per-test isolation")
    config.addinivalue_line("markers", "backends(*names): run only on these backends")
    config.addinivalue_line("markers", "faults: the fault suite (throwaway servers, load, races)")
    config.addinivalue_line("markers", "e2e: end-to-end tests in a real browser")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse marks that cannot act (see ``mark_problems``); then leave out, rather than
    skip, the backend variants a ``backends`` mark excludes."""
    problems = [f"{item.nodeid}: {problem}" for item in items for _mark, problem in mark_problems(item)]
    if problems:
        raise pytest.UsageError("marks that cannot act here:\n  " + "\n  ".join(problems))
    kept, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("backends")
        params = getattr(item, "callspec", None)
        name = params.params.get("backend") if params is not None else None
        (dropped if marker and name and name not in marker.args else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


TESTS = Path(__file__).resolve().parent

# Marks that select a folder's tests (``pytest -m faults``): each belongs on every test
# of its folder and nowhere else, or a selection by mark and one by path would differ.
_FOLDER_MARKS = {"faults": TESTS / "faults", "e2e": TESTS / "e2e"}

def mark_problems(item: pytest.Item) -> list[tuple[str, str]]:
    """Why each mark of ``item`` cannot do what it says; empty when all of them can.

    - ``real_commits`` is read only by the ``app`` fixture: without it, the test gets
      no isolation to turn off, and the rows it commits are not cleaned up either.
    - ``backends(...)`` only drops variants of a test parametrized by ``backend``, and
      a name that is not a backend would drop every variant.
    - ``options`` (pytest-flask) only sets config on the ``app`` fixture.
    - ``faults`` and ``e2e``: see ``_FOLDER_MARKS``.

    ``gunicorn`` is not checked: whether a test starts gunicorn shows only when it runs.
    """
    problems: list[tuple[str, str]] = []
    uses = set(getattr(item, "fixturenames", ()))
    for name in ("real_commits", "options"):
        if item.get_closest_marker(name) and "app" not in uses:
            problems.append((name, f"@{name} acts only through the app fixture, which this test does not use"))
    marker = item.get_closest_marker("backends")
    if marker is not None:
        unknown = [name for name in marker.args if name not in BACKENDS]
        if not marker.args or unknown:
            problems.append(("backends", f"@backends{marker.args!r}: the backends are {', '.join(BACKENDS)}"))
        callspec = getattr(item, "callspec", None)
        if callspec is None or "backend" not in callspec.params:
            problems.append(("backends", "@backends acts only on a test parametrized by the backend fixture"))
    path = Path(str(item.path)).resolve()
    for name, folder in _FOLDER_MARKS.items():
        inside = path.is_relative_to(folder)
        if item.get_closest_marker(name) and not inside:
            problems.append((name, f"@{name} belongs to the tests in {folder.relative_to(TESTS.parent)}/ only"))
        elif inside and not item.get_closest_marker(name):
            problems.append((name, f"a test in {folder.relative_to(TESTS.parent)}/ must carry @{name}"))
    return problems


@dataclass
class Backend:
    name: str
    url: URL

    @property
    def is_sqlite(self) -> bool:
        return self.name == "sqlite"


def _server_url(name: str) -> URL | None:
    variable = BACKENDS[name]
    assert variable is not None
    raw = os.environ.get(variable)
    if not raw:
        if os.environ.get("CI"):
            pytest.fail(f"{variable} is not set: in CI every backend must run", pytrace=False)
        pytest.skip(f"{variable} is not set")
    return make_url(raw)


@contextmanager
def _throwaway_database(name: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[URL]:
    """A database of our own on the backend's server, dropped at the end."""
    if name == "sqlite":
        yield make_url(f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'test.sqlite'}")
        return
    server = _server_url(name)
    assert server is not None
    database = f"myapp_test_{secrets.token_hex(4)}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            suffix = " CHARACTER SET utf8mb4" if name == "mysql" else ""
            connection.execute(text(f"CREATE DATABASE {database}{suffix}"))
    except Exception as error:  # a configured backend that is down is a failure, not a skip
        pytest.fail(f"{name} at {server!r} is unreachable: {error}", pytrace=False)
    try:
        yield server.set(database=database)
    finally:
        with admin.connect() as connection:
            force = " WITH (FORCE)" if name == "postgresql" else ""
            connection.execute(text(f"DROP DATABASE IF EXISTS {database}{force}"))
        admin.dispose()


@pytest.fixture(scope="session", params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """A migrated throwaway database on each backend in turn."""
    with _throwaway_database(request.param, tmp_path_factory) as url:
        migrate(url)
        yield Backend(request.param, url)


def migrate(url: URL | str) -> None:
    """Bring a database to the latest migration, as ``flask db upgrade`` would."""
    from alembic import command

    from myapp.cli import alembic_config

    migrator = make_app(url)
    with migrator.app_context():
        command.upgrade(alembic_config(), "head")
    migrator.extensions["myapp.database"].engine.dispose()


def make_app(url: URL | str, **overrides: Any) -> Flask:
    config = {
        "TESTING": True,
        "SECRET_KEY": SECRET_KEY,
        "DATABASE_URL": url,
        "WTF_CSRF_ENABLED": False,
        "DATABASE_APP_NAME": "myapp-test",
    }
    config.update(overrides)
    return create_app(config)


# Nothing listens on port 1 and the folder does not exist: connecting fails at once.
# The passwords are there to prove they never show.
UNREACHABLE_URLS = {
    "postgresql": "postgresql+psycopg://u:s3cret@127.0.0.1:1/x",
    "mysql": "mysql+pymysql://u:s3cret@127.0.0.1:1/x",
    "sqlite": "sqlite:////nonexistent-directory/s3cret/x.sqlite",
}


@pytest.fixture(params=list(UNREACHABLE_URLS))
def down_app(request: pytest.FixtureRequest) -> Iterator[Flask]:
    """An app whose database cannot be reached, on each backend (or those given with
    ``@pytest.mark.parametrize("down_app", [...], indirect=True)``)."""
    app = make_app(UNREACHABLE_URLS[request.param])
    yield app
    app.extensions["myapp.database"].engine.dispose()


@pytest.fixture
def app_config() -> dict[str, Any]:
    """Extra settings for the ``app`` fixture; override it in a module or a test."""
    return {}


@pytest.fixture
def app(request: pytest.FixtureRequest, backend: Backend, app_config: dict[str, Any]) -> Iterator[Flask]:
    app = make_app(backend.url, **app_config)
    engine = app.extensions["myapp.database"].engine
    if request.node.get_closest_marker("real_commits"):
        try:
            yield app
        finally:
            _delete_all_rows(engine)
    else:
        with db.test_isolation(app):
            yield app
    checked_out = engine.pool.checkedout()
    engine.dispose()
    assert checked_out == 0, f"{checked_out} connection(s) still checked out after the test"
    assert not has_app_context(), "an app context leaked out of the test"


def _delete_all_rows(engine: Any) -> None:
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(delete(table))


@pytest.fixture
def _push_request_context() -> None:
    """Switch off pytest-flask's private autouse fixture of this name, on purpose.

    pytest-flask 1.3 pushes ``app.test_request_context()`` around every test that uses
    the ``app`` fixture. With one pushed, Flask 3.1 reuses its app context for every
    test-client request, so ``teardown_appcontext`` (which removes the request's
    session and returns its connection) would not run per request, and no lifecycle
    test would prove anything. pytest-flask has no public way to avoid the push (no
    command-line option, ini setting or marker turns it off), so this is the one
    place that overrides it, by name. Tests push a context themselves where they
    need one. tests/test_pytest_flask_contract.py fails if pytest-flask renames the
    fixture or stops making it autouse, or if a request context is pushed around a
    test again.
    """


@pytest.fixture
def runner(app: Flask) -> Any:
    return app.test_cli_runner()


class AuthActions:
    def __init__(self, client: FlaskClient) -> None:
        self._client = client

    def register(self, username: str = "alice", password: str = "correct horse") -> Any:
        return self._client.post("/auth/register", data={"username": username, "password": password})

    def login(self, username: str = "alice", password: str = "correct horse") -> Any:
        return self._client.post("/auth/login", data={"username": username, "password": password})

    def register_and_login(self, username: str = "alice", password: str = "correct horse") -> None:
        assert self.register(username, password).status_code == 302
        assert self.login(username, password).status_code == 302

    def logout(self) -> Any:
        return self._client.post("/auth/logout")


@pytest.fixture
def auth(client: FlaskClient) -> AuthActions:
    return AuthActions(client)


class CertificationFailures:
    """Make the next ``n`` commits of any app session fail the way a Galera node aborts
    a transaction that lost certification: MariaDB error 1213 at COMMIT, nothing saved.

    On every backend, so that each write path is shown to re-run its whole unit of
    work; the real thing is fault scenario 15 (tests/faults/test_galera.py).
    """

    def __init__(self) -> None:
        self.remaining = 0
        self.raised = 0

    def next(self, count: int) -> None:
        self.remaining = count

    def before_commit(self, session: Any) -> None:
        if self.remaining > 0:
            self.remaining -= 1
            self.raised += 1
            raise OperationalError(
                "COMMIT", {}, pymysql.err.OperationalError(1213, "Deadlock: wsrep aborted transaction")
            )


@pytest.fixture
def certification_failures() -> Iterator[CertificationFailures]:
    failures = CertificationFailures()
    event.listen(AppSession, "before_commit", failures.before_commit)
    try:
        yield failures
    finally:
        event.remove(AppSession, "before_commit", failures.before_commit)


_COUNTED = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\b", re.IGNORECASE)


@dataclass
class QueryLog:
    statements: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.statements)


@contextmanager
def count_queries(app: Flask) -> Iterator[QueryLog]:
    """Record the SQL statements (not BEGIN, SAVEPOINT or ROLLBACK) the block sends."""
    engine = app.extensions["myapp.database"].engine
    log = QueryLog()

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if _COUNTED.match(statement):
            log.statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield log
    finally:
        event.remove(engine, "before_cursor_execute", record)


@contextmanager
def assert_num_queries(app: Flask, expected: int) -> Iterator[QueryLog]:
    """Fail unless the block sends exactly ``expected`` statements (like Django's)."""
    with count_queries(app) as log:
        yield log
    assert log.count == expected, f"expected {expected} queries, got {log.count}:\n" + "\n".join(
        log.statements
    )
