"""The Alembic migrations, run through ``flask db`` on a fresh database of each backend:
up to head, down to base, up again, and ``flask db check`` catching drift; and where
``flask db`` finds them: in the installed package, as a wheel deploy needs."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from click.testing import Result
from flask import Flask
from sqlalchemy import inspect, text

from myapp.cli import alembic_config
from myapp.config import MIGRATIONS_PACKAGE
from myapp.db import Base
from tests.support.apps import make_app
from tests.support.databases import BACKENDS, throwaway_database

MODEL_TABLES = set(Base.metadata.tables)


@pytest.fixture(params=list(BACKENDS))
def fresh_app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    """An app on an empty database of its own (not the session's migrated one)."""
    with throwaway_database(request.param, tmp_path_factory) as url:
        app = make_app(url)
        try:
            yield app
        finally:
            app.extensions["myapp.database"].engine.dispose()


def flask_db(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(args=["db", *args])


def tables(app: Flask) -> set[str]:
    engine = app.extensions["myapp.database"].engine
    with engine.connect() as connection:
        return set(inspect(connection).get_table_names())


def revisions(app: Flask) -> tuple[str | None, list[str]]:
    """The head and every revision, oldest first, as the migrations folder has them."""
    with app.app_context():
        script = ScriptDirectory.from_config(alembic_config())
        return script.get_current_head(), [rev.revision for rev in reversed(list(script.walk_revisions()))]


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, result.output
    assert result.exception is None


def test_upgrade_downgrade_upgrade_and_check(fresh_app: Flask) -> None:
    head, _ = revisions(fresh_app)
    assert head is not None
    assert not tables(fresh_app) & MODEL_TABLES

    assert_ok(flask_db(fresh_app, "upgrade"))
    assert MODEL_TABLES <= tables(fresh_app)
    current = flask_db(fresh_app, "current")
    assert_ok(current)
    assert current.output.strip() == head

    assert_ok(flask_db(fresh_app, "downgrade", "base"))
    assert not tables(fresh_app) & MODEL_TABLES
    assert "(empty" in flask_db(fresh_app, "current").output

    assert_ok(flask_db(fresh_app, "upgrade"))
    assert MODEL_TABLES <= tables(fresh_app)
    check = flask_db(fresh_app, "check")
    assert_ok(check)
    assert "No differences" in check.output
    assert fresh_app.extensions["myapp.database"].engine.pool.checkedout() == 0


def test_every_revision_goes_down_and_up_one_step(fresh_app: Flask) -> None:
    """Each revision's downgrade undoes exactly its upgrade, whatever revisions exist."""
    head, chain = revisions(fresh_app)
    assert_ok(flask_db(fresh_app, "upgrade"))
    for _ in chain:
        assert_ok(flask_db(fresh_app, "downgrade", "-1"))  # relative: an argument, not an option
    assert not tables(fresh_app) & MODEL_TABLES
    for revision in chain:
        assert_ok(flask_db(fresh_app, "upgrade", "+1"))
        assert flask_db(fresh_app, "current").output.strip() == revision
    assert chain[-1] == head
    assert_ok(flask_db(fresh_app, "check"))

    assert_ok(flask_db(fresh_app, "downgrade"))  # default: one step
    previous = flask_db(fresh_app, "current").output.strip()
    assert previous == (chain[-2] if len(chain) > 1 else "(empty: no migration applied)")


def _drop_index(dialect: str) -> str:
    return "DROP INDEX ix_post_created_at_id" + (" ON post" if dialect in ("mysql", "mariadb") else "")


DRIFTS: dict[str, Any] = {
    "dropped-index": _drop_index,
    "extra-column": lambda dialect: "ALTER TABLE post ADD COLUMN stray INTEGER",
}


@pytest.mark.parametrize("drift", list(DRIFTS))
def test_check_fails_in_one_line_when_the_schema_drifts(fresh_app: Flask, drift: str) -> None:
    assert_ok(flask_db(fresh_app, "upgrade"))
    engine = fresh_app.extensions["myapp.database"].engine
    with engine.begin() as connection:
        connection.execute(text(DRIFTS[drift](engine.dialect.name)))

    result = flask_db(fresh_app, "check")
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "operations detected" in lines[0]


def test_upgrade_of_an_unknown_revision_is_one_line(fresh_app: Flask) -> None:
    result = flask_db(fresh_app, "upgrade", "no-such-revision")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "no-such-revision" in lines[0]
    assert not tables(fresh_app) & MODEL_TABLES


# -- where flask db finds the migrations -------------------------------------------


@pytest.fixture
def config_app() -> Iterator[Flask]:
    """An app for reading its Alembic configuration; its database is never touched."""
    app = make_app("sqlite://")
    try:
        yield app
    finally:
        app.extensions["myapp.database"].engine.dispose()


def script_location(app: Flask) -> Path:
    with app.app_context():
        location = alembic_config().get_main_option("script_location")
    assert location is not None
    return Path(location)


def test_migrations_are_the_installed_package_folder(config_app: Flask) -> None:
    """The default MIGRATIONS_DIR is the package myapp.migrations, which a wheel carries."""
    spec = importlib.util.find_spec(MIGRATIONS_PACKAGE)
    assert spec is not None and spec.submodule_search_locations, f"{MIGRATIONS_PACKAGE} is not installed"
    location = script_location(config_app)
    assert location == Path(spec.submodule_search_locations[0])
    assert (location / "env.py").is_file() and (location / "script.py.mako").is_file()
    assert any((location / "versions").glob("0001_*.py"))


def test_migrations_follow_the_package_wherever_it_is_installed(
    config_app: Flask, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Installed elsewhere (as from a wheel, with no checkout around myapp), the
    package's folder is used: a path derived from ``__file__`` fails here."""
    spec = importlib.util.find_spec(MIGRATIONS_PACKAGE)
    assert spec is not None and spec.submodule_search_locations, f"{MIGRATIONS_PACKAGE} is not installed"
    elsewhere = tmp_path / "site-packages" / "myapp" / "migrations"
    shutil.copytree(spec.submodule_search_locations[0], elsewhere, ignore=shutil.ignore_patterns("__pycache__"))
    moved = importlib.util.spec_from_file_location(
        MIGRATIONS_PACKAGE, elsewhere / "__init__.py", submodule_search_locations=[str(elsewhere)]
    )
    assert moved is not None
    # find_spec answers from sys.modules first, as it would for an imported package.
    monkeypatch.setitem(sys.modules, MIGRATIONS_PACKAGE, importlib.util.module_from_spec(moved))

    assert script_location(config_app) == elsewhere
    with config_app.app_context():
        script = ScriptDirectory.from_config(alembic_config())
        paths = [Path(revision.path) for revision in script.walk_revisions()]
    assert paths and all(path.parent == elsewhere / "versions" for path in paths)
