"""Several hosts in one PostgreSQL URL (``?host=a:5432&host=b:5432``): try the one that
last answered first (issue 19, point 3).

libpq tries the hosts in the listed order, and ``target_session_attrs=read-write``
skips a standby. After a failover the old primary is usually listed first; if it went
silent (a lost host, a cut link) every new connection first spends the whole connect
timeout on it, for as long as the app runs. So each engine remembers, per process,
the host its last new connection reached and puts it first; a connect that fails goes
back to the listed order. Nothing here when the URL names one host.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, event


class LastGoodHost:
    """One engine's host list and the host that answered last."""

    def __init__(self, hosts: list[str], ports: list[str]) -> None:
        self.listed = list(zip(hosts, ports))
        self.last_good: tuple[str, str] | None = None

    def order(self) -> list[tuple[str, str]]:
        good = self.last_good
        if good is None or good not in self.listed:
            return self.listed
        return [good, *(pair for pair in self.listed if pair != good)]

    def answered(self, host: str, port: str) -> None:
        self.last_good = (host, port)

    def failed(self) -> None:
        self.last_good = None


def prefer_the_last_good_host(engine: Engine) -> LastGoodHost | None:
    """Install the ordering on a psycopg engine whose URL lists several hosts."""
    _, params = engine.dialect.create_connect_args(engine.url)
    hosts, ports = str(params.get("host", "")).split(","), str(params.get("port", "")).split(",")
    if len(hosts) < 2 or len(ports) != len(hosts):
        return None
    choice = LastGoodHost(hosts, ports)

    @event.listens_for(engine, "do_connect")
    def _reorder(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        order = choice.order()
        cparams["host"] = ",".join(host for host, _ in order)
        cparams["port"] = ",".join(port for _, port in order)

    @event.listens_for(engine, "connect")
    def _remember(dbapi_connection: Any, record: Any) -> None:
        info = dbapi_connection.info
        choice.answered(str(info.host), str(info.port))

    @event.listens_for(engine, "handle_error")
    def _forget(context: Any) -> None:
        if context.connection is None:  # the connect itself failed
            choice.failed()

    return choice
