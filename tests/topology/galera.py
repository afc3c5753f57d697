"""A throwaway three-node MariaDB Galera cluster on loopback ports.

Galera's own replication (Debian's galera-4 provider), nothing imitated: node 1
bootstraps the cluster with ``--wsrep-new-cluster``, nodes 2 and 3 join it and get
their data by rsync SST. Nodes on one host would clash, so each has its own
``--defaults-file``, data folder, client port, group port (``base_port``), IST port
and SST port. mariadbd runs as ``mysql``: as root, the joiner's rsync daemon drops to
``nobody`` and cannot write the data folder.

Faults a test can make: ``isolate()`` cuts a node off the group (Galera's
``gmcast.isolate``: it stays reachable by clients and turns non-Primary), ``kill()``
and ``start()`` for a crash and a rejoin (IST after ``--wsrep-recover``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pymysql
from sqlalchemy.engine import URL

from tests.support.network import free_port
from tests.support.servers import MariaDBServer, chown_to

PROVIDER = "/usr/lib/galera/libgalera_smm.so"
JOIN_TIMEOUT = 90.0


class GaleraNode(MariaDBServer):
    def __init__(self, root: Path, number: int) -> None:
        super().__init__(root)
        self.number = number
        self.name_in_cluster = f"node{number}"
        self.group_port = free_port()
        self.ist_port = free_port()
        self.sst_port = free_port()
        self.config = root / "my.cnf"
        self.cluster_address = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def write_config(self, members: list[GaleraNode]) -> None:
        self.cluster_address = "gcomm://" + ",".join(f"127.0.0.1:{node.group_port}" for node in members)
        provider_options = ";".join([
            f"base_port={self.group_port}",
            f"gmcast.listen_addr=tcp://127.0.0.1:{self.group_port}",
            f"ist.recv_addr=127.0.0.1:{self.ist_port}",
            # Galera's default failure detection (a member silent for 5 s is suspected):
            # shorter timeouts split the cluster when two busy cores starve a node.
            "gcache.size=64M",
        ])
        self.config.write_text("\n".join([
            "[mysqld]",
            f"datadir={self.data}",
            f"socket={self.socket}",
            f"port={self.port}",
            "bind-address=127.0.0.1",
            f"pid-file={self.pid_file}",
            f"log-error={self.log}",
            "skip-name-resolve",
            "skip-log-bin",
            "innodb-buffer-pool-size=32M",
            "innodb-flush-log-at-trx-commit=2",
            "innodb-autoinc-lock-mode=2",
            "binlog-format=ROW",
            "default-storage-engine=InnoDB",
            f"user={self.user}",
            "wsrep-on=ON",
            f"wsrep-provider={PROVIDER}",
            "wsrep-cluster-name=myapp-test",
            f"wsrep-cluster-address={self.cluster_address}",
            f"wsrep-node-name={self.name_in_cluster}",
            "wsrep-node-address=127.0.0.1",
            f"wsrep-node-incoming-address=127.0.0.1:{self.port}",
            f"wsrep-sst-receive-address=127.0.0.1:{self.sst_port}",
            "wsrep-sst-method=rsync",
            f'wsrep-provider-options="{provider_options}"',
            "wsrep-slave-threads=2",
            "",
        ]))
        chown_to(self.config, self.user)

    def install(self) -> None:
        with (self.root / "install.log").open("ab") as sink:
            subprocess.run(
                ["mariadb-install-db", f"--defaults-file={self.config}", f"--user={self.user}",
                 "--auth-root-authentication-method=normal", "--skip-test-db", "--wsrep-on=OFF"],
                stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, check=True, timeout=120,
            )

    def start(self, *, bootstrap: bool = False) -> None:
        self.data.mkdir(exist_ok=True)
        chown_to(self.data, self.user)
        command = [shutil.which("mariadbd") or "/usr/sbin/mariadbd", f"--defaults-file={self.config}"]
        if bootstrap:
            command.append("--wsrep-new-cluster")
        else:
            position = self._recovered_position()
            if position:
                command.append(f"--wsrep-start-position={position}")
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.wait_until_synced()

    def _recovered_position(self) -> str | None:
        """After a crash, the last committed position (``--wsrep-recover``), so that the
        node rejoins by IST instead of a full SST."""
        if not (self.data / "ibdata1").exists():
            return None
        recover_log = self.root / "recover.log"
        subprocess.run(
            [shutil.which("mariadbd") or "/usr/sbin/mariadbd", f"--defaults-file={self.config}",
             "--wsrep-recover", f"--log-error={recover_log}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
        )
        for line in reversed(recover_log.read_text(errors="replace").splitlines()):
            if "Recovered position:" in line:
                return line.rsplit("Recovered position:", 1)[1].strip()
        return None

    def kill(self) -> None:
        """A crash: SIGKILL, no goodbye to clients or to the group."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    # -- observing -------------------------------------------------------------------

    def status(self, name: str) -> str | None:
        rows = self.query("SHOW GLOBAL STATUS LIKE %s", name)
        return str(rows[0][1]) if rows else None

    def state(self) -> str:
        """``wsrep_local_state_comment``, or "down" when the node does not answer."""
        try:
            return self.status("wsrep_local_state_comment") or "unknown"
        except pymysql.MySQLError:
            return "down"

    def is_synced_in_primary(self) -> bool:
        try:
            return (self.status("wsrep_local_state_comment") == "Synced"
                    and self.status("wsrep_cluster_status") == "Primary"
                    and self.status("wsrep_ready") == "ON")
        except pymysql.MySQLError:
            return False

    def wait_until_synced(self, timeout: float = JOIN_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process_exited():
                break
            if self.socket.exists() and self.is_synced_in_primary():
                return
            time.sleep(0.2)
        raise AssertionError(f"{self.name_in_cluster} did not join the cluster in {timeout} s:\n{self.log_tail()}")

    def log_tail_all(self) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()[-2000:]
        except OSError:
            return []

    def isolate(self) -> None:
        """Cut the node off the group: it stays up for clients and goes non-Primary."""
        self.query("SET GLOBAL wsrep_provider_options = 'gmcast.isolate=1'")

    def rejoin(self) -> None:
        self.query("SET GLOBAL wsrep_provider_options = 'gmcast.isolate=0'")

    def url(self, database: str) -> URL:
        return URL.create("mysql+pymysql", username="root", host="127.0.0.1", port=self.port, database=database)


class GaleraCluster:
    def __init__(self, nodes: list[GaleraNode]) -> None:
        self.nodes = nodes

    def url(self, database: str, *nodes: GaleraNode) -> URL:
        """A cluster URL: the first node as host, the others as ``host=`` entries."""
        chosen = list(nodes or self.nodes)
        return URL.create(
            "mysql+pymysql", username="root", host="127.0.0.1", port=chosen[0].port, database=database,
            query={"host": [node.address for node in chosen[1:]]} if len(chosen) > 1 else {},
        )

    def size(self) -> int:
        for node in self.nodes:
            try:
                return int(node.status("wsrep_cluster_size") or 0)
            except pymysql.MySQLError:
                continue
        return 0

    def story(self, lines: int = 60) -> str:
        """What each node logged lately, client noise left out: for a failing test's message."""
        parts = []
        for node in self.nodes:
            logged = [line for line in node.log_tail_all() if "Aborted connection" not in line]
            parts.append(f"--- {node.name_in_cluster} ({node.state()}):\n" + "\n".join(logged[-lines:]))
        return "\n".join(parts)

    def heal(self) -> None:
        """Undo what a test left: every node running, in the group, synced."""
        for node in self.nodes:
            if node.process_exited() or node.process is None:
                node.start()
            elif not node.is_synced_in_primary():
                try:
                    node.rejoin()
                except pymysql.MySQLError:
                    pass
        for node in self.nodes:
            node.wait_until_synced()
        deadline = time.monotonic() + JOIN_TIMEOUT
        while self.size() != len(self.nodes) and time.monotonic() < deadline:
            time.sleep(0.2)

    @contextmanager
    def database(self) -> Iterator[str]:
        """A new database created on node 1 (so on all), migrated to head, dropped at the end."""
        from tests.support.apps import migrate

        name = f"galera_{os.urandom(4).hex()}"
        self.nodes[0].query(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
        try:
            migrate(self.nodes[0].url(name))
            yield name
        finally:
            for node in self.nodes:
                if node.is_synced_in_primary():
                    node.query(f"DROP DATABASE IF EXISTS {name}")
                    break


@contextmanager
def galera_cluster(size: int = 3) -> Iterator[GaleraCluster]:
    """Start the cluster (node 1 bootstraps, the others join one by one by SST); stop
    every node by PID and remove its folder at the end, whatever happened."""
    roots: list[Path] = []
    nodes: list[GaleraNode] = []
    for number in range(1, size + 1):
        root = Path(tempfile.mkdtemp(prefix=f"myapp-galera-{number}-"))
        root.chmod(0o755)
        chown_to(root, MariaDBServer.user)
        roots.append(root)
        nodes.append(GaleraNode(root, number))
    try:
        for node in nodes:
            node.write_config(nodes)
        nodes[0].install()
        nodes[0].start(bootstrap=True)
        for node in nodes[1:]:
            node.start()
        yield GaleraCluster(nodes)
    finally:
        for node in reversed(nodes):
            try:
                node.stop()
            except Exception:  # half-started: removing its folder is what matters
                node.kill()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # a quick look: python -m tests.topology.galera
    started = time.monotonic()
    with galera_cluster() as cluster:
        print(f"up in {time.monotonic() - started:.1f} s, size {cluster.size()}")
        print([node.state() for node in cluster.nodes])
