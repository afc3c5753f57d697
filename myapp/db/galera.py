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
  a read on one node sees what was committed through another before it began.

Nothing here knows about Flask.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, event, exc
from sqlalchemy.engine import URL

MODES = ("pinned", "spread")
NODE_NOT_READY = 1047  # ER_UNKNOWN_COM_ERROR: "WSREP has not yet prepared node for application use"
NODE_KEY = "galera_node"  # connection record info: "host:port" of the node it is connected to
_JUST_CHECKED = "galera_just_checked"  # connection record info: checked at connect, not yet checked out

_STATE_QUERY = (
    "SHOW GLOBAL STATUS WHERE Variable_name IN "
    "('wsrep_ready', 'wsrep_cluster_status', 'wsrep_local_state_comment', 'wsrep_cluster_size')"
)


def cluster_nodes(url: URL) -> tuple[URL, list[tuple[str, int]]]:
    """Split a cluster URL into the URL to connect with and its nodes, in order.

    ``mysql+pymysql://user@node1:3306/db?host=node2:3306&host=node3`` lists three
    nodes (the port defaults to 3306); a URL without ``host=`` names one address,
    a single node or a proxy in front of the cluster.
    """
    extra = url.query.get("host", ())
    extra = (extra,) if isinstance(extra, str) else tuple(extra)
    nodes = [(url.host or "127.0.0.1", url.port or 3306)]
    for entry in extra:
        host, _, port = entry.rpartition(":") if ":" in entry else (entry, "", "3306")
        if not host or not port.isdigit():
            raise ValueError(f"host={entry!r} in the cluster URL must be written host or host:port")
        nodes.append((host, int(port)))
    return url.difference_update_query(["host"]), nodes


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


def configure(engine: Engine, nodes: list[tuple[str, int]], mode: str, sync_wait: int) -> None:
    """Route the engine's connections to ready nodes of the cluster (see the module)."""
    if mode not in MODES:
        raise ValueError(f"DATABASE_GALERA must be one of {', '.join(MODES)}, not {mode!r}")
    starts = itertools.count()

    def order() -> Iterator[tuple[str, int]]:
        first = next(starts) % len(nodes) if mode == "spread" else 0
        return itertools.chain(nodes[first:], nodes[:first])

    # After the listener that names the connection: the first do_connect listener that
    # returns a connection is the one SQLAlchemy uses.
    @event.listens_for(engine, "do_connect")
    def _connect_to_a_ready_node(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        refusals: list[str] = []
        last_error: Exception | None = None
        for host, port in order():
            try:
                connection = dialect.loaded_dbapi.connect(*cargs, **{**cparams, "host": host, "port": port})
            except dialect.loaded_dbapi.Error as error:
                last_error = error
                refusals.append(f"{host}:{port} {error.args[-1] if error.args else error}")
                continue
            try:
                state = node_state(connection)
                if is_ready(state):
                    if sync_wait:
                        cursor = connection.cursor()
                        cursor.execute(f"SET SESSION wsrep_sync_wait = {int(sync_wait)}")
                        cursor.close()
                    record.info[NODE_KEY] = f"{host}:{port}"
                    record.info[_JUST_CHECKED] = True
                    return connection
                refusals.append(f"{host}:{port} {describe(state)}")
            except dialect.loaded_dbapi.Error as error:
                last_error = error
                refusals.append(f"{host}:{port} {error}")
            connection.close()
        # An OperationalError like a refused connect: the 503 page, the breaker's count.
        code = NODE_NOT_READY if last_error is None else (last_error.args or (2003,))[0]
        raise dialect.loaded_dbapi.OperationalError(code, "no Galera node is ready: " + "; ".join(refusals))

    @event.listens_for(engine, "checkout")
    def _check_the_node_is_still_ready(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        # After the pre-ping, which cannot tell: a node outside the Primary component
        # answers the protocol ping and SELECT 1, but refuses DO 1 with 1047 (one short
        # round trip, ~80 µs on loopback, a tenth of reading its status). A new
        # connection was checked just now.
        if record.info.pop(_JUST_CHECKED, False):
            return
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("DO 1")
        except engine.dialect.loaded_dbapi.Error as error:
            if error.args and error.args[0] == NODE_NOT_READY:
                raise exc.DisconnectionError(f"Galera node {record.info.get(NODE_KEY)} is not ready: {error}") from error
            raise exc.DisconnectionError(f"Galera node check failed: {error}") from error
        finally:
            cursor.close()

    event.listen(engine, "handle_error", node_not_ready_is_a_disconnect)


def node_not_ready_is_a_disconnect(context: Any) -> None:
    """1047 mid-request: the node left the Primary component under this connection."""
    args = getattr(context.original_exception, "args", ())
    if args and args[0] == NODE_NOT_READY:
        context.is_disconnect = True


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
