"""pytest fixtures for the topologies: each starts once per test session, on first use.

Import the ones a test module needs (``from tests.topology.fixtures import ...``). Each
topology comes as a pair made by ``_topology_fixtures``: ``<name>_session`` builds it
once; ``<name>`` hands it to a test and afterwards undoes what the test may have left
behind (a partition, a paused replay, a stopped node, a changed setting), so that a
failing test does not break the next one. A module may override ``<name>_session``
(tests/faults/test_pgbouncer.py does) and keep ``<name>``. A test that promotes a
standby builds a topology of its own instead.

What the machine needs is checked first: a missing program is a skip on a laptop and
a failure under ``CI``, as for the backends of tests/support/databases.py.
"""

from __future__ import annotations

import glob
import inspect
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

import pytest

from tests.support.servers import PostgresServer, ThrowawayServer, throwaway_server

from .galera import PROVIDER as GALERA_PROVIDER, GaleraCluster, galera_cluster
from .mariadb import namespaced_mariadb
from .netns import Partitionable
from .patroni import ETCD, HAPROXY, PATRONI, PATRONICTL, PatroniCluster, patroni_cluster
from .pgbouncer import BINARY as PGBOUNCER, PgBouncer, pgbouncer
from .postgres import ReplicatedPostgres, namespaced_postgres, replicated_postgres

T = TypeVar("T")


def require(condition: bool, message: str) -> None:
    """Skip the test when the machine lacks ``message``'s program; under CI, fail."""
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


def require_mariadb() -> None:
    require(bool(glob.glob("/usr/*bin/mariadbd")), "no mariadbd")


def require_galera() -> None:
    require(os.path.exists(GALERA_PROVIDER), f"no {GALERA_PROVIDER}: apt-get install galera-4")
    require(shutil.which("rsync") is not None, "no rsync (Galera's state transfer): apt-get install rsync")


def require_pgbouncer() -> None:
    require(os.access(PGBOUNCER, os.X_OK),
            f"no {PGBOUNCER}: apt-get install pgbouncer (the package's own service need not run)")


def require_patroni() -> None:
    for program, package in ((PATRONI, "patroni"), (PATRONICTL, "patroni"), (ETCD, "etcd-server"),
                             (HAPROXY, "haproxy")):
        require(os.access(program, os.X_OK),
                f"no {program}: apt-get install {package} (the package's own service need not run)")


def _topology_fixtures(
    name: str,
    build: Callable[[], AbstractContextManager[T]],
    doc: str,
    *,
    requires: tuple[Callable[[], None], ...],
    before: Callable[[T], Any] | None = None,
    after: Callable[[T], Any] | None = None,
) -> tuple[Any, Any]:
    """The fixture pair of one topology: ``<name>_session`` checks ``requires`` and
    enters ``build()`` once per session, on first use; ``<name>`` runs ``before`` and
    ``after`` around each test that takes it. One factory, so that the pairs cannot
    drift apart from one topology to the next."""
    session_name = f"{name}_session"

    def built() -> Iterator[T]:
        for requirement in requires:
            requirement()
        with build() as topology:
            yield topology

    def handed_over(**requested: T) -> Iterator[T]:
        topology = requested[session_name]
        if before is not None:
            before(topology)
        yield topology
        if after is not None:
            after(topology)

    # pytest reads a fixture's dependencies from its signature: give this one the
    # session fixture's name, so that it is set up (or overridden) as if written out.
    handed_over.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(session_name, inspect.Parameter.KEYWORD_ONLY)]
    )
    built.__doc__ = f"Builds, once per session and on first use, what ``{name}`` hands to a test."
    handed_over.__doc__ = doc
    return (pytest.fixture(scope="session", name=session_name)(built),
            pytest.fixture(name=name)(handed_over))


def _heal_partition(node: Partitionable) -> None:
    """Reconnect a node a test left cut off from the network (and only then)."""
    if node.netns is not None and node.netns.partitioned:
        node.heal()


@contextmanager
def _bouncer_before_postgres() -> Iterator[PgBouncer]:
    """PgBouncer in front of a throwaway PostgreSQL of its own."""
    server: ThrowawayServer
    with throwaway_server(PostgresServer) as server, pgbouncer("127.0.0.1", server.port) as bouncer:
        yield bouncer


replicated_session, replicated = _topology_fixtures(
    "replicated", lambda: replicated_postgres(standbys=1),
    "A primary and one streaming standby, on loopback, shared by the session.",
    requires=(require_postgres,), after=ReplicatedPostgres.reset,
)

replicated2_session, replicated2 = _topology_fixtures(
    "replicated2", lambda: replicated_postgres(standbys=2),
    "A primary and two streaming standbys, on loopback, shared by the session.",
    requires=(require_postgres,), after=ReplicatedPostgres.reset,
)

netns_postgres_session, netns_postgres = _topology_fixtures(
    "netns_postgres", namespaced_postgres,
    "A PostgreSQL in a network namespace of its own; healed after the test.",
    requires=(require_postgres, require_namespaces), after=_heal_partition,
)

netns_mariadb_session, netns_mariadb = _topology_fixtures(
    "netns_mariadb", namespaced_mariadb,
    "A MariaDB in a network namespace of its own; healed after the test.",
    requires=(require_mariadb, require_namespaces), after=_heal_partition,
)

bouncer_session, bouncer = _topology_fixtures(
    "bouncer", _bouncer_before_postgres,
    "PgBouncer (transaction pooling, 2 server connections) in front of a throwaway "
    "PostgreSQL, restarted before the test: its server connections start clean, without "
    "the prepared statements an earlier test left on them.",
    requires=(require_postgres, require_pgbouncer), before=PgBouncer.restart,
)

galera_session, galera = _topology_fixtures(
    "galera", galera_cluster,
    "A three-node MariaDB Galera cluster on loopback, shared by the session; every "
    "node running, joined and synced again after the test.",
    requires=(require_mariadb, require_galera), before=GaleraCluster.heal, after=GaleraCluster.heal,
)

patroni_session, patroni = _topology_fixtures(
    "patroni", patroni_cluster,
    "etcd, two Patroni nodes (PostgreSQL, synchronous replication) and HAProxy on loopback, "
    "shared by the session; before and after the test every Patroni runs, one node leads, "
    "the other streams as its synchronous standby and HAProxy's routes are settled. "
    "Either node may lead: a test asks ``leader()``.",
    requires=(require_postgres, require_patroni), before=PatroniCluster.heal, after=PatroniCluster.heal,
)
