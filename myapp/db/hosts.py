"""Several hosts in one PostgreSQL URL (``?host=a:5432&host=b:5432``): try the one that
last answered first (issue 19, point 3).

libpq tries the hosts in the listed order, and ``target_session_attrs=read-write``
skips a standby. After a failover the old primary is usually listed first; if it went
silent (a lost host, a cut link) every new connection first spends the whole connect
timeout on it, for as long as the app runs. So each engine remembers, per process,
the host its last new connection reached and puts it first. A connect that fails
goes back to the listed order, but with the host it tried first moved last: a dead
first host is not waited on again at the next attempt (the breaker's probe, say),
while the promoted standby behind it would answer. Nothing here when the URL names
one host. A connection lost on a host (a network timeout: the host went silent)
demotes that host the same way. The engines of one URL in a process (the pool's and
the breaker's probe) share what they learn.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, event


class LastGoodHost:
    """One engine's host list and the host that answered last."""

    def __init__(self, hosts: list[str], ports: list[str]) -> None:
        self.listed = list(zip(hosts, ports))
        self.last_good: tuple[str, str] | None = None
        self.demoted: tuple[str, str] | None = None  # tried first by a connect that failed
        self.tried_first: tuple[str, str] | None = None

    def order(self) -> list[tuple[str, str]]:
        if self.last_good in self.listed:
            first = [self.last_good]
        else:
            first = []
        last = [self.demoted] if self.demoted in self.listed and self.demoted not in first else []
        order = [*first, *(pair for pair in self.listed if pair not in first and pair not in last), *last]
        self.tried_first = order[0]
        return order

    def answered(self, host: str, port: str) -> None:
        self.last_good, self.demoted = (host, port), None

    def failed(self) -> None:
        self.last_good, self.demoted = None, self.tried_first

    def lost(self, pair: tuple[str, str]) -> None:
        """A connection to ``pair`` was lost: try it last until a host answers."""
        if self.last_good == pair:
            self.last_good = None
        self.demoted = pair


# One per URL and process: the pool's engine and the probe's learn from each other.
_choices: dict[str, LastGoodHost] = {}
HOST_KEY = "myapp.host"  # in a pooled connection's info: the (host, port) it reached


def prefer_the_last_good_host(engine: Engine) -> LastGoodHost | None:
    """Install the ordering on a psycopg engine whose URL lists several hosts."""
    _, params = engine.dialect.create_connect_args(engine.url)
    hosts, ports = str(params.get("host", "")).split(","), str(params.get("port", "")).split(",")
    if len(hosts) < 2 or len(ports) != len(hosts):
        return None
    key = engine.url.render_as_string(hide_password=False)
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = LastGoodHost(hosts, ports)

    @event.listens_for(engine, "do_connect")
    def _reorder(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        order = choice.order()
        cparams["host"] = ",".join(host for host, _ in order)
        cparams["port"] = ",".join(port for _, port in order)

    @event.listens_for(engine, "connect")
    def _remember(dbapi_connection: Any, record: Any) -> None:
        pair = (str(dbapi_connection.info.host), str(dbapi_connection.info.port))
        record.info[HOST_KEY] = pair
        choice.answered(*pair)

    @event.listens_for(engine, "handle_error")
    def _forget(context: Any) -> None:
        if context.connection is None:  # the connect itself failed
            choice.failed()
        elif context.is_disconnect and not context.is_pre_ping:
            pair = context.connection.info.get(HOST_KEY)
            if pair is not None:
                choice.lost(pair)

    return choice
