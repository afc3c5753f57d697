"""Throwaway PostgreSQL and MariaDB servers that a test may stop, kill and restart.

The fault suite breaks them, and the topologies (tests/topology/) build on them. The
shared services on 5432/3306 are never touched: each server here lives in a
temporary folder, listens on a free loopback port and is removed at the end. Under
root, PostgreSQL runs as the ``postgres`` user (``initdb`` refuses root) and MariaDB
as ``mysql``. Server output goes to a log file, never to a pipe: ``pg_ctl`` hands the
pipe to the postmaster, and a ``capture_output`` call would then never return.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pymysql
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from .apps import migrate
from .network import free_port

START_TIMEOUT = 30.0


def run_as(user: str) -> list[str]:
    """A prefix that runs a command as ``user`` when we are root: the servers refuse
    to run as root, and their files must belong to their own user."""
    return ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []


def chown_to(path: Path, user: str) -> None:
    """Give ``path`` to ``user`` when we are root, so that a server running as that
    user can write there; run by anyone else, the server runs as us (see ``run_as``)."""
    if os.geteuid() == 0:
        shutil.chown(path, user, user)


class ThrowawayServer:
    """A database server of our own: start, stop, restart, and databases to migrate."""

    name: str  # the backend name of tests/support/databases.py: "postgresql" or "mysql"
    user = "root"  # the system user the server runs as
    admin_database = ""  # a database that always exists, for the admin connection

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.log = root / "server.log"

    # -- lifecycle, implemented per server ---------------------------------------

    def install(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def restart(self, down_seconds: float) -> float:
        """Stop fast, stay down, start; return the monotonic time the server was ready."""
        self.stop()
        time.sleep(down_seconds)
        self.start()
        return time.monotonic()

    # -- databases ---------------------------------------------------------------

    def url(self, database: str) -> URL:
        raise NotImplementedError

    def admin_engine(self) -> Engine:
        """An autocommit superuser engine without a pool: it survives restarts."""
        return create_engine(self.url(self.admin_database), isolation_level="AUTOCOMMIT", poolclass=NullPool)

    def is_up(self) -> bool:
        """True when the server accepts a connection and answers a query now."""
        engine = self.admin_engine()
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except Exception:  # refused, or starting up
            return False
        finally:
            engine.dispose()

    def ensure_running(self) -> None:
        if not self.is_up():
            self.start()

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process_exited():
                break
            if self.is_up():
                return
            time.sleep(0.1)
        raise AssertionError(f"{self.name} did not start within {START_TIMEOUT} s:\n{self.log_tail()}")

    def process_exited(self) -> bool:
        return False

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"

    @contextmanager
    def database(self) -> Iterator[URL]:
        """A new database on this server, migrated to head, dropped at the end."""
        name = f"faults_{secrets.token_hex(4)}"
        admin = self.admin_engine()
        suffix = " CHARACTER SET utf8mb4" if self.name == "mysql" else ""
        with admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {name}{suffix}"))
        url = self.url(name)
        try:
            migrate(url)
            yield url
        finally:
            force = " WITH (FORCE)" if self.name == "postgresql" else ""
            try:
                with admin.connect() as connection:
                    connection.execute(text(f"DROP DATABASE IF EXISTS {name}{force}"))
            finally:
                admin.dispose()


class PostgresServer(ThrowawayServer):
    name = "postgresql"
    user = "postgres"
    admin_database = "postgres"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.data = root / "data"
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not binaries:
            raise AssertionError("PostgreSQL server binaries not found under /usr/lib/postgresql")
        self.bin = Path(binaries[-1])

    def _pg_ctl(self, *args: str) -> None:
        command = [*run_as(self.user), str(self.bin / "pg_ctl"), "-D", str(self.data), *args]
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            timeout=START_TIMEOUT,
        )
        if result.returncode != 0:
            raise AssertionError(f"pg_ctl {' '.join(args)} failed ({result.returncode}):\n{self.log_tail()}")

    def install(self) -> None:
        with (self.root / "install.log").open("ab") as sink:
            subprocess.run(
                [*run_as(self.user), str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                 "-A", "trust", "--no-sync", "-E", "UTF8"],
                stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, check=True, timeout=120,
            )

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._pg_ctl("-l", str(self.log), "-o", options, "-w", "-t", str(int(START_TIMEOUT)), "start")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "-t", str(int(START_TIMEOUT)), "stop")

    def url(self, database: str) -> URL:
        return URL.create("postgresql+psycopg", username="postgres", host="127.0.0.1", port=self.port,
                          database=database)

    def process_ids(self) -> list[int]:
        """The postmaster (from postmaster.pid) and every process it has forked."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
        return [postmaster, *map(int, children)]

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Every process of the server stopped (SIGSTOP), as a server stuck on storage or
        a paused VM: its kernel still accepts connections and acknowledges packets, and
        nothing answers. Thawed (SIGCONT) at the end, whatever happened."""
        pids = self.process_ids()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)


class MariaDBServer(ThrowawayServer):
    name = "mysql"
    user = "mysql"
    admin_database = "mysql"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.data = root / "data"
        self.pid_file = root / "mariadbd.pid"
        self.socket = root / "mariadbd.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def install(self) -> None:
        with (self.root / "install.log").open("ab") as sink:
            subprocess.run(
                ["mariadb-install-db", "--no-defaults", f"--datadir={self.data}", f"--user={self.user}",
                 "--auth-root-authentication-method=normal", "--skip-test-db"],
                stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, check=True, timeout=120,
            )

    def start(self) -> None:
        command = [
            shutil.which("mariadbd") or "/usr/sbin/mariadbd", "--no-defaults", f"--datadir={self.data}",
            f"--socket={self.socket}", f"--port={self.port}", "--bind-address=127.0.0.1",
            f"--pid-file={self.pid_file}", f"--log-error={self.log}", "--skip-log-bin",
            "--skip-name-resolve", "--innodb-buffer-pool-size=32M", "--innodb-flush-log-at-trx-commit=2",
        ]
        if os.geteuid() == 0:
            command.append(f"--user={self.user}")
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.wait_until_ready()

    def stop(self) -> None:
        """A normal shutdown (SIGTERM): clients are disconnected, the server exits."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # a normal shutdown: clients are disconnected
        try:
            self.process.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def process_exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def url(self, database: str) -> URL:
        return URL.create("mysql+pymysql", username="root", host="127.0.0.1", port=self.port, database=database)

    def _socket_accepts(self) -> bool:
        # PyMySQL leaks its socket when a Unix-socket connect fails (a ResourceWarning,
        # an error under this suite's filterwarnings): try the socket ourselves first.
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(2)
            try:
                probe.connect(str(self.socket))
                return True
            except OSError:
                return False

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run one statement as root over the Unix socket, in autocommit; its rows. The
        socket is not cut by a partition of the server's network."""
        if not self._socket_accepts():
            raise pymysql.err.OperationalError(2002, f"{self.socket} does not accept connections")
        connection = pymysql.connect(unix_socket=str(self.socket), user="root", autocommit=True,
                                     connect_timeout=5, read_timeout=30)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params or None)
                return list(cursor.fetchall())
        finally:
            connection.close()


@contextmanager
def throwaway_server(kind: type[ThrowawayServer]) -> Iterator[ThrowawayServer]:
    """Install and start a server in a temporary folder; stop and remove it whatever happens."""
    root = Path(tempfile.mkdtemp(prefix=f"myapp-faults-{kind.name}-"))
    root.chmod(0o755)
    chown_to(root, kind.user)
    server = kind(root)
    try:
        server.install()
        server.start()
        yield server
    finally:
        try:
            server.stop()
        except Exception:  # already down, or half-started: removing the folder is what matters
            pass
        shutil.rmtree(root, ignore_errors=True)
