"""A throwaway MariaDB inside a network namespace of its own.

Why: PyMySQL and the MariaDB server react to a vanished peer differently from libpq
(their own connect, read and write timeouts), and the application must behave on both
backends. The server is a ``MariaDBServer`` of tests/support/servers.py, started with
``ip netns exec`` and bound to the namespace address; the harness reaches it through
its Unix socket, which a partition does not cut.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pymysql
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from tests.support.servers import MariaDBServer, chown_to

from .netns import NetNamespace, Partitionable, network_namespace


class NamespacedMariaDB(MariaDBServer, Partitionable):
    """mariadbd bound to its namespace address; ``process.pid`` is mariadbd itself
    (``ip netns exec`` execs it and mariadbd drops to the mysql user by itself)."""

    def __init__(self, root: Path, netns: NetNamespace) -> None:
        super().__init__(root)
        self.netns = netns

    @property
    def address(self) -> str:
        assert self.netns is not None
        return self.netns.address

    def start(self) -> None:
        assert self.netns is not None
        command = [
            *self.netns.exec_prefix(),
            shutil.which("mariadbd") or "/usr/sbin/mariadbd", "--no-defaults", f"--datadir={self.data}",
            f"--socket={self.socket}", f"--port={self.port}", f"--bind-address={self.address}",
            f"--pid-file={self.pid_file}", f"--log-error={self.log}", "--skip-log-bin",
            "--skip-name-resolve", "--innodb-buffer-pool-size=32M", "--innodb-flush-log-at-trx-commit=2",
            f"--user={self.user}",
        ]
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.wait_until_ready()

    def url(self, database: str) -> URL:
        """SQLAlchemy URL over TCP to the namespace address, the way the application connects."""
        return URL.create("mysql+pymysql", username="root", host=self.address, port=self.port, database=database)

    def control_url(self, database: str) -> URL:
        """Over the Unix socket: works while the server is partitioned."""
        return URL.create("mysql+pymysql", username="root", database=database,
                          query={"unix_socket": str(self.socket)})

    def admin_engine(self) -> Engine:
        return create_engine(self.control_url(self.admin_database), isolation_level="AUTOCOMMIT",
                             poolclass=NullPool)

    def is_up(self) -> bool:
        return self._socket_accepts() and super().is_up()

    def allow_host(self) -> None:
        """root may connect from the host end of the veth pair (the only client address)."""
        assert self.netns is not None
        host = self.netns.host_address
        self.query(f"CREATE USER IF NOT EXISTS 'root'@'{host}'")
        self.query(f"GRANT ALL PRIVILEGES ON *.* TO 'root'@'{host}' WITH GRANT OPTION")

    def answers_over_network(self) -> bool:
        try:
            connection = pymysql.connect(host=self.address, port=self.port, user="root", connect_timeout=1,
                                         read_timeout=2, write_timeout=2)
        except pymysql.MySQLError:
            return False
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            return True
        except pymysql.MySQLError:
            return False
        finally:
            connection.close()


@contextmanager
def namespaced_mariadb() -> Iterator[NamespacedMariaDB]:
    """A throwaway MariaDB inside a network namespace of its own, listening on the
    namespace address: ``partition()`` cuts it off silently, ``heal()`` reconnects it.
    Stopped by PID (SIGTERM, then SIGKILL) and removed with its namespace at the end."""
    with network_namespace() as netns:
        root = Path(tempfile.mkdtemp(prefix="myapp-topology-mariadb-"))
        root.chmod(0o755)
        chown_to(root, MariaDBServer.user)
        server = NamespacedMariaDB(root, netns)
        try:
            server.install()
            server.start()
            server.allow_host()
            yield server
        finally:
            try:
                server.stop()
            finally:
                shutil.rmtree(root, ignore_errors=True)
