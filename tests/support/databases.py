"""The backends a test runs on, and throwaway databases on their servers.

SQLite always; PostgreSQL and MariaDB when ``TEST_POSTGRES_URL`` and ``TEST_MYSQL_URL``
name a server where databases may be created and dropped. Under ``CI`` a missing or
unreachable backend fails the run instead of skipping it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import create_engine, delete, text
from sqlalchemy.engine import URL, make_url

from myapp.db import Base

# Each backend and the environment variable that names its server (SQLite needs none).
BACKENDS = {"sqlite": None, "postgresql": "TEST_POSTGRES_URL", "mysql": "TEST_MYSQL_URL"}

# Nothing listens on port 1 and the folder does not exist: connecting fails at once.
# The passwords are there to prove they never show.
UNREACHABLE_URLS = {
    "postgresql": "postgresql+psycopg://u:s3cret@127.0.0.1:1/x",
    "mysql": "mysql+pymysql://u:s3cret@127.0.0.1:1/x",
    "sqlite": "sqlite:////nonexistent-directory/s3cret/x.sqlite",
}


@dataclass
class Backend:
    """A migrated database a test runs on, and the backend it belongs to."""

    name: str
    url: URL

    @property
    def is_sqlite(self) -> bool:
        return self.name == "sqlite"


def server_url(name: str) -> URL:
    """The configured server of backend ``name``: a skip when unset, a failure in CI."""
    variable = BACKENDS[name]
    assert variable is not None
    raw = os.environ.get(variable)
    if not raw:
        if os.environ.get("CI"):
            pytest.fail(f"{variable} is not set: in CI every backend must run", pytrace=False)
        pytest.skip(f"{variable} is not set")
    return make_url(raw)


@contextmanager
def throwaway_database(name: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[URL]:
    """A database of our own on the backend's server, dropped at the end.

    Its name is random, so that runs (and xdist workers) sharing a server never meet.
    """
    if name == "sqlite":
        yield make_url(f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'test.sqlite'}")
        return
    server = server_url(name)
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


def delete_all_rows(engine: Any) -> None:
    """Empty every table, children first: the clean-up of a test that really commits."""
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(delete(table))
