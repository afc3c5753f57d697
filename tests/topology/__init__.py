"""Throwaway multi-server topologies for the fault suite (issue 10): a PostgreSQL
primary with streaming standbys, a three-node MariaDB Galera cluster, servers inside network namespaces that can be cut off
silently, PgBouncer, and a Patroni + etcd + HAProxy stack (issue 19). Every builder is a context manager that removes what it made,
by PID and by name of its own namespace, whatever happens in the test.

Session-scoped pytest fixtures around them are in :mod:`tests.topology.fixtures`.
"""

from .galera import GaleraCluster, GaleraNode, galera_cluster
from .mariadb import NamespacedMariaDB, namespaced_mariadb
from .netns import NetNamespace, network_namespace
from .patroni import PatroniCluster, PatroniNode, patroni_cluster
from .pgbouncer import PgBouncer, pgbouncer
from .postgres import PgNode, ReplicatedPostgres, namespaced_postgres, replicated_postgres

__all__ = [
    "GaleraCluster", "GaleraNode", "galera_cluster", "NamespacedMariaDB", "NetNamespace", "PatroniCluster",
    "PatroniNode", "PgBouncer", "PgNode", "ReplicatedPostgres", "namespaced_mariadb", "namespaced_postgres",
    "network_namespace", "patroni_cluster", "pgbouncer", "replicated_postgres",
]
