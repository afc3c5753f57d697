"""A throwaway PgBouncer (Debian's /usr/sbin/pgbouncer) in front of a test server.

Why: in transaction pooling a client's consecutive transactions may run on different
server connections, which breaks session state the application may rely on without
knowing it (server-side prepared statements, SET, advisory locks), and PgBouncer
refuses startup parameters it does not track (``options``). Tests must see those
failures against the real program. The configuration is ours, in a temporary folder:
no [databases] entry of the system, ``trust`` authentication for the ``postgres``
user only, a free loopback port, ``ignore_startup_parameters`` left at its default.
"""

from __future__ import annotations

import os
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

from psycopg.conninfo import make_conninfo
from sqlalchemy.engine import URL

from tests.support.network import free_port
from tests.support.servers import START_TIMEOUT, chown_to

from .netns import wait_for

BINARY = "/usr/sbin/pgbouncer"
USER = "postgres"  # pgbouncer refuses to run as root; -u switches to this user


class PgBouncer:
    """One pgbouncer process. ``process.pid`` is pgbouncer itself (no runuser between:
    it is started as root with ``-u postgres`` and switches user by itself)."""

    def __init__(self, root: Path, target_host: str, target_port: int, settings: dict[str, Any]) -> None:
        self.root = root
        self.target_host, self.target_port = target_host, target_port
        self.port = free_port()
        self.ini = root / "pgbouncer.ini"
        self.log = root / "pgbouncer.log"
        self.pid_file = root / "pgbouncer.pid"
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        (self.root / "userlist.txt").write_text(f'"{USER}" ""\n')
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "unix_socket_dir": str(self.root),
            "auth_type": "trust",
            "auth_file": str(self.root / "userlist.txt"),
            "admin_users": USER,
            "logfile": str(self.log),
            "pidfile": str(self.pid_file),
            **self.settings,
        }
        lines = ["[databases]", f"* = host={self.target_host} port={self.target_port}", "", "[pgbouncer]"]
        lines += [f"{name} = {value}" for name, value in settings.items()]
        self.ini.write_text("\n".join(lines) + "\n")
        for path in (self.ini, self.root / "userlist.txt"):
            chown_to(path, USER)

    def start(self) -> None:
        command = [BINARY, *(["-u", USER] if os.geteuid() == 0 else []), str(self.ini)]
        with (self.root / "stderr.log").open("ab") as sink:  # a file, never a pipe
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)
        try:
            wait_for(self._accepts, START_TIMEOUT, "pgbouncer to listen", interval=0.05)
        except TimeoutError:
            self.stop()
            raise AssertionError(f"pgbouncer did not start:\n{self.log_tail()}") from None

    def _accepts(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"pgbouncer exited with {self.process.returncode}:\n{self.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Immediate shutdown (SIGTERM to its PID), SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=START_TIMEOUT)

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop (clients are cut off), stay down, start again on the same port."""
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def url(self, database: str = "postgres") -> URL:
        return URL.create("postgresql+psycopg", username=USER, host="127.0.0.1", port=self.port, database=database)

    def conninfo(self, database: str = "postgres", **params: Any) -> str:
        return make_conninfo(host="127.0.0.1", port=self.port, user=USER, dbname=database, **params)

    def log_tail(self) -> str:
        text = ""
        for path in (self.log, self.root / "stderr.log"):
            try:
                text += "\n".join(path.read_text(errors="replace").splitlines()[-20:]) + "\n"
            except OSError:
                pass
        return text or "(no log)"


@contextmanager
def pgbouncer(target_host: str, target_port: int, pool_mode: str = "transaction", default_pool_size: int = 2,
              **settings: Any) -> Iterator[PgBouncer]:
    """PgBouncer on a free loopback port in front of ``target_host:target_port`` (every
    database name is passed through); ``settings`` are more [pgbouncer] options.
    Stopped by its PID and removed at the end whatever happens."""
    if not os.access(BINARY, os.X_OK):
        raise FileNotFoundError(f"{BINARY}: apt-get install pgbouncer")
    root = Path(tempfile.mkdtemp(prefix="myapp-topology-pgbouncer-"))
    root.chmod(0o755)
    chown_to(root, USER)
    bouncer = PgBouncer(root, target_host, target_port,
                        {"pool_mode": pool_mode, "default_pool_size": default_pool_size, **settings})
    try:
        bouncer.write_config()
        bouncer.start()
        yield bouncer
    finally:
        try:
            bouncer.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
