"""Fixtures: one throwaway database per backend, an app per test, isolation through
the registry, and a check that no connection or app context outlives a test.

Backends: SQLite always; PostgreSQL and MariaDB when ``TEST_POSTGRES_URL`` and
``TEST_MYSQL_URL`` are set (see tests/support/databases.py). Fixtures and hooks only:
what a test module calls itself is in tests/support/.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask, has_app_context
from flask.testing import FlaskClient
from sqlalchemy import event

from myapp.db import db
from myapp.db.session import AppSession
from tests.support.apps import dispose_app, make_app, migrate
from tests.support.auth import AuthActions
from tests.support.certification import CertificationFailures
from tests.support.databases import BACKENDS, UNREACHABLE_URLS, Backend, delete_all_rows, throwaway_database
from tests.support.marks import mark_problems


def pytest_configure(config: pytest.Config) -> None:
    """Declare this suite's marks, so that ``--strict-markers`` refuses a misspelt one."""
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
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("backends")
        params = getattr(item, "callspec", None)
        name = params.params.get("backend") if params is not None else None
        (dropped if marker and name and name not in marker.args else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session", params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """A migrated throwaway database on each backend in turn."""
    with throwaway_database(request.param, tmp_path_factory) as url:
        migrate(url)
        yield Backend(request.param, url)


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
    """The app on ``backend``, its writes rolled back after the test (or, marked
    ``real_commits``, committed and then deleted); no connection or context may leak."""
    app = make_app(backend.url, **app_config)
    engine = app.extensions["myapp.database"].engine
    if request.node.get_closest_marker("real_commits"):
        try:
            yield app
        finally:
            delete_all_rows(engine)
    else:
        with db.test_isolation(app):
            yield app
    checked_out = engine.pool.checkedout()
    engine.dispose()
    assert checked_out == 0, f"{checked_out} connection(s) still checked out after the test"
    assert not has_app_context(), "an app context leaked out of the test"


@pytest.fixture
def app_factory(backend: Backend) -> Iterator[Callable[..., Flask]]:
    """Make more apps on the test's backend with other settings (``app_factory(X=1)``);
    their engines are disposed at the end."""
    made: list[Flask] = []

    def factory(**overrides: Any) -> Flask:
        made.append(make_app(backend.url, **overrides))
        return made[-1]

    yield factory
    for each in made:
        dispose_app(each)


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
    """A CLI runner for the test's app: commands are tested as ``flask`` runs them."""
    return app.test_cli_runner()


@pytest.fixture
def auth(client: FlaskClient) -> AuthActions:
    """Register and log in through the test client's own forms."""
    return AuthActions(client)


@pytest.fixture
def certification_failures() -> Iterator[CertificationFailures]:
    """Simulated Galera certification failures at COMMIT, switched on by ``next(n)``."""
    failures = CertificationFailures()
    event.listen(AppSession, "before_commit", failures.before_commit)
    try:
        yield failures
    finally:
        event.remove(AppSession, "before_commit", failures.before_commit)
