"""A throwaway high-availability PostgreSQL stack on loopback: etcd, two Patroni nodes and
HAProxy (issue 19, point 4), Debian's programs as production sites run them.

Why: the failover scenarios of tests/faults/test_failover.py promote a standby by hand.
Production sites let Patroni do it: it holds a leader key in etcd, promotes a replica
when the key expires or the leader's PostgreSQL dies, and rejoins the old leader with
``pg_rewind``; HAProxy sends the write port to whichever node Patroni's REST API calls
the primary. Tests must see that machinery, its timings and its gaps, for real.

What is started, every port from ``free_port()``, every file in temporary folders:

- one etcd member (3.4: the v3 API; Patroni's ``etcd3:`` section speaks its JSON gateway);
- two Patroni nodes, ``node1`` and ``node2``, each running its own PostgreSQL in a
  :class:`~tests.topology.postgres.PgNode` folder (Patroni calls initdb on node1 and
  ``pg_basebackup`` on node2), as the ``postgres`` user (Patroni refuses root);
- HAProxy, as root in the foreground: a write port to the node whose ``OPTIONS /primary``
  answers 200 and a read port to the nodes whose ``/replica`` does.

Settings that matter, in the cluster's dynamic configuration (etcd):

- ``ttl`` 10, ``loop_wait`` 2, ``retry_timeout`` 3 (Patroni wants ttl >= loop_wait +
  2 * retry_timeout): a leader that stops renewing its key loses it within 10 s.
- ``synchronous_mode``: the leader commits only once the replica has the WAL, and Patroni
  promotes only the node named in its ``/sync`` key. Chosen because issue 19 wants 0
  acknowledged writes lost after a failover: with asynchronous replication a commit
  acknowledged just before the leader dies may never reach the replica that takes over.
  Not strict: with the replica gone the leader drops it from synchronous_standby_names
  and keeps taking writes (the site stays writable on one node).
- ``primary_start_timeout`` 0: when the leader's PostgreSQL dies, Patroni fails over at
  once instead of restarting it in place. Its default (300 s) restarts a crashed primary
  on the same node, so that killing PostgreSQL would never make a new leader.
- ``use_pg_rewind`` with ``wal_log_hints`` (from REPLICATION_SETTINGS): a demoted or
  crashed leader rejoins as a replica without a new base backup.

HAProxy checks every :data:`CHECK_INTERVAL`, marks a node down after ``fall 2`` and up
after ``rise 1``, and ``on-marked-down shutdown-sessions`` resets the client connections
of a node marked down, so that a client sees an error rather than a hang. ``retries 0``
(:data:`RETRIES`): a node that refuses (its PostgreSQL dead, not yet marked down) closes
the client's connection at once. HAProxy's default, 3 retries each after up to 1 s, holds
every new client for longer than the app's connect timeout instead (scenario 19d measured
what that costs: tests/faults/test_patroni.py).

Seen with Debian 12's Patroni 3.0.2, etcd 3.4.23 and HAProxy 2.6.12, which a scenario
on this stack has to allow for:

- A leader whose PostgreSQL died keeps its key, and its REST API keeps answering
  ``/primary`` 200, until its next loop (up to ``loop_wait``) notices; HAProxy keeps
  that dead node in the write listener until then plus ``fall`` checks. The replica
  answers ``/replica`` 200 until it is promoted, so for a moment after a switchover
  or failover the read port may reach the new leader.
- While the old leader rewinds there is no replica: the read port refuses every client.
- A crashed leader with WAL its replica never got is first started as a standby as it
  is (its unacknowledged commit readable there), and only on Patroni's next loop
  stopped, rewound and started again: reads on it in that window can see a write that
  pg_rewind then takes away. With no such WAL (nothing in flight) no rewind is needed.

Everything is stopped by PID (``runuser`` forks: the Patroni PID is its child's, read
from /proc) and removed at the end, whatever happens: Patroni first (it stops its
PostgreSQL), then any postmaster left, by the PID in its postmaster.pid.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import requests
from sqlalchemy.engine import URL

from tests.support.network import free_port
from tests.support.servers import START_TIMEOUT, chown_to, run_as

from .netns import wait_for
from .postgres import REPLICATION_SETTINGS, PgNode, ReplicatedPostgres, postgres_node

PATRONI = "/usr/bin/patroni"
PATRONICTL = "/usr/bin/patronictl"
ETCD = "/usr/bin/etcd"
HAPROXY = "/usr/sbin/haproxy"

TTL, LOOP_WAIT, RETRY_TIMEOUT = 10, 2, 3
CHECK_INTERVAL = "500ms"  # HAProxy's health check period (fall 2, rise 1)
RETRIES: int | None = 0  # HAProxy's retries of a refused server connection (None: its default, 3)
STOP_TIMEOUT = 30.0
NAMES = ("node1", "node2")
NAMESPACE = "/myapp/"  # Patroni's keys in etcd: NAMESPACE + scope + "/leader", "/initialize", ...


def _stop_process(process: subprocess.Popen[bytes] | None, pid: int | None = None,
                  timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM to ``pid`` (default: the Popen's own), wait for ``process`` to exit, then
    SIGKILL. Only PIDs this module started are ever signalled."""
    if process is None or process.poll() is not None:
        return
    target = pid if pid is not None else process.pid
    try:
        os.kill(target, signal.SIGTERM)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for victim in {target, process.pid}:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(timeout=10)


def _parents() -> dict[int, int]:
    """Every process's parent, by PID, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def _child_pid(parent: int) -> int | None:
    """The PID of ``parent``'s only child (runuser forks the command it runs)."""
    return next((pid for pid, ppid in _parents().items() if ppid == parent), None)


def _descendants(root: int) -> list[int]:
    """``root`` and every process under it, parents before children."""
    parents = _parents()
    found = [root]
    for pid in found:
        found += [child for child, ppid in parents.items() if ppid == pid]
    return found


# -- etcd --------------------------------------------------------------------------------------


class Etcd:
    """One etcd member on loopback, its data in ``root``/etcd."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "etcd"
        self.log = root / "etcd.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def healthy(self) -> bool:
        try:
            return bool(requests.get(f"{self.client_url}/health", timeout=1).json().get("health") == "true")
        except (requests.RequestException, ValueError):
            return False

    def get(self, key: str) -> str | None:
        """A key's value, read through etcd's v3 JSON gateway (keys and values in base64)."""
        encoded = base64.b64encode(key.encode()).decode()
        answer = requests.post(f"{self.client_url}/v3/kv/range", json={"key": encoded}, timeout=2).json()
        kvs = answer.get("kvs") or []
        return base64.b64decode(kvs[0].get("value", "")).decode() if kvs else None

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        command = [ETCD, "--name", "etcd1", "--data-dir", str(self.data),
                   "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
                   "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                   "--initial-cluster", f"etcd1={peer}", "--initial-cluster-state", "new",
                   "--initial-cluster-token", f"myapp-{secrets.token_hex(4)}"]
        with self.log.open("ab") as sink:  # a file, never a pipe
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=sink,
                                            stderr=subprocess.STDOUT, cwd=self.root)
        process = self.process
        try:
            wait_for(lambda: process.poll() is not None or self.healthy(), START_TIMEOUT, "etcd to be healthy",
                     interval=0.1)
        except TimeoutError:
            raise AssertionError(f"etcd did not start:\n{self.log_tail()}") from None
        if process.poll() is not None:
            raise AssertionError(f"etcd exited with {process.returncode}:\n{self.log_tail()}")

    def stop(self) -> None:
        _stop_process(self.process)

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


# -- Patroni nodes -----------------------------------------------------------------------------


class PatroniNode:
    """One Patroni daemon and the PostgreSQL it runs. ``pg`` is that PostgreSQL's
    :class:`PgNode` (folder, port, Unix-socket queries, postmaster PID): never started
    with pg_ctl here, Patroni starts and stops it."""

    def __init__(self, name: str, pg: PgNode) -> None:
        self.name = name
        self.pg = pg
        self.rest_port = free_port()
        self.config = pg.root / "patroni.yml"
        self.log = pg.root / "patroni.log"
        self.process: subprocess.Popen[bytes] | None = None  # runuser, or Patroni when not root
        self.frozen: list[int] = []  # PIDs SIGSTOPped by freeze(), until thaw()

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def url(self, database: str = "postgres") -> URL:
        """Straight to this node's PostgreSQL over TCP, whatever its role."""
        return self.pg.url(database)

    def write_config(self, scope: str, etcd: Etcd) -> None:
        """patroni.yml (JSON, which YAML reads as it is). The ``bootstrap.dcs`` part is
        written to etcd by the node that initializes the cluster."""
        pg = self.pg
        trust = ["local all all trust", "host all all 127.0.0.1/32 trust",
                 "host replication all 127.0.0.1/32 trust"]
        config: dict[str, Any] = {
            "scope": scope,
            "namespace": NAMESPACE,
            "name": self.name,
            "restapi": {"listen": f"127.0.0.1:{self.rest_port}", "connect_address": f"127.0.0.1:{self.rest_port}"},
            "etcd3": {"hosts": [f"127.0.0.1:{etcd.client_port}"]},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL, "loop_wait": LOOP_WAIT, "retry_timeout": RETRY_TIMEOUT,
                    "maximum_lag_on_failover": 1024 * 1024,
                    "primary_start_timeout": 0,
                    "synchronous_mode": True,
                    "postgresql": {"use_pg_rewind": True, "use_slots": True,
                                   "parameters": dict(REPLICATION_SETTINGS)},
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{pg.port}",
                "connect_address": f"127.0.0.1:{pg.port}",
                "data_dir": str(pg.data),
                "bin_dir": str(pg.bin),
                "pgpass": str(pg.root / "pgpass"),  # not the postgres user's ~/.pgpass
                "authentication": {"superuser": {"username": "postgres"},
                                   "replication": {"username": "replicator"},
                                   "rewind": {"username": "postgres"}},
                "parameters": {"unix_socket_directories": str(pg.root)},
                "pg_hba": trust,
                "basebackup": [{"checkpoint": "fast"}, "no-sync"],
            },
            "watchdog": {"mode": "off"},
        }
        self.config.write_text(json.dumps(config, indent=1))
        chown_to(self.config, pg.user)

    # -- the Patroni process -----------------------------------------------------------------

    def start(self) -> None:
        """Start Patroni (as the postgres user); it starts or bootstraps PostgreSQL itself."""
        if self.patroni_running():
            return
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen([*run_as(self.pg.user), PATRONI, str(self.config)],
                                            stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                            cwd=self.pg.root)

    @property
    def patroni_pid(self) -> int | None:
        """Patroni's own PID (under root, the child of runuser); None when it is not running."""
        if self.process is None or self.process.poll() is not None:
            return None
        return _child_pid(self.process.pid) if run_as(self.pg.user) else self.process.pid

    def patroni_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM to Patroni: it stops its PostgreSQL (a leader gives up its key) and exits."""
        _stop_process(self.process, self.patroni_pid, timeout)

    def freeze(self) -> None:
        """SIGSTOP to Patroni and every process under it (its PostgreSQL's): the node
        goes silent as a paused VM does. Patroni first, so that it sees nothing."""
        root = self.patroni_pid
        if root is None:
            raise AssertionError(f"{self.name}: Patroni is not running")
        for pid in _descendants(root):
            os.kill(pid, signal.SIGSTOP)
            self.frozen.append(pid)

    def thaw(self) -> None:
        """SIGCONT to what freeze() stopped."""
        while self.frozen:
            try:
                os.kill(self.frozen.pop(), signal.SIGCONT)
            except ProcessLookupError:
                pass

    def kill_postgres(self) -> int:
        """SIGKILL to the postmaster (the PID in postmaster.pid); returns that PID."""
        pid = self.pg.pid
        if pid is None:
            raise AssertionError(f"{self.name}: PostgreSQL is not running")
        os.kill(pid, signal.SIGKILL)
        return pid

    # -- observing ---------------------------------------------------------------------------

    def rest(self, path: str) -> Any:
        """GET ``path`` of the node's REST API, as JSON (it answers 503 with a body too)."""
        return requests.get(self.rest_url + path, timeout=2).json()

    def check(self, path: str) -> int | None:
        """The status HAProxy's check sees: ``OPTIONS path`` (e.g. /primary, /replica)."""
        try:
            return requests.options(self.rest_url + path, timeout=2).status_code
        except requests.RequestException:
            return None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def logged(self, text: str) -> int:
        """How many lines of this node's log (Patroni's and its PostgreSQL's) hold ``text``."""
        return self.log.read_text(errors="replace").count(text) if self.log.exists() else 0


# -- HAProxy -----------------------------------------------------------------------------------


class HAProxy:
    """HAProxy in the foreground (``-db``), a write listener and a read listener."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "haproxy.cfg"
        self.socket = root / "haproxy.sock"
        self.log = root / "haproxy.log"
        self.write_port = free_port()
        self.read_port = free_port()
        self.retries = RETRIES
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self, nodes: list[PatroniNode]) -> None:
        def listener(name: str, port: int, check: str) -> list[str]:
            return [
                f"listen {name}",
                f"    bind 127.0.0.1:{port}",
                "    balance roundrobin",
                *([f"    retries {self.retries}"] if self.retries is not None else []),
                f"    option httpchk OPTIONS {check}",
                "    http-check expect status 200",
                f"    default-server inter {CHECK_INTERVAL} fall 2 rise 1 on-marked-down shutdown-sessions",
                *(f"    server {node.name} 127.0.0.1:{node.pg.port} check port {node.rest_port}" for node in nodes),
                "",
            ]

        self.config.write_text("\n".join([
            "global",
            "    maxconn 512",
            f"    stats socket {self.socket} mode 600 level admin",
            "",
            "defaults",
            "    mode tcp",
            "    timeout connect 2s",
            "    timeout check 1s",
            "    timeout client 1h",
            "    timeout server 1h",
            "",
            *listener("write", self.write_port, "/primary"),
            *listener("read", self.read_port, "/replica"),
        ]))

    def start(self) -> None:
        check = subprocess.run([HAPROXY, "-c", "-q", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise AssertionError(f"haproxy -c refused {self.config}:\n{check.stdout}{check.stderr}")
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                                            stdout=sink, stderr=subprocess.STDOUT, cwd=self.root)
        wait_for(lambda: self.socket.exists() or self.process is None or self.process.poll() is not None,
                 START_TIMEOUT, "haproxy's stats socket")
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.process.returncode}:\n{self.log.read_text()}")

    def stop(self) -> None:
        _stop_process(self.process)

    def restart(self, nodes: list[PatroniNode]) -> None:
        """Stop, write the configuration again (after a change to ``retries``, say) and
        start, on the same ports; every client connection is cut."""
        self.stop()
        self.socket.unlink(missing_ok=True)
        self.write_config(nodes)
        self.start()

    def servers_up(self, listener: str) -> list[str]:
        """The servers of ``listener`` ("write" or "read") that HAProxy sends clients to now."""
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(2)
            client.connect(str(self.socket))
            client.sendall(b"show stat\n")
            chunks = []
            while chunk := client.recv(65536):
                chunks.append(chunk)
        lines = b"".join(chunks).decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
        return sorted(row["svname"] for row in rows
                      if row["pxname"] == listener and row["svname"] not in ("FRONTEND", "BACKEND")
                      and row["status"].startswith("UP"))


# -- the stack ---------------------------------------------------------------------------------


class PatroniCluster:
    """etcd, the Patroni nodes and HAProxy; see the module's docstring. Use
    :func:`patroni_cluster`, which stops and removes everything."""

    def __init__(self, root: Path, etcd: Etcd, nodes: list[PatroniNode], haproxy: HAProxy, scope: str) -> None:
        self.root = root
        self.etcd = etcd
        self.nodes = nodes
        self.haproxy = haproxy
        self.scope = scope
        self.timings: dict[str, float] = {}  # measured seconds, e.g. "start"

    def node(self, name: str) -> PatroniNode:
        return next(node for node in self.nodes if node.name == name)

    # -- URLs --------------------------------------------------------------------------------

    def write_url(self, database: str = "postgres") -> URL:
        """HAProxy's write port: the leader, whichever node that is."""
        return URL.create("postgresql+psycopg", username="postgres", host="127.0.0.1",
                          port=self.haproxy.write_port, database=database)

    def read_url(self, database: str = "postgres") -> URL:
        """HAProxy's read port: the streaming replicas, round robin."""
        return URL.create("postgresql+psycopg", username="postgres", host="127.0.0.1",
                          port=self.haproxy.read_port, database=database)

    def node_url(self, name: str, database: str = "postgres") -> URL:
        """Straight to one node's PostgreSQL, whatever its role."""
        return self.node(name).url(database)

    def multihost_url(self, database: str = "postgres", target_session_attrs: str = "read-write",
                      **query: str) -> URL:
        """One URL naming every node in a fixed order (node1 first), as the failover
        scenarios build it: libpq keeps the first that is read-write."""
        return self._replication().multihost_url(database, nodes=[node.pg for node in self.nodes],
                                                 target_session_attrs=target_session_attrs, **query)

    def _replication(self, leader: str | None = None) -> ReplicatedPostgres:
        """The nodes as a :class:`ReplicatedPostgres`, ``leader`` first (its primary): for
        its URLs and its waits on replay. Never for its promote or follow: Patroni does those."""
        ordered = sorted(self.nodes, key=lambda node: node.name != leader)
        return ReplicatedPostgres([node.pg for node in ordered])

    # -- state, from Patroni's REST API ------------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        """``GET /cluster`` from the first node whose Patroni answers: each member's
        name, role (leader, sync_standby, replica), state, host, port, timeline, lag."""
        for node in self.nodes:
            if not node.patroni_running():
                continue
            try:
                return list(node.rest("/cluster")["members"])
            except (requests.RequestException, ValueError, KeyError):
                continue
        return []

    def leader(self) -> str | None:
        """The name of the node holding the leader key, and running, or None."""
        for member in self.members():
            if member["role"] == "leader" and member.get("state") == "running":
                return str(member["name"])
        return None

    def replicas(self) -> list[str]:
        return sorted(str(member["name"]) for member in self.members() if member["role"] != "leader")

    def wait_for_leader(self, timeout: float = 30.0, other_than: str | None = None) -> str:
        """Wait until a node (not ``other_than``) is the running leader and its PostgreSQL
        takes writes; return its name."""
        found: list[str] = []

        def elected() -> bool:
            name = self.leader()
            if name is None or name == other_than:
                return False
            try:
                writable = not self.node(name).pg.is_in_recovery()
            except Exception:  # starting, or promoting
                return False
            found[:] = [name]
            return writable

        wait_for(elected, timeout, f"a leader{' other than ' + other_than if other_than else ''}", interval=0.1)
        return found[0]

    def _replica_streams(self, node: PatroniNode) -> bool:
        if not node.patroni_running():
            return False
        states = {member["name"]: member for member in self.members()}
        member = states.get(node.name)
        if member is None or member["role"] != "sync_standby" or member.get("state") != "running":
            return False
        try:
            return bool(node.pg.query("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'")[0][0] == 1)
        except Exception:
            return False

    def wait_for_replica_streaming(self, timeout: float = 60.0) -> float:
        """Wait until there is a leader and every other node streams from it as its
        synchronous standby; return the seconds it took."""
        started = time.monotonic()
        leader = self.wait_for_leader(timeout)
        others = [node for node in self.nodes if node.name != leader]
        wait_for(lambda: all(self._replica_streams(node) for node in others),
                 max(0.0, timeout - (time.monotonic() - started)), "every replica to stream synchronously",
                 interval=0.1)
        return time.monotonic() - started

    def wait_for_replay(self, timeout: float = 10.0) -> float:
        """Wait until every replica has replayed up to the leader's current WAL position."""
        started = time.monotonic()
        replication = self._replication(self.wait_for_leader(timeout))
        for standby in replication.standbys:
            replication.wait_for_replay(standby, timeout)
        return time.monotonic() - started

    def routes(self) -> dict[str, list[str]]:
        """The nodes HAProxy sends each port to now: {"write": [...], "read": [...]}."""
        return {listener: self.haproxy.servers_up(listener) for listener in ("write", "read")}

    def wait_for_routes(self, timeout: float = 20.0) -> float:
        """Wait until HAProxy sends the write port to the leader alone and the read port
        to every replica; return the seconds it took."""
        def settled() -> bool:
            leader = self.leader()
            return leader is not None and self.routes() == {"write": [leader], "read": self.replicas()}

        return wait_for(settled, timeout, "HAProxy's routes to follow the cluster", interval=0.1)

    # -- operations --------------------------------------------------------------------------

    def patronictl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``patronictl -c <node1's patroni.yml> ARGS`` (a client of etcd and the REST
        API: it may run as root); its output. AssertionError when it fails."""
        result = subprocess.run([PATRONICTL, "-c", str(self.nodes[0].config), *args], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"patronictl {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}{result.stderr}")
        return result.stdout

    def listing(self) -> list[dict[str, Any]]:
        """``patronictl list -f json``: Member, Host, Role, State, TL, Lag in MB."""
        return list(json.loads(self.patronictl("list", "-f", "json")))

    def switchover(self, candidate: str, timeout: float = 30.0) -> float:
        """``patronictl switchover --leader A --candidate B --force``, then wait until the
        candidate is the leader and HAProxy's write port reaches it; return the seconds
        from the command's start."""
        leader = self.wait_for_leader(timeout)
        if candidate == leader:
            raise ValueError(f"{candidate} is already the leader")
        started = time.monotonic()
        self.patronictl("switchover", "--leader", leader, "--candidate", candidate, "--force")
        self.wait_for_leader(timeout, other_than=leader)
        self.wait_until_write_port_reaches(candidate, max(1.0, timeout - (time.monotonic() - started)))
        return time.monotonic() - started

    def kill_leader_postgres(self, in_flight: str | None = None, database: str = "postgres") -> tuple[str, float]:
        """SIGKILL the leader's postmaster, by the PID in its postmaster.pid; Patroni
        (primary_start_timeout 0) fails over. Returns the old leader's name and the
        monotonic time of the kill.

        ``in_flight``: a statement to leave in flight on the leader, so that it dies with
        WAL its replicas never got (the commit record of a write no client saw
        acknowledged). Its WAL senders are stopped (SIGSTOP) first, the statement runs
        on the leader (in ``database``, autocommit) until its commit waits for the
        synchronous standby, then the postmaster and the stopped senders are killed.
        The timelines diverge: the old leader needs pg_rewind to rejoin."""
        leader = self.node(self.wait_for_leader())
        if in_flight is None:
            leader.kill_postgres()
            return leader.name, time.monotonic()
        senders = [int(pid) for (pid,) in leader.pg.query("SELECT pid FROM pg_stat_replication")]
        if not senders:
            raise AssertionError(f"{leader.name} has no WAL sender")
        for pid in senders:
            os.kill(pid, signal.SIGSTOP)
        try:
            writer = _InFlight(leader.pg.conninfo(database), in_flight)
            wait_for(lambda: writer.done or leader.pg.query(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")[0][0] > 0,
                10, f"the commit on {leader.name} to wait for its synchronous standby")
            if writer.done:
                raise AssertionError(f"the in-flight statement ended before the kill: {writer.error!r}")
            leader.kill_postgres()
            killed_at = time.monotonic()
        finally:
            for pid in senders:  # killed: a continued sender would still send the commit
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        writer.thread.join(10)
        if writer.error is None:
            raise AssertionError("the in-flight statement was acknowledged: it was not in flight")
        return leader.name, killed_at

    def freeze_leader(self) -> tuple[str, float]:
        """Freeze the leader's whole node (PatroniNode.freeze): it stops renewing its
        key, which expires after ``ttl``; then the replica is elected. Returns the old
        leader's name and the monotonic time of the freeze. heal() thaws it."""
        leader = self.node(self.wait_for_leader())
        leader.freeze()
        return leader.name, time.monotonic()

    def write_port_server(self) -> int | None:
        """The port of the PostgreSQL that answers on HAProxy's write port now, if it is
        writable; None when no connection or no writable server. (libpq's connect_timeout
        is at least 2 s: a probe that lands on a dead server can take that long.)"""
        import psycopg

        try:
            with psycopg.connect(host="127.0.0.1", port=self.haproxy.write_port, user="postgres", dbname="postgres",
                                 connect_timeout=2, autocommit=True) as connection:
                port, in_recovery = connection.execute(
                    "SELECT inet_server_port(), pg_is_in_recovery()").fetchone() or (None, True)
                return None if in_recovery else int(port)
        except psycopg.Error:
            return None

    def wait_until_write_port_reaches(self, name: str, timeout: float = 30.0) -> float:
        """Wait until HAProxy's write listener has ``name`` alone up (its stats socket,
        polled every 50 ms), and a new connection to the write port lands on ``name``'s
        PostgreSQL, writable; return the seconds it took."""
        started = time.monotonic()
        wait_for(lambda: self.haproxy.servers_up("write") == [name], timeout, f"HAProxy's write listener to {name}")
        port = self.node(name).pg.port
        wait_for(lambda: self.write_port_server() == port, max(1.0, timeout - (time.monotonic() - started)),
                 f"the write port to reach {name}", interval=0.05)
        return time.monotonic() - started

    def heal(self, timeout: float = 60.0) -> None:
        """Undo what a test left: every Patroni running again (it restarts, rewinds or
        reclones its PostgreSQL as needed), one leader, every other node streaming
        synchronously, HAProxy's routes settled. The leader may be either node."""
        for service in (self.etcd, self.haproxy):
            if service.process is None or service.process.poll() is not None:
                raise AssertionError(f"{type(service).__name__} is down: a test stopped it")
        for node in self.nodes:
            if node.frozen:
                # A Patroni thawed mid-loop acts on its stale state: seen once taking the
                # leader key back and looping on "Synchronous replication key updated by
                # someone else". A fresh one demotes (and rewinds) the node cleanly.
                node.thaw()
                node.stop()
            if not node.patroni_running():
                node.start()
        try:
            self.wait_for_replica_streaming(timeout)
        except TimeoutError as error:
            raise AssertionError(f"{error}\n{self.story()}") from None
        self.wait_for_routes(timeout)

    @contextmanager
    def database(self, migrated: bool = True) -> Iterator[str]:
        """A new database created through the leader, migrated to head when
        ``migrated``, and replayed on every replica (a synchronous commit is flushed
        there, not yet replayed) before it is handed over; dropped at the end through
        whichever node leads then."""
        name = f"patroni_{secrets.token_hex(4)}"
        self.node(self.wait_for_leader()).pg.query(f"CREATE DATABASE {name}")
        try:
            if migrated:
                from tests.support.apps import migrate

                migrate(self.write_url(name))
            self.wait_for_replay()
            yield name
        finally:
            leader = self.leader()
            if leader is not None:
                self.node(leader).pg.query(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def story(self, lines: int = 40) -> str:
        """What each part logged lately: for a failing test's message."""
        parts = [f"--- {node.name}:\n{node.log_tail(lines)}" for node in self.nodes]
        parts.append(f"--- etcd:\n{self.etcd.log_tail(10)}")
        return "\n".join(parts)


class _InFlight:
    """A statement run in a daemon thread (autocommit), so that a commit waiting for a
    synchronous standby cannot hang the caller; ``error`` is what ended it."""

    def __init__(self, conninfo: str, statement: str) -> None:
        self.error: BaseException | None = None
        self.done = False
        self.thread = threading.Thread(target=self._run, args=(conninfo, statement), daemon=True)
        self.thread.start()

    def _run(self, conninfo: str, statement: str) -> None:
        import psycopg

        try:
            with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as connection:
                connection.execute(statement.encode())
        except BaseException as error:  # reported to the caller, not to the thread hook
            self.error = error
        finally:
            self.done = True


def _start_on_a_free_rest_port(node: PatroniNode, cluster: PatroniCluster, attempts: int = 3) -> None:
    """Start ``node``'s Patroni and wait until its REST API answers. Seen in CI: the
    port picked for it was taken by the time Patroni bound it ("Address already in
    use"), and the node never started; then it gets a new port (HAProxy's checks too)."""
    for _ in range(attempts):
        node.start()
        answered = wait_for(lambda: node.check("/health") is not None or not node.patroni_running(),
                            START_TIMEOUT, f"{node.name}'s REST API", interval=0.1)
        if node.patroni_running():
            return
        if "Address already in use" not in node.log_tail(40):
            raise AssertionError(f"{node.name}'s Patroni exited after {answered:.1f} s:\n{node.log_tail(40)}")
        node.rest_port = free_port()
        node.write_config(cluster.scope, cluster.etcd)
        cluster.haproxy.restart(cluster.nodes)
    raise AssertionError(f"{node.name}'s Patroni found no free REST port in {attempts} attempts")


def _stop_leader_last(nodes: list[PatroniNode]) -> None:
    """Stop the replicas' Patroni first, then the leader's: no failover on the way out."""
    for node in nodes:
        node.thaw()  # a frozen process would only die of the SIGKILL after the stop timeout
    for node in sorted(nodes, key=lambda node: node.check("/primary") == 200):
        node.stop()


@contextmanager
def patroni_cluster() -> Iterator[PatroniCluster]:
    """Start etcd, node1 (which bootstraps the cluster and leads), node2 (cloned from it
    by Patroni's pg_basebackup, then a synchronous replica) and HAProxy; wait until the
    routes are settled. Stop every process by PID and remove every folder at the end."""
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="myapp-patroni-"))
    root.chmod(0o755)
    etcd, haproxy = Etcd(root), HAProxy(root)
    nodes: list[PatroniNode] = []
    try:
        with ExitStack() as stack:
            # Registered first, so they run last: each PostgreSQL folder's own cleanup
            # (ensure_stopped on any postmaster left, then removal) runs after Patroni's stop.
            for name in NAMES:
                nodes.append(PatroniNode(name, stack.enter_context(postgres_node(name))))
            stack.callback(etcd.stop)
            stack.callback(_stop_leader_last, nodes)
            stack.callback(haproxy.stop)

            scope = f"myapp-{secrets.token_hex(3)}"
            cluster = PatroniCluster(root, etcd, nodes, haproxy, scope)
            etcd.start()
            cluster.timings["etcd"] = time.monotonic() - started
            for node in nodes:
                node.write_config(scope, etcd)
            haproxy.write_config(nodes)
            haproxy.start()
            try:
                # node1 alone until it holds the initialize key: it bootstraps (initdb) and
                # leads; the others then wait for it and clone it.
                _start_on_a_free_rest_port(nodes[0], cluster)
                wait_for(lambda: etcd.get(f"{NAMESPACE}{scope}/initialize") is not None, START_TIMEOUT,
                         "node1 to take the initialize key", interval=0.1)
                for node in nodes[1:]:
                    _start_on_a_free_rest_port(node, cluster)
                cluster.wait_for_leader(START_TIMEOUT * 2)
                cluster.timings["node1 leader"] = time.monotonic() - started
                cluster.wait_for_replica_streaming(START_TIMEOUT * 2)
                cluster.timings["node2 streaming"] = time.monotonic() - started
                cluster.wait_for_routes()
            except (AssertionError, TimeoutError) as error:
                raise AssertionError(f"the Patroni stack did not come up: {error}\n{cluster.story()}") from error
            cluster.timings["start"] = time.monotonic() - started
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # a quick look: python -m tests.topology.patroni
    with patroni_cluster() as stack:
        print({name: round(seconds, 2) for name, seconds in stack.timings.items()})
        print(stack.listing())
        print(stack.routes())
