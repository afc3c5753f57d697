"""pytest fixtures for the topologies: each starts once per test session, on first use.

Import the ones a test module needs (``from tests.topology.fixtures import ...``). The
session-scoped fixture builds the topology; the function-scoped one hands it to a test
and afterwards undoes what the test may have left behind (a partition, a paused
replay, a stopped node, a changed setting), so that a failing test does not break the
next one. A test that promotes a standby builds a topology of its own instead.

What the machine needs is checked first: a missing program is a skip on a laptop and
a failure under ``CI``, as for the backends of tests/support/databases.py.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterator

import pytest

from tests.support.servers import PostgresServer, ThrowawayServer, throwaway_server

from .galera import PROVIDER as GALERA_PROVIDER, GaleraCluster, galera_cluster
from .mariadb import NamespacedMariaDB, namespaced_mariadb
from .pgbouncer import BINARY as PGBOUNCER, PgBouncer, pgbouncer
from .postgres import PgNode, ReplicatedPostgres, namespaced_postgres, replicated_postgres


def require(condition: bool, message: str) -> None:
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def require_postgres() -> None:
    require(bool(glob.glob("/usr/lib/postgresql/*/bin/pg_basebackup")),
            "no PostgreSQL server binaries (pg_basebackup) under /usr/lib/postgresql")


def require_namespaces() -> None:
    require(os.geteuid() == 0 and shutil.which("ip") is not None,
            "network namespaces need root and iproute2 (ip)")


@pytest.fixture(scope="session")
def replicated_session() -> Iterator[ReplicatedPostgres]:
    require_postgres()
    with replicated_postgres(standbys=1) as topology:
        yield topology


@pytest.fixture
def replicated(replicated_session: ReplicatedPostgres) -> Iterator[ReplicatedPostgres]:
    """A primary and one streaming standby, on loopback, shared by the session."""
    yield replicated_session
    replicated_session.reset()


@pytest.fixture(scope="session")
def replicated2_session() -> Iterator[ReplicatedPostgres]:
    require_postgres()
    with replicated_postgres(standbys=2) as topology:
        yield topology


@pytest.fixture
def replicated2(replicated2_session: ReplicatedPostgres) -> Iterator[ReplicatedPostgres]:
    """A primary and two streaming standbys, on loopback, shared by the session."""
    yield replicated2_session
    replicated2_session.reset()


@pytest.fixture(scope="session")
def netns_postgres_session() -> Iterator[PgNode]:
    require_postgres()
    require_namespaces()
    with namespaced_postgres() as node:
        yield node


@pytest.fixture
def netns_postgres(netns_postgres_session: PgNode) -> Iterator[PgNode]:
    """A PostgreSQL in a network namespace of its own; healed after the test."""
    yield netns_postgres_session
    if netns_postgres_session.netns is not None and netns_postgres_session.netns.partitioned:
        netns_postgres_session.heal()


@pytest.fixture(scope="session")
def netns_mariadb_session() -> Iterator[NamespacedMariaDB]:
    require(bool(glob.glob("/usr/*bin/mariadbd")), "no mariadbd")
    require_namespaces()
    with namespaced_mariadb() as server:
        yield server


@pytest.fixture
def netns_mariadb(netns_mariadb_session: NamespacedMariaDB) -> Iterator[NamespacedMariaDB]:
    """A MariaDB in a network namespace of its own; healed after the test."""
    yield netns_mariadb_session
    if netns_mariadb_session.netns is not None and netns_mariadb_session.netns.partitioned:
        netns_mariadb_session.heal()


@pytest.fixture(scope="session")
def bouncer_session() -> Iterator[PgBouncer]:
    require_postgres()
    require(os.access(PGBOUNCER, os.X_OK),
            f"no {PGBOUNCER}: apt-get install pgbouncer (the package's own service need not run)")
    server: ThrowawayServer
    with throwaway_server(PostgresServer) as server, pgbouncer("127.0.0.1", server.port) as bouncer:
        yield bouncer


@pytest.fixture
def bouncer(bouncer_session: PgBouncer) -> PgBouncer:
    """PgBouncer (transaction pooling, 2 server connections) in front of a throwaway
    PostgreSQL, restarted before the test: its server connections start clean, without
    the prepared statements an earlier test left on them."""
    bouncer_session.restart()
    return bouncer_session


@pytest.fixture(scope="session")
def galera_session() -> Iterator[GaleraCluster]:
    require(bool(glob.glob("/usr/*bin/mariadbd")), "no mariadbd")
    require(os.path.exists(GALERA_PROVIDER), f"no {GALERA_PROVIDER}: apt-get install galera-4")
    require(shutil.which("rsync") is not None, "no rsync (Galera's state transfer): apt-get install rsync")
    with galera_cluster() as cluster:
        yield cluster


@pytest.fixture
def galera(galera_session: GaleraCluster) -> Iterator[GaleraCluster]:
    """A three-node MariaDB Galera cluster on loopback, shared by the session; every
    node running, joined and synced again after the test."""
    galera_session.heal()
    yield galera_session
    galera_session.heal()
