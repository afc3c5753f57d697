"""Throwaway PostgreSQL topologies: a primary with streaming standbys, any node of which
may live in a network namespace of its own.

Why: failover code has to be tested against a real promotion (a standby that was read
only becomes the writable primary, on another port or host), real replication lag and
a primary that vanishes without a word. Each node is a :class:`PgNode`, a
``PostgresServer`` of tests/support/servers.py in a temporary folder of its own with its
own port; the harness talks to every node through its Unix socket (the control plane),
so it keeps control of a node that tests have cut off from the network, while the
tests connect over TCP (``url()``), the path a partition breaks.

Where a node listens: on 127.0.0.1 when it is on the host; on its namespace address
when it is in a namespace. A host node also listens on the host end of every namespace
of the topology, so that a standby inside a namespace can stream from it. Two nodes in
two different namespaces cannot reach each other (the host does not forward), so a
standby in a namespace cannot follow a primary in another one: that is refused.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from tests.support.servers import START_TIMEOUT, PostgresServer, chown_to, run_as

from .netns import NetNamespace, Partitionable, network_namespace, wait_for

SETTING_NAME = re.compile(r"^[a-z_][a-z0-9_.]*$")

# postgresql.conf of a replicated primary; standbys inherit it through pg_basebackup.
REPLICATION_SETTINGS: dict[str, Any] = {
    "wal_level": "replica",
    "max_wal_senders": 10,
    "max_replication_slots": 10,
    "hot_standby": "on",
    "wal_keep_size": "256MB",  # a standby that was stopped a while can still catch up
    "wal_log_hints": "on",  # lets a later test pg_rewind an old primary
    "fsync": "off",  # throwaway data: no need to wait for the disk
}


def _literal(value: Any) -> str:
    """A value as a quoted postgresql.conf / ALTER SYSTEM literal."""
    if isinstance(value, bool):
        value = "on" if value else "off"
    return "'" + str(value).replace("'", "''") + "'"


class PgNode(PostgresServer, Partitionable):
    """One PostgreSQL 15 server of a topology: a primary or a standby.

    ``label`` names it in logs, ``cluster_name`` and ``application_name``. ``address``
    is where clients reach it over TCP (127.0.0.1, or its namespace address).
    """

    def __init__(self, root: Path, label: str, netns: NetNamespace | None = None,
                 extra_listen: Sequence[str] = ()) -> None:
        super().__init__(root)
        self.label = label
        self.netns = netns
        self.extra_listen = list(extra_listen)
        self.pg_ctl_log = root / "pg_ctl.log"

    # -- where it is -----------------------------------------------------------------

    @property
    def address(self) -> str:
        return self.netns.address if self.netns is not None else "127.0.0.1"

    def address_seen_from(self, other: PgNode) -> str:
        """The address at which ``other`` (a standby of this node) reaches this node."""
        if self.netns is not None:
            if other.netns is not None and other.netns is not self.netns:
                raise ValueError(f"{other.label} and {self.label} are in different namespaces: no route")
            return self.address
        return other.netns.host_address if other.netns is not None else "127.0.0.1"

    def url(self, database: str = "postgres") -> URL:
        """SQLAlchemy URL over TCP, the way the application connects."""
        return URL.create("postgresql+psycopg", username="postgres", host=self.address, port=self.port,
                          database=database)

    def conninfo(self, database: str = "postgres", **params: Any) -> str:
        """libpq connection string over TCP, for psycopg.connect()."""
        return make_conninfo(host=self.address, port=self.port, user="postgres", dbname=database, **params)

    def control_url(self, database: str = "postgres") -> URL:
        """SQLAlchemy URL over the Unix socket: works while the node is partitioned."""
        return URL.create("postgresql+psycopg", username="postgres", database=database,
                          query={"host": str(self.root), "port": str(self.port)})

    def admin_engine(self) -> Engine:
        return create_engine(self.control_url(self.admin_database), isolation_level="AUTOCOMMIT",
                             poolclass=NullPool)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run one statement as superuser over the Unix socket (autocommit); its rows."""
        with psycopg.connect(host=str(self.root), port=self.port, user="postgres", dbname="postgres",
                             autocommit=True, connect_timeout=5) as connection:
            cursor = connection.execute(sql.encode(), params or None)
            return cursor.fetchall() if cursor.description is not None else []

    def answers_over_network(self) -> bool:
        try:
            with psycopg.connect(self.conninfo(connect_timeout=1), autocommit=True) as connection:
                connection.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    # -- lifecycle ---------------------------------------------------------------------

    def _pg_ctl(self, *args: str) -> None:
        prefix = self.netns.exec_prefix() if self.netns is not None else []
        command = [*prefix, *run_as(self.user), str(self.bin / "pg_ctl"), "-D", str(self.data), *args]
        with self.pg_ctl_log.open("ab") as sink:  # a file, never a pipe: see tests/support/servers.py
            result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                    timeout=START_TIMEOUT + 10)
        if result.returncode != 0:
            output = self.pg_ctl_log.read_text(errors="replace").splitlines()[-5:]
            raise AssertionError(f"{self.label}: pg_ctl {' '.join(args)} failed ({result.returncode}):\n"
                                 + "\n".join(output) + "\n" + self.log_tail())

    def write_settings(self, settings: dict[str, Any]) -> None:
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/topology\n")
            for name, value in settings.items():
                conf.write(f"{name} = {_literal(value)}\n")

    def allow_networks(self, networks: Collection[str]) -> None:
        """Trust connections (and replication) from these networks (the topology's /30s)."""
        with (self.data / "pg_hba.conf").open("a") as hba:
            for network in networks:
                hba.write(f"host all all {network} trust\nhost replication all {network} trust\n")

    def start(self) -> None:
        # Per-node settings go on the command line; everything a test may change with
        # ALTER SYSTEM must not (the command line would win over postgresql.auto.conf).
        listen = ",".join([self.address, *self.extra_listen])
        options = f"-p {self.port} -k {self.root} -c listen_addresses={listen} -c cluster_name={self.label}"
        self._pg_ctl("-l", str(self.log), "-o", options, "-w", "-t", str(int(START_TIMEOUT)), "start")

    @property
    def pid(self) -> int | None:
        """The postmaster's PID, from postmaster.pid; None when it is not running."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def stop(self, mode: str = "fast") -> None:
        """Stop the postmaster (``pg_ctl stop`` signals the PID in postmaster.pid); a no-op
        when it is already down."""
        if self.running:
            self._pg_ctl("-m", mode, "-w", "-t", str(int(START_TIMEOUT)), "stop")

    def ensure_stopped(self) -> None:
        """Stop whatever happens: fast, then immediate, then SIGKILL to the postmaster's PID."""
        for mode in ("fast", "immediate"):
            try:
                self.stop(mode)
                return
            except (AssertionError, subprocess.TimeoutExpired):
                continue
        pid = self.pid
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not self.running, 10, f"{self.label} postmaster {pid} to die")

    def is_in_recovery(self) -> bool:
        return bool(self.query("SELECT pg_is_in_recovery()")[0][0])

    def set_setting(self, name: str, value: Any) -> None:
        """ALTER SYSTEM SET (RESET when ``value`` is None) and reload the configuration."""
        if not SETTING_NAME.match(name):
            raise ValueError(f"not a setting name: {name!r}")
        if value is None:
            self.query(f"ALTER SYSTEM RESET {name}")
        else:
            self.query(f"ALTER SYSTEM SET {name} = {_literal(value)}")
        self.query("SELECT pg_reload_conf()")


@contextmanager
def postgres_node(label: str, netns: NetNamespace | None = None, extra_listen: Sequence[str] = ()) -> Iterator[PgNode]:
    """A node in a temporary folder of its own, stopped and removed at the end (its
    postmaster, whoever started it: pg_ctl here, or Patroni in tests/topology/patroni.py)."""
    root = Path(tempfile.mkdtemp(prefix=f"myapp-topology-{label}-"))
    root.chmod(0o755)
    chown_to(root, PgNode.user)
    node = PgNode(root, label, netns, extra_listen)
    try:
        yield node
    finally:
        if netns is not None and netns.partitioned:
            # A fast shutdown of a primary waits for its standbys to confirm the last
            # WAL; across a partition that is wal_sender_timeout (60 s): heal first.
            try:
                netns.heal()
            except Exception:
                pass
        try:
            node.ensure_stopped()
        finally:
            shutil.rmtree(root, ignore_errors=True)


class ReplicatedPostgres:
    """A primary and its streaming standbys. ``nodes[0]`` is the primary it started
    with; ``primary`` is whichever node was last promoted."""

    def __init__(self, nodes: list[PgNode]) -> None:
        self.nodes = nodes
        self.primary = nodes[0]
        self.timings: dict[str, float] = {}  # measured seconds, e.g. "basebackup standby1"
        self._changed: dict[str, set[str]] = {}  # settings set_standby_setting changed, per node label

    @property
    def standbys(self) -> list[PgNode]:
        return [node for node in self.nodes if node is not self.primary]

    # -- building --------------------------------------------------------------------

    def clone(self, standby: PgNode, upstream: PgNode | None = None) -> None:
        """Make ``standby`` a copy of ``upstream`` with ``pg_basebackup -R`` (run where the
        standby lives, so that the primary_conninfo it writes is the standby's route)."""
        upstream = upstream or self.primary
        prefix = standby.netns.exec_prefix() if standby.netns is not None else []
        conninfo = make_conninfo(host=upstream.address_seen_from(standby), port=upstream.port, user="postgres",
                                 application_name=standby.label)
        command = [*prefix, *run_as(standby.user), str(standby.bin / "pg_basebackup"), "-d", conninfo,
                   "-D", str(standby.data), "-R", "-X", "stream", "-c", "fast", "--no-sync"]
        started = time.monotonic()
        with (standby.root / "basebackup.log").open("ab") as sink:
            result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                    timeout=120)
        if result.returncode != 0:
            raise AssertionError(f"pg_basebackup for {standby.label} failed:\n"
                                 + (standby.root / "basebackup.log").read_text(errors="replace"))
        self.timings[f"basebackup {standby.label}"] = time.monotonic() - started
        started = time.monotonic()
        standby.start()
        self.wait_for_streaming(standby)
        self.timings[f"start {standby.label}"] = time.monotonic() - started

    # -- replication -------------------------------------------------------------------

    def wait_for_streaming(self, standby: PgNode, timeout: float = 30.0) -> float:
        """Wait until the standby's WAL receiver streams from its upstream."""
        return wait_for(
            lambda: standby.query("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'")[0][0] == 1,
            timeout, f"{standby.label} to stream", interval=0.05)

    @contextmanager
    def replayed_database(self) -> Iterator[URL]:
        """A migrated database on the primary, handed over once every running standby
        has replayed it (dropped at the end)."""
        with self.primary.database() as url:
            for standby in self.standbys:
                self.wait_for_replay(standby)
            yield url

    def wait_for_replay(self, standby: PgNode, timeout: float = 10.0) -> float:
        """Wait until ``standby`` has replayed up to the primary's current WAL position;
        return the seconds it took (TimeoutError after ``timeout``, e.g. while paused)."""
        target = self.primary.query("SELECT pg_current_wal_lsn()")[0][0]
        return wait_for(
            lambda: bool(standby.query("SELECT coalesce(pg_last_wal_replay_lsn() >= %s::pg_lsn, false)",
                                       target)[0][0]),
            timeout, f"{standby.label} to replay up to {target}", interval=0.02)

    def pause_replay(self, standby: PgNode, timeout: float = 10.0) -> None:
        """Stop applying WAL on ``standby`` (it keeps receiving): reads there go stale."""
        standby.query("SELECT pg_wal_replay_pause()")
        wait_for(lambda: standby.query("SELECT pg_get_wal_replay_pause_state()")[0][0] == "paused",
                 timeout, f"{standby.label} replay to pause")

    def resume_replay(self, standby: PgNode) -> None:
        standby.query("SELECT pg_wal_replay_resume()")

    def set_standby_setting(self, standby: PgNode, name: str, value: Any) -> None:
        """ALTER SYSTEM + reload on a standby, e.g. ``recovery_min_apply_delay`` ('2s')
        for a lagging replica; ``value=None`` resets it."""
        if standby is self.primary:
            raise ValueError(f"{standby.label} is the primary")
        standby.set_setting(name, value)
        self._changed.setdefault(standby.label, set()).add(name)

    def reset(self) -> None:
        """Undo what a test may have left: start stopped nodes, resume replay, reset the
        settings changed with set_standby_setting. (A promotion cannot be undone: a test
        that promotes needs a topology of its own.)"""
        if self.primary is not self.nodes[0]:
            raise AssertionError("this topology was failed over: it cannot be reset")
        for node in self.nodes:
            if node.netns is not None and node.netns.partitioned:
                node.heal()
            if not node.running:
                node.start()
        for standby in self.standbys:
            for name in sorted(self._changed.pop(standby.label, set())):
                standby.set_setting(name, None)
            self.resume_replay(standby)
            self.wait_for_streaming(standby)

    # -- failover ----------------------------------------------------------------------

    def promote(self, standby: PgNode, timeout: float = 30.0) -> float:
        """``pg_ctl promote`` and wait until it accepts writes; return the seconds taken.
        The old primary is left as it is (running or not: stop it first for a failover)."""
        started = time.monotonic()
        standby._pg_ctl("-w", "-t", str(int(timeout)), "promote")
        wait_for(lambda: not standby.is_in_recovery(), timeout, f"{standby.label} to leave recovery")
        elapsed = time.monotonic() - started
        self.primary = standby
        self.timings[f"promote {standby.label}"] = elapsed
        return elapsed

    def follow(self, standby: PgNode, upstream: PgNode | None = None) -> None:
        """Re-point ``standby`` at ``upstream`` (default: the current primary), e.g. after
        a promotion; it follows the new timeline (recovery_target_timeline is 'latest')."""
        upstream = upstream or self.primary
        conninfo = make_conninfo(host=upstream.address_seen_from(standby), port=upstream.port, user="postgres",
                                 application_name=standby.label)
        standby.set_setting("primary_conninfo", conninfo)

    def stop(self, node: PgNode, mode: str = "fast") -> None:
        node.stop(mode)

    def start(self, node: PgNode) -> None:
        node.start()

    # -- URLs --------------------------------------------------------------------------

    def multihost_url(self, database: str = "postgres", nodes: Sequence[PgNode] | None = None,
                      target_session_attrs: str = "read-write", **query: str) -> URL:
        """One SQLAlchemy URL naming several nodes; libpq tries them in order and keeps
        the first that matches ``target_session_attrs`` (read-write: the primary)."""
        hosts = tuple(f"{node.address}:{node.port}" for node in (nodes or self.nodes))
        return URL.create("postgresql+psycopg", username="postgres", database=database,
                          query={"host": hosts, "target_session_attrs": target_session_attrs, **query})

    def multihost_conninfo(self, database: str = "postgres", nodes: Sequence[PgNode] | None = None,
                           target_session_attrs: str = "read-write", **params: Any) -> str:
        """The same as a libpq connection string, for psycopg.connect()."""
        chosen = nodes or self.nodes
        return make_conninfo(host=",".join(node.address for node in chosen),
                             port=",".join(str(node.port) for node in chosen), user="postgres",
                             dbname=database, target_session_attrs=target_session_attrs, **params)


def _initialize(node: PgNode, settings: dict[str, Any], networks: Collection[str]) -> None:
    node.install()  # initdb
    node.write_settings(settings)
    node.allow_networks(networks)


@contextmanager
def replicated_postgres(standbys: int = 1, netns_nodes: Collection[int] = (),
                        **primary_settings: Any) -> Iterator[ReplicatedPostgres]:
    """A PostgreSQL primary and ``standbys`` streaming standbys (pg_basebackup -R), each
    in its own temporary folder on its own port; all removed at the end.

    ``netns_nodes``: indices of the nodes (0 the primary, 1.. the standbys) that each get
    a network namespace of their own, so that a test can cut them off silently with
    ``node.partition()``. ``primary_settings`` are added to the primary's postgresql.conf,
    which the standbys inherit through the base backup.
    """
    count = standbys + 1
    if any(index not in range(count) for index in netns_nodes):
        raise ValueError(f"netns_nodes {sorted(netns_nodes)} are not among nodes 0..{standbys}")
    if 0 in netns_nodes and len(netns_nodes) > 1:
        raise ValueError("a standby in another namespace than its primary's cannot reach it")
    with ExitStack() as stack:
        namespaces = {index: stack.enter_context(network_namespace()) for index in sorted(netns_nodes)}
        networks = [str(namespace.network) for namespace in namespaces.values()]
        outer = [namespace.host_address for namespace in namespaces.values()]
        nodes = []
        for index in range(count):
            netns = namespaces.get(index)
            label = "primary" if index == 0 else f"standby{index}"
            nodes.append(stack.enter_context(postgres_node(label, netns, extra_listen=[] if netns else outer)))
        topology = ReplicatedPostgres(nodes)
        started = time.monotonic()
        _initialize(nodes[0], {**REPLICATION_SETTINGS, **primary_settings}, networks)
        nodes[0].start()
        topology.timings["initdb + start primary"] = time.monotonic() - started
        for standby in nodes[1:]:
            topology.clone(standby)
        yield topology


@contextmanager
def namespaced_postgres(**settings: Any) -> Iterator[PgNode]:
    """A throwaway PostgreSQL inside a network namespace of its own, listening on the
    namespace address: ``partition()`` cuts it off silently, ``heal()`` reconnects it."""
    with network_namespace() as netns, postgres_node("netns", netns) as node:
        _initialize(node, {"fsync": "off", **settings}, [str(netns.network)])
        node.start()
        yield node
