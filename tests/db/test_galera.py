"""The parts of myapp/db/galera.py that need no cluster: reading a cluster URL, the
settings, what counts as a ready node, and 1047 as a disconnect.

The cluster itself (node choice, isolation, conflicts, causal reads) is fault scenario
15, tests/faults/test_galera.py, on a real three-node Galera cluster.
"""

from __future__ import annotations

from types import SimpleNamespace

import pymysql
import pytest
from sqlalchemy.engine import make_url

from myapp.config import ConfigError
from myapp.db import galera
from tests.support.apps import make_app

URL = "mysql+pymysql://app:s3cret@db1:3307/site?host=db2:3308&host=db3&charset=utf8mb4"


def test_a_cluster_url_lists_its_nodes_in_order_and_keeps_its_other_options() -> None:
    url, nodes = galera.cluster_nodes(make_url(URL))
    assert nodes == [("db1", 3307), ("db2", 3308), ("db3", 3306)]
    assert "host" not in url.query and url.query["charset"] == "utf8mb4"
    assert (url.host, url.port, url.database, url.password) == ("db1", 3307, "site", "s3cret")


def test_a_single_address_is_one_node() -> None:
    _, nodes = galera.cluster_nodes(make_url("mysql+pymysql://app@galera-proxy/site"))
    assert nodes == [("galera-proxy", 3306)]


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


def test_a_url_listing_several_nodes_is_a_cluster_pinned_by_default() -> None:
    assert make_app("mysql+pymysql://app@db1/site?host=db2").config["DATABASE_GALERA"] == "pinned"
    assert make_app("mysql+pymysql://app@db1/site?host=db2", DATABASE_GALERA="spread").config["DATABASE_GALERA"] == "spread"
    assert make_app("mysql+pymysql://app@db1/site").config["DATABASE_GALERA"] == ""


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
