"""The parts of myapp/db/galera.py that need no cluster: reading a cluster URL, the
settings, what counts as a ready node, and 1047 as a disconnect.

The cluster itself (node choice, isolation, conflicts, causal reads) is fault scenario
15, tests/faults/test_galera.py, on a real three-node Galera cluster.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pymysql
import pytest
from sqlalchemy.engine import make_url

from myapp.config import ConfigError
from myapp.db import galera
from myapp.db.config import DatabaseSettings, GaleraSettings, cluster_nodes
from myapp.db.galera import _NodeChooser
from tests.support.apps import make_app

URL = "mysql+pymysql://app:s3cret@db1:3307/site?host=db2:3308&host=db3&charset=utf8mb4"


def _settings(url: str, **config: object) -> DatabaseSettings:
    return make_app(url, **config).extensions["myapp.database"].settings  # type: ignore[no-any-return]


def test_a_cluster_url_lists_its_nodes_in_order_and_keeps_its_other_options() -> None:
    settings = _settings(URL)
    assert settings.galera is not None
    assert settings.galera.nodes == (("db1", 3307), ("db2", 3308), ("db3", 3306))
    url = settings.url
    assert "host" not in url.query and url.query["charset"] == "utf8mb4"
    assert (url.host, url.port, url.database, url.password) == ("db1", 3307, "site", "s3cret")


def test_a_single_address_is_one_node() -> None:
    assert cluster_nodes(make_url("mysql+pymysql://app@galera-proxy/site")) == (("galera-proxy", 3306),)


@pytest.mark.parametrize("entry", ["db2:", ":3306", "db2:port"])
def test_a_malformed_host_entry_is_a_one_line_config_error(entry: str) -> None:
    with pytest.raises(ConfigError, match="must be written host or host:port") as error:
        make_app(f"mysql+pymysql://app:s3cret@db1/site?host={entry}", DATABASE_GALERA="pinned")
    assert "s3cret" not in str(error.value)


def test_the_galera_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="DATABASE_GALERA is invalid"):
        make_app("mysql+pymysql://app@db1/site", DATABASE_GALERA="round-robin")
    with pytest.raises(ConfigError, match="DATABASE_GALERA_SYNC_WAIT"):
        make_app("mysql+pymysql://app@db1/site", DATABASE_GALERA="pinned", DATABASE_GALERA_SYNC_WAIT=16)
    with pytest.raises(ConfigError, match="needs a MariaDB DATABASE_URL"):
        make_app("postgresql+psycopg://app@db1/site", DATABASE_GALERA="pinned")


def _mode(url: str, **config: object) -> str | None:
    galera_settings = _settings(url, **config).galera
    return galera_settings.mode if galera_settings is not None else None


def test_a_url_listing_several_nodes_is_a_cluster_pinned_by_default() -> None:
    assert _mode("mysql+pymysql://app@db1/site?host=db2") == "pinned"
    assert _mode("mysql+pymysql://app@db1/site?host=db2", DATABASE_GALERA="spread") == "spread"
    assert _mode("mysql+pymysql://app@db1/site") is None


SYNCED = {"wsrep_ready": "ON", "wsrep_cluster_status": "Primary", "wsrep_local_state_comment": "Synced"}


@pytest.mark.parametrize(
    ("state", "ready"),
    [
        (SYNCED, True),
        ({**SYNCED, "wsrep_local_state_comment": "Donor/Desynced"}, False),
        ({**SYNCED, "wsrep_local_state_comment": "Joined"}, False),
        ({"wsrep_ready": "OFF", "wsrep_cluster_status": "non-Primary", "wsrep_local_state_comment": "Initialized"},
         False),
        ({**SYNCED, "wsrep_ready": "OFF"}, False),
        ({}, True),  # not a Galera node: a plain MariaDB behind the same URL
    ],
)
def test_a_new_connection_goes_only_to_a_synced_node_of_the_primary_component(state: dict[str, str], ready: bool) -> None:
    assert galera.is_ready(state) is ready


def test_error_1047_counts_as_a_disconnect_and_other_errors_do_not() -> None:
    not_ready = SimpleNamespace(
        original_exception=pymysql.err.OperationalError(1047, "WSREP has not yet prepared node for application use"),
        is_disconnect=False,
    )
    galera.node_not_ready_is_a_disconnect(not_ready)
    assert not_ready.is_disconnect is True
    deadlock = SimpleNamespace(original_exception=pymysql.err.OperationalError(1213, "Deadlock found"),
                               is_disconnect=False)
    galera.node_not_ready_is_a_disconnect(deadlock)
    assert deadlock.is_disconnect is False


def test_a_plain_mariadb_url_gets_no_galera_handling() -> None:
    app = make_app("mysql+pymysql://app@db1/site")
    engine = app.extensions["myapp.database"].engine
    from sqlalchemy import event

    assert not event.contains(engine, "handle_error", galera.node_not_ready_is_a_disconnect)
    cluster = make_app("mysql+pymysql://app@db1/site?host=db2")
    assert event.contains(cluster.extensions["myapp.database"].engine, "handle_error",
                          galera.node_not_ready_is_a_disconnect)


class _FakeConnection:
    closed = False

    def close(self) -> None:
        self.closed = True

    def cursor(self) -> Any:
        raise KeyboardInterrupt  # not a DBAPI error: an interrupt while the node is asked


def test_node_choice_never_leaks_the_connection_it_opened() -> None:
    """Bug: a non-DBAPI exception after the connect (here while asking the node's
    state) left the freshly opened connection unclosed."""
    opened: list[_FakeConnection] = []

    def connect(*args: Any, **kwargs: Any) -> _FakeConnection:
        opened.append(_FakeConnection())
        return opened[-1]

    dialect = SimpleNamespace(loaded_dbapi=SimpleNamespace(connect=connect, Error=pymysql.Error))
    chooser = _NodeChooser(GaleraSettings("pinned", (("db1", 3306), ("db2", 3306)), 1))
    with pytest.raises(KeyboardInterrupt):
        chooser(dialect, SimpleNamespace(info={}), (), {"user": "app"})
    assert len(opened) == 1 and opened[0].closed
