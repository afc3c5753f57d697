"""Smoke tests of the topology builders in tests/topology (issue 10): each proves that
its building block really does what the failover, partition and PgBouncer tests will
rely on, against the real programs.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pymysql
import pytest
import sqlalchemy.exc
from psycopg import errors
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from tests.topology import (
    NamespacedMariaDB, PatroniCluster, PgBouncer, PgNode, ReplicatedPostgres, replicated_postgres,
)
from tests.topology.fixtures import (  # noqa: F401 (fixtures)
    bouncer, bouncer_session, netns_mariadb, netns_mariadb_session, netns_postgres, netns_postgres_session,
    patroni, patroni_session, replicated, replicated_session, require_namespaces, require_postgres,
)
from tests.topology.netns import wait_for
from tests.topology.patroni import LOOP_WAIT, TTL

pytestmark = pytest.mark.faults

# libpq options that bound how long a dead peer goes unnoticed on an open connection.
DEAD_PEER_DETECTION: dict[str, Any] = {"tcp_user_timeout": 2000, "keepalives": 1, "keepalives_idle": 1,
                       "keepalives_interval": 1, "keepalives_count": 2}


def scalar(url: URL, sql: str) -> Any:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return connection.execute(text(sql)).scalar()
    finally:
        engine.dispose()


def server_port(url: URL) -> int:
    return int(scalar(url, "SELECT inet_server_port()"))


class Pending:
    """A call running in a daemon thread, so that a hung query cannot hang the test."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.seconds: float | None = None
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.result = call()
        except BaseException as error:  # reported to the test, not to the thread hook
            self.error = error
        finally:
            self.seconds = time.monotonic() - self.started

    def done(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


def shut_down_socket(fileno: int) -> None:
    """Wake a thread blocked on this socket: shutdown() on a duplicate of the descriptor
    acts on the socket itself (the caller's descriptor stays valid for close())."""
    duplicate = socket.socket(fileno=os.dup(fileno))
    try:
        duplicate.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        duplicate.close()


@contextmanager
def unblocked_at_exit(pendings: list[tuple[Pending, int]]) -> Iterator[None]:
    """Whatever the test asserted, no thread stays blocked on a socket after it."""
    try:
        yield
    finally:
        for pending, fileno in pendings:
            if not pending.done(0):
                shut_down_socket(fileno)
                pending.done(10)


# -- primary and streaming standby ---------------------------------------------------------


def test_row_written_on_primary_appears_on_standby(replicated: ReplicatedPostgres) -> None:
    primary, standby = replicated.primary, replicated.standbys[0]
    engine = create_engine(primary.url("postgres"), poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE IF NOT EXISTS smoke (note text)"))
            connection.execute(text("INSERT INTO smoke VALUES ('written on the primary')"))
    finally:
        engine.dispose()
    replicated.wait_for_replay(standby)
    assert scalar(standby.url("postgres"), "SELECT count(*) FROM smoke WHERE note = 'written on the primary'") >= 1
    assert scalar(standby.url("postgres"), "SELECT pg_is_in_recovery()") is True
    assert scalar(primary.url("postgres"), "SELECT pg_is_in_recovery()") is False
    with pytest.raises(errors.ReadOnlySqlTransaction):
        with psycopg.connect(standby.conninfo(), autocommit=True) as connection:
            connection.execute("INSERT INTO smoke VALUES ('written on the standby')")


def test_paused_replay_and_apply_delay_make_the_standby_stale(replicated: ReplicatedPostgres) -> None:
    primary, standby = replicated.primary, replicated.standbys[0]
    primary.query("CREATE TABLE IF NOT EXISTS stale (n int)")
    replicated.wait_for_replay(standby)

    replicated.pause_replay(standby)
    primary.query("INSERT INTO stale VALUES (1)")
    with pytest.raises(TimeoutError):
        replicated.wait_for_replay(standby, timeout=0.5)
    assert standby.query("SELECT count(*) FROM stale WHERE n = 1")[0][0] == 0
    replicated.resume_replay(standby)
    replicated.wait_for_replay(standby)
    assert standby.query("SELECT count(*) FROM stale WHERE n = 1")[0][0] == 1

    replicated.set_standby_setting(standby, "recovery_min_apply_delay", "1500ms")
    for _ in range(50):  # new backends see the reload once the postmaster has read it
        if standby.query("SHOW recovery_min_apply_delay")[0][0] == "1500ms":
            break
        time.sleep(0.05)
    time.sleep(0.2)  # and the startup process, signalled at the same time, too
    primary.query("INSERT INTO stale VALUES (2)")
    wait = replicated.wait_for_replay(standby, timeout=10)
    assert wait > 1.0, f"the standby replayed a delayed commit after {wait:.2f} s"


def test_a_stopped_standby_catches_up_when_started(replicated: ReplicatedPostgres) -> None:
    primary, standby = replicated.primary, replicated.standbys[0]
    primary.query("CREATE TABLE IF NOT EXISTS downtime (n int)")
    replicated.stop(standby)
    assert not standby.running
    primary.query("INSERT INTO downtime SELECT generate_series(1, 1000)")
    replicated.start(standby)
    replicated.wait_for_replay(standby)
    assert standby.query("SELECT count(*) FROM downtime")[0][0] == 1000


def test_multihost_url_finds_the_primary_in_any_order(replicated: ReplicatedPostgres) -> None:
    primary, standby = replicated.primary, replicated.standbys[0]
    for order in ([primary, standby], [standby, primary]):
        url = replicated.multihost_url("postgres", nodes=order)
        assert url.render_as_string().count("host=127.0.0.1%3A") == 2
        assert server_port(url) == primary.port
        with psycopg.connect(replicated.multihost_conninfo(nodes=order)) as connection:
            assert connection.info.port == primary.port
    read_only = replicated.multihost_url("postgres", nodes=[primary, standby], target_session_attrs="read-only")
    assert server_port(read_only) == standby.port


def test_failover_promotes_a_standby_that_the_multihost_url_then_finds() -> None:
    require_postgres()
    with replicated_postgres(standbys=2) as topology:
        old, new, other = topology.nodes
        url = topology.multihost_url("postgres")
        assert server_port(url) == old.port
        old.query("CREATE TABLE failover (n int)")

        topology.stop(old)
        assert new.is_in_recovery()
        seconds = topology.promote(new)
        assert not new.is_in_recovery()
        assert topology.primary is new
        assert seconds < 10
        assert server_port(url) == new.port  # libpq skipped the stopped node

        topology.follow(other)  # the remaining standby streams from the new primary
        new.query("INSERT INTO failover VALUES (1)")
        topology.wait_for_replay(other)
        assert other.query("SELECT count(*) FROM failover")[0][0] == 1
        assert other.is_in_recovery()


def test_unplanned_failover_the_primary_vanishes_silently() -> None:
    """The primary is in a namespace and its standby streams from the namespace address:
    the primary's host "vanishes" (partition), the standby is promoted, and a multi-host
    URL with a connect timeout moves over. After the heal there are two primaries."""
    require_postgres()
    require_namespaces()
    with replicated_postgres(standbys=1, netns_nodes={0}) as topology:
        primary, standby = topology.nodes
        assert primary.netns is not None and standby.netns is None
        assert standby.query("SELECT sender_host FROM pg_stat_wal_receiver")[0][0] == primary.address
        primary.query("CREATE TABLE vanish (n int)")
        primary.query("INSERT INTO vanish VALUES (1)")
        topology.wait_for_replay(standby)

        primary.partition()
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="timeout expired"):
            psycopg.connect(primary.conninfo(connect_timeout=2))
        assert time.monotonic() - started < 3.5

        topology.promote(standby)
        url = topology.multihost_url("postgres", connect_timeout="2")
        started = time.monotonic()
        assert server_port(url) == standby.port
        assert time.monotonic() - started < 3.5  # at most one connect_timeout on the vanished node
        assert scalar(standby.url("postgres"), "SELECT count(*) FROM vanish") == 1

        primary.heal()  # split brain: the old primary never learned it was replaced
        assert not primary.is_in_recovery()
        assert server_port(url) == primary.port


# -- a server in a network namespace -------------------------------------------------------


def test_partition_makes_new_connections_time_out_and_heal_ends_it(netns_postgres: PgNode) -> None:
    assert netns_postgres.netns is not None
    assert scalar(netns_postgres.url("postgres"), "SELECT inet_server_addr()::text") == (
        f"{netns_postgres.netns.address}/32")
    netns_postgres.partition()
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="timeout expired"):
        psycopg.connect(netns_postgres.conninfo(connect_timeout=2))
    assert time.monotonic() - started < 3.5
    assert netns_postgres.query("SELECT 1") == [(1,)]  # the control socket is not cut off
    netns_postgres.heal()
    assert scalar(netns_postgres.url("postgres"), "SELECT 1") == 1


def test_partition_hangs_an_open_connection_unless_it_has_a_tcp_user_timeout(netns_postgres: PgNode) -> None:
    plain = psycopg.connect(netns_postgres.conninfo(), autocommit=True)
    guarded = psycopg.connect(netns_postgres.conninfo(**DEAD_PEER_DETECTION), autocommit=True)
    try:
        netns_postgres.partition()
        hanging = Pending(lambda: plain.execute("SELECT 42").fetchone())
        bounded = Pending(lambda: guarded.execute("SELECT 42").fetchone())
        with unblocked_at_exit([(hanging, plain.fileno()), (bounded, guarded.fileno())]):
            assert bounded.done(5), "tcp_user_timeout did not end the query"
            assert isinstance(bounded.error, psycopg.OperationalError)
            assert "Connection timed out" in str(bounded.error)
            assert bounded.seconds is not None and 1.5 < bounded.seconds < 4

            assert not hanging.done(max(0.0, 3 - (time.monotonic() - hanging.started))), "the query returned"
            assert time.monotonic() - hanging.started >= 3

            netns_postgres.heal()
            assert hanging.done(30), "the query did not finish after the heal"
            assert hanging.error is None and hanging.result == (42,)
    finally:
        plain.close()
        guarded.close()
    assert plain.closed and guarded.closed


def test_mariadb_partition_and_heal(netns_mariadb: NamespacedMariaDB) -> None:
    assert scalar(netns_mariadb.url("mysql"), "SELECT @@bind_address") == netns_mariadb.address
    arguments = {"host": netns_mariadb.address, "port": netns_mariadb.port, "user": "root", "autocommit": True}
    plain = pymysql.connect(**arguments)
    guarded = pymysql.connect(**arguments, read_timeout=2, write_timeout=2)

    def ask(connection: Any) -> Any:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 42")
            return cursor.fetchone()

    assert plain._sock is not None and guarded._sock is not None
    sockets = plain._sock.fileno(), guarded._sock.fileno()
    try:
        netns_mariadb.partition()
        hanging = Pending(lambda: ask(plain))
        bounded = Pending(lambda: ask(guarded))
        with unblocked_at_exit([(hanging, sockets[0]), (bounded, sockets[1])]):
            started = time.monotonic()  # meanwhile, a new connection
            with pytest.raises(pymysql.err.OperationalError, match="timed out"):
                pymysql.connect(**arguments, connect_timeout=2)
            assert time.monotonic() - started < 3.5

            assert bounded.done(5), "read_timeout did not end the query"
            assert isinstance(bounded.error, pymysql.err.OperationalError)
            assert bounded.error.args[0] == 2013  # Lost connection to MySQL server during query (timed out)
            assert not hanging.done(max(0.0, 3 - (time.monotonic() - hanging.started))), "the query returned"
            netns_mariadb.heal()
            assert hanging.done(30), "the query did not finish after the heal"
            assert hanging.error is None and hanging.result == (42,)
    finally:
        plain.close()
        if guarded.open:
            guarded.close()
    assert netns_mariadb.answers_over_network()


# -- PgBouncer -----------------------------------------------------------------------------


def repeat(connection: psycopg.Connection[Any], times: int = 10) -> None:
    for number in range(times):
        connection.execute("SELECT %s::int", [number])


def test_pgbouncer_lone_client_repeats_a_prepared_query(bouncer: PgBouncer) -> None:
    """Observed with PgBouncer 1.18 and psycopg 3: it *succeeds*. psycopg prepares the
    query on its 6th run (prepare_threshold=5) and PgBouncer, reusing server connections
    last-in first-out, hands a lone client the same server connection every time."""
    with psycopg.connect(bouncer.conninfo(), autocommit=True) as connection:
        assert connection.prepare_threshold == 5
        repeat(connection)


@pytest.mark.parametrize("prepare_threshold", [5, None], ids=["default", "never"])
def test_pgbouncer_transaction_pooling_and_prepared_statements(bouncer: PgBouncer,
                                                               prepare_threshold: int | None) -> None:
    """With two clients the server connection changes under a prepared statement."""
    first = psycopg.connect(bouncer.conninfo(), autocommit=True, prepare_threshold=prepare_threshold)
    holder = psycopg.connect(bouncer.conninfo(), prepare_threshold=prepare_threshold)
    later = psycopg.connect(bouncer.conninfo(), autocommit=True, prepare_threshold=prepare_threshold)
    try:
        repeat(first, 6)  # prepared as _pg3_0 on server connection A (when the threshold is 5)
        holder.execute("SELECT 1")  # an open transaction takes A: the next client gets B
        if prepare_threshold is None:
            repeat(first)
        else:
            with pytest.raises(errors.InvalidSqlStatementName, match='prepared statement "_pg3_0" does not exist'):
                repeat(first)
        holder.rollback()  # A is free again; "later" gets it and prepares its own _pg3_0 there
        if prepare_threshold is None:
            repeat(later)
        else:
            with pytest.raises(errors.DuplicatePreparedStatement,
                               match='prepared statement "_pg3_0" already exists'):
                repeat(later)
    finally:
        for connection in (first, holder, later):
            connection.close()


def test_pgbouncer_rejects_options_startup_parameter(bouncer: PgBouncer) -> None:
    with pytest.raises(psycopg.OperationalError, match="FATAL:  unsupported startup parameter: options$"):
        psycopg.connect(bouncer.conninfo(options="-c statement_timeout=1000"))
    url = bouncer.url("postgres").update_query_dict({"options": "-c statement_timeout=1000"})
    with pytest.raises(sqlalchemy.exc.OperationalError, match="unsupported startup parameter: options"):
        scalar(url, "SELECT 1")
    assert scalar(bouncer.url("postgres"), "SELECT 1") == 1


def test_pgbouncer_restart_cuts_clients_off(bouncer: PgBouncer) -> None:
    with psycopg.connect(bouncer.conninfo(), autocommit=True) as connection:
        connection.execute("SELECT 1")
        pid = bouncer.process.pid if bouncer.process else None
        bouncer.restart()
        assert bouncer.process is not None and bouncer.process.pid != pid
        with pytest.raises(psycopg.OperationalError):
            connection.execute("SELECT 1")
    assert scalar(bouncer.url("postgres"), "SELECT 1") == 1


# -- Patroni + etcd + HAProxy (issue 19) ---------------------------------------------------


def insert_through(port: int, database: str, note: str) -> bool:
    """One autocommit INSERT through a loopback port (HAProxy's): True once acknowledged."""
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=database, connect_timeout=2,
                             autocommit=True) as connection:
            connection.execute("INSERT INTO notes VALUES (%s)", [note])
        return True
    except psycopg.Error:
        return False


def notes(node: PgNode, database: str) -> list[str]:
    with psycopg.connect(node.conninfo(database), autocommit=True, connect_timeout=5) as connection:
        return [row[0] for row in connection.execute("SELECT note FROM notes ORDER BY note")]


def test_patroni_stack_has_one_leader_a_synchronous_replica_and_routes_by_role(patroni: PatroniCluster) -> None:
    started = patroni.timings["start"]
    print(f"\npatroni stack up in {started:.1f} s ({ {k: round(v, 1) for k, v in patroni.timings.items()} })")
    assert started < 30
    leader = patroni.leader()
    assert leader is not None
    (replica,) = patroni.replicas()
    assert {member["name"]: member["role"] for member in patroni.members()} == {
        leader: "leader", replica: "sync_standby"}
    assert {row["Member"]: row["Role"] for row in patroni.listing()} == {leader: "Leader", replica: "Sync Standby"}
    # What HAProxy's checks see, and where it sends each port.
    assert [patroni.node(leader).check("/primary"), patroni.node(replica).check("/primary")] == [200, 503]
    assert [patroni.node(leader).check("/replica"), patroni.node(replica).check("/replica")] == [503, 200]
    assert patroni.routes() == {"write": [leader], "read": [replica]}
    assert patroni.node(leader).pg.query("SHOW synchronous_standby_names") == [(replica,)]

    with patroni.database(migrated=False) as database:
        write, read = patroni.write_url(database), patroni.read_url(database)
        assert server_port(write) == patroni.node(leader).pg.port
        assert server_port(read) == patroni.node(replica).pg.port
        assert server_port(patroni.multihost_url(database)) == patroni.node(leader).pg.port
        assert patroni.multihost_url(database).render_as_string().count("host=127.0.0.1%3A") == 2
        engine = create_engine(write, poolclass=NullPool)
        try:
            with engine.begin() as connection:
                connection.execute(text("CREATE TABLE notes (note text)"))
                connection.execute(text("INSERT INTO notes VALUES ('through the write port')"))
        finally:
            engine.dispose()
        patroni.wait_for_replay()
        assert scalar(read, "SELECT string_agg(note, ',') FROM notes") == "through the write port"
        with pytest.raises(sqlalchemy.exc.InternalError, match="read-only transaction"):
            scalar(read, "INSERT INTO notes VALUES ('through the read port') RETURNING 1")


def test_patroni_switchover_moves_the_leader_and_the_write_port(patroni: PatroniCluster) -> None:
    old = patroni.leader()
    (new,) = patroni.replicas()
    seconds = patroni.switchover(new)  # patronictl switchover --leader old --candidate new --force
    print(f"\npatronictl switchover {old} -> {new}: write port on {new} after {seconds:.2f} s")
    assert seconds < TTL
    assert patroni.leader() == new and patroni.write_port_server() == patroni.node(new).pg.port
    rejoined = patroni.wait_for_replica_streaming(30)
    patroni.wait_for_routes()
    print(f"{old} streaming again as the synchronous standby {rejoined:.2f} s later")
    assert patroni.replicas() == [old] and patroni.routes() == {"write": [new], "read": [old]}


def test_patroni_fails_over_when_the_leaders_postgres_is_killed(patroni: PatroniCluster) -> None:
    """The leader's postmaster is killed with a commit in flight (its WAL on the leader
    only): Patroni elects the other node, HAProxy's write port follows, every
    acknowledged write is there and the unacknowledged one is not; the old leader comes
    back as a replica by pg_rewind."""
    with patroni.database(migrated=False) as database:
        old = patroni.leader()
        assert old is not None
        (new,) = patroni.replicas()
        write_port = patroni.haproxy.write_port
        with psycopg.connect(patroni.node(old).pg.conninfo(database), autocommit=True) as connection:
            connection.execute("CREATE TABLE notes (note text)")
        acknowledged = [f"before {number:02}" for number in range(20)]
        assert all(insert_through(write_port, database, note) for note in acknowledged)
        timeline = {member["name"]: member["timeline"] for member in patroni.members()}[old]
        rewinds = patroni.node(old).logged("pg_rewind: Done!")

        killed, killed_at = patroni.kill_leader_postgres(in_flight="INSERT INTO notes VALUES ('in flight')",
                                                         database=database)
        assert killed == old
        elected = Pending(lambda: patroni.wait_for_leader(TTL + LOOP_WAIT + 10, other_than=old))
        routed = Pending(lambda: wait_for(lambda: patroni.haproxy.servers_up("write") == [new],
                                          TTL + LOOP_WAIT + 10, f"HAProxy's write listener to {new}"))
        deadline = killed_at + TTL + LOOP_WAIT + 10
        while not insert_through(write_port, database, "after the failover") and time.monotonic() < deadline:
            time.sleep(0.05)
        writes_back = time.monotonic() - killed_at
        assert elected.done(TTL) and routed.done(TTL), (elected.error, routed.error, patroni.story())
        assert elected.error is None and elected.result == new, (elected.error, patroni.story())
        assert routed.error is None, routed.error
        assert elected.seconds is not None and routed.seconds is not None
        elected_after = elected.started + elected.seconds - killed_at
        routed_after = routed.started + routed.seconds - killed_at
        print(f"\nleader's postgres killed: {new} elected after {elected_after:.2f} s, HAProxy's write "
              f"listener on it alone after {routed_after:.2f} s, first write acknowledged through the write "
              f"port after {writes_back:.2f} s (goal: ttl + loop_wait + 2 = {TTL + LOOP_WAIT + 2} s)")
        assert writes_back < TTL + LOOP_WAIT + 2, patroni.story()
        assert elected_after < TTL + LOOP_WAIT

        # The history, judged on the new leader: every acknowledged write, not the other.
        on_new = notes(patroni.node(new).pg, database)
        assert [note for note in on_new if note.startswith("before")] == acknowledged
        assert "in flight" not in on_new and on_new.count("after the failover") == 1

        patroni.wait_for_replica_streaming(60)
        patroni.wait_for_routes()
        print(f"{old} streaming again as the synchronous standby {time.monotonic() - killed_at:.2f} s after "
              "the kill")
        assert patroni.node(old).logged("pg_rewind: Done!") == rewinds + 1, patroni.story()
        members = {member["name"]: member for member in patroni.members()}
        assert members[new]["timeline"] > timeline and members[old]["timeline"] == members[new]["timeline"]
        patroni.wait_for_replay()
        assert notes(patroni.node(old).pg, database) == on_new  # the rewind took 'in flight' away
