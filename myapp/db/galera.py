"""MariaDB Galera: which node a connection goes to, and what a node that left the
Primary component means for the connections it holds.

A Galera node that loses the majority keeps its client connections open and answers
``SELECT 1`` and the protocol ping, but refuses every table access (and even
ROLLBACK) with error 1047. SQLAlchemy does not count 1047 as a disconnect, so without
this module the pool would hand that connection out again and again.

What this module does, on engines whose ``DATABASE_GALERA`` is set:

- connects only to a node that is ready (``wsrep_ready`` ON, Primary component,
  Synced), trying the nodes of a cluster URL in turn: always in the listed order
  ("pinned": one writer node, the first ready one, which avoids certification
  conflicts) or starting from the next node each time ("spread");
- checks, at each checkout, that the node still accepts queries; if not, the connection is
  discarded with every older one (the pool never hands it out again) and a new one
  goes to a ready node;
- counts 1047 met mid-request as a disconnect, for the same reasons;
- sets ``wsrep_sync_wait`` on each connection, when configured: causal reads, so that
  a read on one node sees what was committed through another before it began;
- gives each node a breaker of its own (with ``DATABASE_BREAKER_THRESHOLD``): a node's
  failed connects and lost connections count there, a node whose breaker is open is
  skipped while another may serve, and the cluster's breaker (``breaker.Guards``) only
  counts connects that no node could take. So one failing node never refuses requests
  that a ready node can serve.

``Galera`` is the feature; ``GaleraMethods`` gives ``db`` the node's status.
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, event, exc

from .breaker import Breaker, ping_once
from .config import GaleraSettings
from .engines import make_engine
from .metrics import GALERA_CLUSTER_SIZE, GALERA_NODE_STATE
from .state import AppState, StateAccess

if TYPE_CHECKING:
    from flask import Flask

    from .config import DatabaseSettings
NODE_NOT_READY = 1047  # ER_UNKNOWN_COM_ERROR: "WSREP has not yet prepared node for application use"
NODE_KEY = "galera_node"  # connection record info: "host:port" of the node it is connected to
_JUST_CHECKED = "galera_just_checked"  # connection record info: checked at connect, not yet checked out

_STATE_QUERY = (
    "SHOW GLOBAL STATUS WHERE Variable_name IN "
    "('wsrep_ready', 'wsrep_cluster_status', 'wsrep_local_state', 'wsrep_local_state_comment', "
    "'wsrep_cluster_size')"
)


def node_state(dbapi_connection: Any) -> dict[str, str]:
    """The node's wsrep status variables (empty when the server is not a Galera node)."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(_STATE_QUERY)
        return {str(name): str(value) for name, value in cursor.fetchall()}
    finally:
        cursor.close()


def is_ready(state: dict[str, str]) -> bool:
    """Ready for a new connection: in the Primary component, accepting queries and
    ``Synced`` (a joiner or donor is still catching up)."""
    if not state:
        return True  # a plain MariaDB behind the same URL
    return (state.get("wsrep_ready") == "ON" and state.get("wsrep_cluster_status") == "Primary"
            and state.get("wsrep_local_state_comment") == "Synced")


def describe(state: dict[str, str]) -> str:
    return (f"{state.get('wsrep_local_state_comment', '?')}, {state.get('wsrep_cluster_status', '?')}"
            f" component, ready {state.get('wsrep_ready', '?')}")


class Galera:
    """The feature: connections go to ready nodes, and a node that stops being ready
    loses its pooled connections."""

    def __init__(self, settings: GaleraSettings) -> None:
        self.settings = settings
        self.node_breakers: dict[str, Breaker] = {}  # by "host:port"

    @classmethod
    def build(cls, settings: DatabaseSettings) -> Galera | None:
        return cls(settings.galera) if settings.galera is not None else None

    def install(self, state: AppState, app: Flask) -> None:
        breaker = state.settings.breaker
        if breaker is not None:
            for host, port in self.settings.nodes:
                url = state.settings.url.set(host=host, port=port).render_as_string(hide_password=False)
                probe = partial(ping_once, make_engine(state.settings, probe=True, replica_url=url))
                self.node_breakers[f"{host}:{port}"] = Breaker(breaker.threshold, breaker.reset_seconds, probe,
                                                               server=f"galera {host}:{port}")
        for engine in (state.engine, state.probe_engine):
            # After the listener that names the connection: the first do_connect
            # listener that returns a connection is the one SQLAlchemy uses.
            event.listen(engine, "do_connect", _NodeChooser(self.settings, self.node_breakers))
            _check_readiness_at_checkout(engine)
            event.listen(engine, "handle_error", node_not_ready_is_a_disconnect)
        if self.node_breakers:
            event.listen(state.engine, "handle_error", partial(_count_node_failure, self.node_breakers))


class _NodeChooser:
    """A ``do_connect`` listener: a connection to the first ready node, trying the
    nodes in turn (from the first, pinned; from the next one each time, spread)."""

    def __init__(self, settings: GaleraSettings, breakers: dict[str, Breaker] | None = None) -> None:
        self.settings = settings
        self._starts = itertools.count()
        self._breakers = breakers or {}

    def _order(self) -> list[tuple[str, int]]:
        """The nodes to try, in turn; those whose breaker is open left out, unless every
        one's is (then all are tried: better than refusing without trying)."""
        nodes = self.settings.nodes
        first = next(self._starts) % len(nodes) if self.settings.mode == "spread" else 0
        ordered = [*nodes[first:], *nodes[:first]]
        allowed = [node for node in ordered if self._allows(*node)]
        return allowed or ordered

    def _allows(self, host: str, port: int) -> bool:
        breaker = self._breakers.get(f"{host}:{port}")
        return breaker is None or breaker.allows()

    def _failed(self, host: str, port: int, error: BaseException) -> None:
        breaker = self._breakers.get(f"{host}:{port}")
        if breaker is not None:
            breaker.record_failure(error)

    def __call__(self, dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        dbapi = dialect.loaded_dbapi
        refusals: list[str] = []
        last_error: Exception | None = None
        for host, port in self._order():
            try:
                connection = dbapi.connect(*cargs, **{**cparams, "host": host, "port": port})
            except dbapi.Error as error:
                last_error = error
                self._failed(host, port, error)
                refusals.append(f"{host}:{port} {error.args[-1] if error.args else error}")
                GALERA_NODE_STATE.labels(f"{host}:{port}").set(0)
                continue
            try:
                refusal = self._refusal(connection, f"{host}:{port}")
            except dbapi.Error as error:
                last_error, refusal = error, str(error)
            except BaseException:
                connection.close()  # never leak the socket, whatever went wrong
                raise
            if refusal is None:
                breaker = self._breakers.get(f"{host}:{port}")
                if breaker is not None:
                    breaker.record_success()
                record.info[NODE_KEY] = f"{host}:{port}"
                record.info[_JUST_CHECKED] = True
                return connection
            refusals.append(f"{host}:{port} {refusal}")
            connection.close()
        # An OperationalError like a refused connect: the 503 page, the breaker's count.
        code = NODE_NOT_READY if last_error is None else (last_error.args or (2003,))[0]
        raise dbapi.OperationalError(code, "no Galera node is ready: " + "; ".join(refusals))

    def _refusal(self, connection: Any, node: str) -> str | None:
        """Why this node will not do (None: it is ready, and set up for causal reads)."""
        state = node_state(connection)
        _record(node, state)
        if not is_ready(state):
            return describe(state)
        if self.settings.sync_wait:
            cursor = connection.cursor()
            cursor.execute(f"SET SESSION wsrep_sync_wait = {int(self.settings.sync_wait)}")
            cursor.close()
        return None


def _record(node: str, state: dict[str, str]) -> None:
    """The node's state in the metrics: what this worker's new connection found there."""
    GALERA_NODE_STATE.labels(node).set(int(state.get("wsrep_local_state") or 0) if is_ready(state) else 0)
    GALERA_CLUSTER_SIZE.set(int(state.get("wsrep_cluster_size") or 0))


def _check_readiness_at_checkout(engine: Engine) -> None:
    """After the pre-ping, which cannot tell: a node outside the Primary component
    answers the protocol ping and SELECT 1, but refuses DO 1 with 1047 (one short round
    trip, ~80 µs on loopback, a tenth of reading its status). A new connection was
    checked just now."""
    dbapi_error = engine.dialect.loaded_dbapi.Error

    @event.listens_for(engine, "checkout")
    def _still_ready(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if record.info.pop(_JUST_CHECKED, False):
            return
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("DO 1")
        except dbapi_error as error:
            if error.args and error.args[0] == NODE_NOT_READY:
                raise exc.DisconnectionError(f"Galera node {record.info.get(NODE_KEY)} is not ready: {error}") from error
            raise exc.DisconnectionError(f"Galera node check failed: {error}") from error
        finally:
            cursor.close()


def _count_node_failure(breakers: dict[str, Breaker], context: Any) -> None:
    """A connection to a node was lost (a network timeout, a 1047): that node's failure,
    not the cluster's."""
    connection = context.connection
    if connection is None or context.is_pre_ping or not context.is_disconnect:
        return
    breaker = breakers.get(connection.info.get(NODE_KEY, ""))
    if breaker is not None:
        breaker.record_failure(context.original_exception)


def node_not_ready_is_a_disconnect(context: Any) -> None:
    """1047 mid-request: the node left the Primary component under this connection."""
    args = getattr(context.original_exception, "args", ())
    if args and args[0] == NODE_NOT_READY:
        context.is_disconnect = True


class GaleraMethods(StateAccess):
    """The ``db`` method for operators of a Galera cluster."""

    def galera_status(self) -> dict[str, Any] | None:
        """The Galera node a new connection reaches now, with its state and the cluster's
        size (None when the database is not a Galera cluster); raises like ``ping``."""
        state = self.app_state()
        galera = state.feature(Galera)
        if galera is None:
            return None
        return {"mode": galera.settings.mode, **status(state.probe_engine)}

    def node_breakers_status(self) -> dict[str, dict[str, Any]]:
        """Each Galera node's breaker in this process, by "galera host:port"."""
        galera = self.app_state().feature(Galera)
        if galera is None:
            return {}
        return {breaker.server: breaker.status() for breaker in galera.node_breakers.values()}


def status(engine: Engine) -> dict[str, Any]:
    """The node a new connection of ``engine`` reaches, and its state, for operators."""
    with engine.connect() as connection:
        state = node_state(connection.connection.dbapi_connection)
        node = connection.connection.info.get(NODE_KEY) or f"{engine.url.host}:{engine.url.port or 3306}"
    return {
        "node": node,
        "state": state.get("wsrep_local_state_comment"),
        "cluster_status": state.get("wsrep_cluster_status"),
        "cluster_size": int(state.get("wsrep_cluster_size") or 0),
        "ready": state.get("wsrep_ready") == "ON",
    }
