"""The app under test, built from a database URL with the settings every test shares."""

from __future__ import annotations

from typing import Any

from flask import Flask
from sqlalchemy.engine import URL

from myapp import create_app

SECRET_KEY = "test-secret-key-" + "x" * 32


def make_app(url: URL | str, **overrides: Any) -> Flask:
    """An app in testing mode on ``url``; ``overrides`` win over the shared settings."""
    config = {
        "TESTING": True,
        "SECRET_KEY": SECRET_KEY,
        "DATABASE_URL": url,
        "WTF_CSRF_ENABLED": False,
        "DATABASE_APP_NAME": "myapp-test",
    }
    config.update(overrides)
    return create_app(config)


def migrate(url: URL | str) -> None:
    """Bring a database to the latest migration, as ``flask db upgrade`` would."""
    from alembic import command

    from myapp.cli import alembic_config

    migrator = make_app(url)
    with migrator.app_context():
        command.upgrade(alembic_config(), "head")
    migrator.extensions["myapp.database"].engine.dispose()


def dispose_app(app: Flask) -> None:
    """Close every connection an app holds: its engines, its replicas' and their checks'."""
    from myapp.db.replication import Replicas

    state = app.extensions["myapp.database"]
    for engine in (*state.serving, state.probe_engine):
        engine.dispose()
    replicas = state.feature(Replicas)
    if replicas is not None:
        replicas.replica_set.dispose()
