"""Scenario 15: a MariaDB Galera cluster (issue 12).

A real three-node cluster on loopback ports (tests/topology/galera.py), Galera's own
replication. The application runs in-process (Flask test clients, one app per node
where a test needs two nodes at once), so that each request's outcome is counted
exactly:

- conflicting edits of one post through two nodes: certification failures happen
  and are retried as whole units of work; the final post is what was acknowledged;
- a node isolated from the group (non-Primary, error 1047) while the app uses it:
  its connections are dropped, requests move to a ready node, no acknowledged write
  is lost, and the node serves again after it rejoins;
- a write through node A read through node B: causal reads (``wsrep_sync_wait``)
  see it every time; the negative control without them counts stale reads;
- a node killed and restarted under load.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import insert, select, text

from myapp.db import breaker as breaker_module
from myapp.db import db
from myapp.db import galera as galera_module
from myapp.db.breaker import Guards
from myapp.models import Post, User
from tests.support.apps import make_app
from tests.support.metrics import sample
from tests.support.relay import Relay, relay
from tests.topology import GaleraCluster, GaleraNode
from tests.topology.fixtures import galera, galera_session  # noqa: F401 (fixtures)

from .figures import record

pytestmark = [pytest.mark.faults]

PASSWORD = "correct horse battery"
POOL = {"DATABASE_POOL_SIZE": 3, "DATABASE_MAX_OVERFLOW": 2}


@pytest.fixture(scope="module")
def database(galera_session: GaleraCluster) -> Iterator[str]:
    """A migrated database on the cluster, shared by the module's tests."""
    with galera_session.database() as name:
        yield name


def cluster_app(cluster: GaleraCluster, database: str, *nodes: GaleraNode, mode: str = "pinned",
                **overrides: Any) -> Flask:
    return make_app(cluster.url(database, *nodes), DATABASE_GALERA=mode, **{**POOL, **overrides})


def logged_in(app: Flask, username: str) -> FlaskClient:
    client = app.test_client()
    client.post("/auth/register", data={"username": username, "password": PASSWORD})
    response = client.post("/auth/login", data={"username": username, "password": PASSWORD})
    assert response.status_code == 302, response.status_code
    return client


def new_post(client: FlaskClient, title: str) -> tuple[int, int | None]:
    """Publish a post; the status and, when acknowledged, the new post's id."""
    response = client.post("/posts/new", data={"title": title, "body": "body"})
    if response.status_code != 302:
        return response.status_code, None
    return 302, int(response.headers["Location"].rsplit("/", 1)[1])


def node_of(app: Flask) -> str:
    with app.app_context():
        status = app.extensions["myapp.database"].engine.connect()
        try:
            return str(status.connection.info[galera_module.NODE_KEY])
        finally:
            status.close()


def dispose(*apps: Flask) -> None:
    for app in apps:
        app.extensions["myapp.database"].engine.dispose()
        app.extensions["myapp.database"].probe_engine.dispose()


# -- connecting ------------------------------------------------------------------------


def test_pinned_connections_all_go_to_the_first_ready_node_and_spread_ones_to_every_node(
    galera: GaleraCluster, database: str
) -> None:
    first, second, third = galera.nodes
    pinned = cluster_app(galera, database, second, first, third)
    spread = cluster_app(galera, database, mode="spread")
    try:
        engines = {"pinned": pinned.extensions["myapp.database"].engine,
                   "spread": spread.extensions["myapp.database"].engine}
        reached: dict[str, Counter[str]] = {}
        for mode, engine in engines.items():
            connections = [engine.connect() for _ in range(5)]
            reached[mode] = Counter(c.connection.info[galera_module.NODE_KEY] for c in connections)
            # The server agrees: each connection's own port is the node it says.
            ports = Counter(f"127.0.0.1:{c.exec_driver_sql('SELECT @@port').scalar()}" for c in connections)
            assert ports == reached[mode]
            for connection in connections:
                connection.close()
        assert reached["pinned"] == Counter({second.address: 5})
        assert set(reached["spread"]) == {node.address for node in galera.nodes}
    finally:
        dispose(pinned, spread)


def test_readyz_and_db_status_show_the_node_its_state_and_the_cluster_size(
    galera: GaleraCluster, database: str
) -> None:
    app = cluster_app(galera, database, galera.nodes[1], galera.nodes[0])
    try:
        body = app.test_client().get("/readyz").get_json()
        assert body["status"] == "ready"
        assert sample("myapp_db_galera_node_state", node=galera.nodes[1].address) == 4  # Synced
        assert sample("myapp_db_galera_cluster_size") == 3
        assert body["galera"] == {"mode": "pinned", "node": galera.nodes[1].address, "state": "Synced",
                                  "cluster_status": "Primary", "cluster_size": 3, "ready": True}
        result = app.test_cli_runner().invoke(args=["db", "status"])
        assert result.exit_code == 0, result.output
        assert f"galera   node {galera.nodes[1].address} Synced, Primary component of 3 nodes (pinned)" in result.output
    finally:
        dispose(app)


def test_readyz_is_503_naming_the_node_when_no_listed_node_is_ready(galera: GaleraCluster, database: str) -> None:
    isolated = galera.nodes[2]
    app = cluster_app(galera, database, isolated)
    try:
        isolated.isolate()
        wait_for(lambda: not isolated.is_synced_in_primary(), 30, "the node to leave the Primary component")
        response = app.test_client().get("/readyz")
        assert response.status_code == 503
        reason = response.get_json()["reason"]
        assert "no Galera node is ready" in reason and isolated.address in reason and "non-Primary" in reason
        result = app.test_cli_runner().invoke(args=["db", "status"])
        assert result.exit_code == 1 and "no Galera node is ready" in result.output
        assert "Traceback" not in result.output
    finally:
        dispose(app)


# -- 1047: a node outside the Primary component -----------------------------------------


@pytest.mark.parametrize("galera_aware", [True, False], ids=["galera", "negative-control-plain-url"])
def test_a_connection_to_a_node_that_left_the_primary_component_is_never_handed_out_again(
    galera: GaleraCluster, database: str, galera_aware: bool
) -> None:
    """A pooled connection to a node that becomes non-Primary: the check at checkout
    drops it (and every older one), and the request is served by another node. The
    control connects by a plain URL to that one node, with no Galera handling: the
    pool hands the same dead-in-all-but-name connection out again and again."""
    isolated, other = galera.nodes[2], galera.nodes[0]
    if galera_aware:
        app = cluster_app(galera, database, isolated, other)
    else:
        app = make_app(isolated.url(database), **POOL)
    try:
        client = app.test_client()
        assert client.get("/").status_code == 200
        isolated.isolate()
        wait_for(lambda: not isolated.is_synced_in_primary(), 30, "the node to leave the Primary component")
        statuses = [client.get("/").status_code for _ in range(10)]
        if galera_aware:
            assert statuses == [200] * 10
            assert node_of(app) == other.address
        else:
            assert statuses == [503] * 10
    finally:
        dispose(app)


def test_1047_in_the_middle_of_a_request_drops_the_connection_and_the_next_request_moves(
    galera: GaleraCluster, database: str
) -> None:
    isolated, other = galera.nodes[2], galera.nodes[1]
    app = cluster_app(galera, database, isolated, other)
    db = app.extensions["myapp.database"]
    try:
        with app.app_context():
            from myapp.db import db as database_layer

            session = database_layer.session
            session.execute(select(User.id).limit(1))
            held = session.connection().connection.dbapi_connection
            isolated.isolate()
            wait_for(lambda: not isolated.is_synced_in_primary(), 30, "the node to leave the Primary component")
            with pytest.raises(Exception) as failure:
                session.execute(select(User.id).limit(1))
            assert "1047" in str(failure.value)
            assert getattr(failure.value, "connection_invalidated", False)
        assert db.engine.pool.checkedout() == 0
        with db.engine.connect() as connection:
            assert connection.connection.dbapi_connection is not held
            assert connection.connection.info[galera_module.NODE_KEY] == other.address
    finally:
        dispose(app)


# -- certification conflicts ------------------------------------------------------------

EDITS = 1000


@dataclass
class EditLog:
    acknowledged: list[tuple[int, str]] = field(default_factory=list)  # (version read, title)
    conflicts: int = 0
    other: Counter[int] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


_VERSION = re.compile(r'name="version" type="hidden" value="(\d+)"')


def edit_loop(client: FlaskClient, post_id: int, count: int, label: str, log: EditLog) -> None:
    for n in range(count):
        form = client.get(f"/posts/{post_id}/edit")
        if form.status_code != 200:
            with log.lock:
                log.other[form.status_code] += 1
            continue
        match = _VERSION.search(form.get_data(as_text=True))
        assert match, "no version in the edit form"
        version, title = int(match.group(1)), f"{label} {n}"
        response = client.post(f"/posts/{post_id}/edit", data={"title": title, "body": title, "version": version})
        with log.lock:
            if response.status_code == 302:
                log.acknowledged.append((version, title))
            elif response.status_code == 409:
                log.conflicts += 1
            else:
                log.other[response.status_code] += 1


def cert_failures(cluster: GaleraCluster) -> int:
    return sum(int(node.status("wsrep_local_cert_failures") or 0) for node in cluster.nodes)


def test_conflicting_edits_through_two_nodes_end_as_acknowledged(galera: GaleraCluster, database: str) -> None:
    """1,000 edits of one post, half through node 1 and half through node 2, at once.
    Galera aborts one of two overlapping commits at certification (1213); the retried
    unit re-reads the post and answers 409 if the other save won. Every acknowledged
    edit was made on the version it read, so acknowledged versions are all different
    and the post's final version counts them."""
    first, second = galera.nodes[0], galera.nodes[1]
    apps = [cluster_app(galera, database, first), cluster_app(galera, database, second)]
    try:
        author = logged_in(apps[0], "editor")
        other_client = apps[1].test_client()
        with author.session_transaction() as cookie:
            user_id = cookie["user_id"]
        with other_client.session_transaction() as cookie:
            cookie["user_id"] = user_id
        status, post_id = new_post(author, "to be edited")
        assert post_id is not None
        failures_before = cert_failures(galera)
        log = EditLog()
        threads = [threading.Thread(target=edit_loop, args=(client, post_id, EDITS // 2, label, log))
                   for client, label in ((author, "one"), (other_client, "two"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        conflicts_certified = cert_failures(galera) - failures_before
        versions = [version for version, _ in log.acknowledged]
        final = first.query(f"SELECT version, title FROM {database}.post WHERE id = %s", post_id)[0]
        last_title = dict(log.acknowledged)[final[0] - 1]
        record("15 galera", "mysql", f"{EDITS} edits of one post through two nodes",
               "certification failures", conflicts_certified, "> 0", conflicts_certified > 0)
        record("15 galera", "mysql", f"{EDITS} edits of one post through two nodes",
               "5xx answers", sum(n for code, n in log.other.items() if code >= 500), "0", not log.other)
        assert not log.other, log.other
        assert len(log.acknowledged) + log.conflicts == EDITS
        assert conflicts_certified > 0, "no certification conflict happened: the test proved nothing"
        assert len(set(versions)) == len(versions), "two acknowledged edits were made on the same version"
        assert final[0] == 1 + len(log.acknowledged)
        assert final[1] == last_title
    finally:
        dispose(*apps)


def galera_aborts(cluster: GaleraCluster) -> int:
    """Transactions Galera aborted, each a 1213 its client has to retry: failed
    certification, or killed by a replicated write set that won (a brute-force abort)."""
    return sum(int(node.status(name) or 0) for node in cluster.nodes
               for name in ("wsrep_local_cert_failures", "wsrep_local_bf_aborts"))


def test_failed_logins_counted_through_two_nodes_add_up(galera: GaleraCluster, database: str) -> None:
    """The rate-limit storage's upsert of one counter through two nodes at once: the
    stored count equals the failed logins, though Galera aborted some of them.

    Three clients per node; rounds of 50 attempts per client go on until Galera aborted
    at least one upsert (at most 8 rounds): on a busy machine the clients overlap less."""
    apps = [cluster_app(galera, database, node, RATELIMIT_ENABLED=True, LOGIN_RATE_LIMIT="10000 per hour",
                        LOGIN_RATE_LIMIT_PER_ADDRESS="10000 per hour") for node in galera.nodes[:2]]
    per_round, clients_per_node, max_rounds = 50, 3, 8
    answers: Counter[int] = Counter()
    lock = threading.Lock()

    def fail_logins(app: Flask) -> None:
        client = app.test_client()
        for _ in range(per_round):
            status = client.post("/auth/login", data={"username": "nobody-here", "password": "wrong password!"}).status_code
            with lock:
                answers[status] += 1

    try:
        aborts_before = galera_aborts(galera)
        rounds = 0
        while rounds < max_rounds and (rounds == 0 or galera_aborts(galera) == aborts_before):
            rounds += 1
            threads = [threading.Thread(target=fail_logins, args=(app,)) for app in apps for _ in range(clients_per_node)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=600)
        attempts = len(apps) * clients_per_node * per_round * rounds
        counts = galera.nodes[0].query(f"SELECT `key`, count FROM {database}.rate_limit")
        aborted = galera_aborts(galera) - aborts_before
        record("15 galera", "mysql", f"failed logins through two nodes, {clients_per_node} clients each",
               "upserts Galera aborted (retried)", aborted, "> 0", aborted > 0)
        assert answers == Counter({200: attempts})
        per_username = [count for key, count in counts if "nobody-here" in key]
        assert per_username == [attempts]
        assert aborted > 0, f"Galera aborted no upsert in {attempts} attempts: the test proved nothing"
    finally:
        dispose(*apps)


# -- causal reads -----------------------------------------------------------------------

READS = 1000


@pytest.mark.parametrize("sync_wait", [1, 0], ids=["causal", "negative-control-no-sync-wait"])
def test_a_post_written_through_one_node_is_read_through_another(
    galera: GaleraCluster, database: str, sync_wait: int
) -> None:
    """1,000 times each: a post published through the app on node A, then read through
    the app on node B (HTTP-like, with the redirect in between), and a row committed by
    A's engine read at once by B's (no time in between: where the lag shows). With
    ``wsrep_sync_wait=1`` neither is ever stale; without it the tight loop is."""
    writer_node, reader_node = galera.nodes[0], galera.nodes[1]
    writer_app = cluster_app(galera, database, writer_node)
    reader_app = cluster_app(galera, database, reader_node, DATABASE_GALERA_SYNC_WAIT=sync_wait)
    try:
        writer = logged_in(writer_app, f"causal{sync_wait}")
        reader = reader_app.test_client()
        stale_pages = 0
        for n in range(READS):
            status, post_id = new_post(writer, f"causal {n}")
            assert status == 302
            page = reader.get(f"/posts/{post_id}")
            assert page.status_code in (200, 404)
            stale_pages += page.status_code == 404
        with writer.session_transaction() as cookie:
            author_id = cookie["user_id"]
        writer_engine = writer_app.extensions["myapp.database"].engine
        reader_engine = reader_app.extensions["myapp.database"].engine
        stale_rows = 0
        with writer_engine.connect() as writing, reader_engine.connect() as reading:
            for n in range(READS):
                post_id = writing.execute(
                    insert(Post).values(author_id=author_id, title=f"tight {n}", body="b", version=1)
                ).inserted_primary_key[0]
                writing.commit()
                stale_rows += reading.scalar(select(Post.id).where(Post.id == post_id)) is None
                reading.rollback()  # a new snapshot for the next read
        label = "wsrep_sync_wait=1" if sync_wait else "wsrep_sync_wait=0 (control)"
        goal = "0" if sync_wait else "any (control)"
        injected = f"{READS} posts written on node A, read on node B, {label}"
        record("15 galera", "mysql", injected, "stale pages (read after the redirect)", stale_pages, goal,
               stale_pages == 0 or not sync_wait)
        record("15 galera", "mysql", injected, "stale rows (read at once after the commit)", stale_rows,
               "0" if sync_wait else "> 0 (control)", stale_rows == 0 if sync_wait else stale_rows > 0)
        print(f"{label}: {stale_pages} stale pages, {stale_rows} stale rows of {READS}")
        if sync_wait:
            assert stale_pages == 0 and stale_rows == 0
        else:
            assert stale_rows > 0, f"no stale read in {READS} without causal reads: the control did not show the lag"
    finally:
        dispose(writer_app, reader_app)


# -- a node isolated or killed under load -----------------------------------------------


@dataclass
class Load:
    """Writers publishing posts in a loop; what was acknowledged and what failed."""

    app: Flask
    writers: int = 2
    acknowledged: list[int] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for n in range(self.writers):
            client = logged_in(self.app, f"load{n}-{time.monotonic_ns()}")
            thread = threading.Thread(target=self._write, args=(client, n), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _write(self, client: FlaskClient, n: int) -> None:
        count = 0
        while not self.stop.is_set() and count < 5000:
            count += 1
            status, post_id = new_post(client, f"load {n}.{count}")
            with self.lock:
                self.statuses[status] += 1
                if post_id is not None:
                    self.acknowledged.append(post_id)
            time.sleep(0.01)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def failures(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 302)


def missing_posts(node: GaleraNode, database: str, ids: list[int]) -> int:
    present = {row[0] for row in node.query(f"SELECT id FROM {database}.post")}
    return len(set(ids) - present)


def test_requests_move_off_an_isolated_node_and_come_back_after_it_rejoins(
    galera: GaleraCluster, database: str
) -> None:
    isolated, first, _ = galera.nodes
    app = cluster_app(galera, database, isolated, first)
    load = Load(app)
    try:
        load.start()
        time.sleep(1.0)
        before = sum(load.statuses.values())
        isolated.isolate()
        wait_for(lambda: not isolated.is_synced_in_primary(), 30, "the node to leave the Primary component")
        time.sleep(2.0)
        moved_to = node_of(app)
        isolated.rejoin()
        isolated.wait_until_synced()
        time.sleep(1.0)
        load.finish()
        # Back: new connections prefer the first listed node again.
        dispose(app)
        back_on = node_of(app)
        lost = missing_posts(first, database, load.acknowledged)
        lost_on_rejoined = missing_posts(isolated, database, load.acknowledged)
        record("15 galera", "mysql", "the pinned node isolated from the group under load (gmcast.isolate)",
               "failed requests", load.failures(), f"<= {POOL['DATABASE_POOL_SIZE'] + POOL['DATABASE_MAX_OVERFLOW']}"
               " (one per pooled connection)", load.failures() <= 5)
        record("15 galera", "mysql", "the pinned node isolated from the group under load (gmcast.isolate)",
               "acknowledged writes lost", lost + lost_on_rejoined, "0", lost + lost_on_rejoined == 0)
        assert before > 0 and len(load.acknowledged) > before
        assert set(load.statuses) <= {302, 503}, load.statuses
        assert load.failures() <= POOL["DATABASE_POOL_SIZE"] + POOL["DATABASE_MAX_OVERFLOW"], (
            f"{dict(load.statuses)}\n{galera.story()}")
        assert moved_to == first.address
        assert back_on == isolated.address
        assert lost == 0 and lost_on_rejoined == 0
    finally:
        load.finish()
        dispose(app)


@pytest.mark.parametrize(
    ("mode", "how"),
    [("spread", "kill"), ("pinned", "restart")],
    ids=["spread-one-node-killed", "pinned-writer-restarted"],
)
def test_a_node_stopped_and_started_again_under_load(
    galera: GaleraCluster, database: str, mode: str, how: str
) -> None:
    """A crash (SIGKILL) of one node under spread connections, or a clean restart
    (SIGTERM) of the pinned writer node: at most the requests on pooled connections to
    it fail (a 503), the others move to a ready node; the node rejoins by IST with
    every acknowledged post, and serves again."""
    stopped = galera.nodes[1] if how == "kill" else galera.nodes[0]
    app = cluster_app(galera, database, mode=mode)
    load = Load(app)
    injected = ("one node of three killed (SIGKILL), spread connections" if how == "kill"
                else "the pinned writer node restarted (SIGTERM)") + ", under load"
    try:
        load.start()
        time.sleep(1.0)
        stopped.kill() if how == "kill" else stopped.stop()
        # Down until the others have dropped it from the group (a crash is noticed after
        # Galera's 5 s suspect timeout): a node that comes back before that meets its
        # own ghost in the view, and the survivors fall out of the Primary component.
        wait_for(lambda: galera.size() == 2, 30, "the others to drop the stopped node")
        time.sleep(1.0)
        while_down = galera.story(120)
        log_before = len(stopped.log.read_bytes())
        restarted = time.monotonic()
        stopped.start()
        rejoin_log = stopped.log.read_bytes()[log_before:].decode(errors="replace")
        rejoin_seconds = time.monotonic() - restarted
        time.sleep(1.0)
        load.finish()
        dispose(app)
        engine = app.extensions["myapp.database"].engine
        connections = [engine.connect() for _ in range(3)]
        reached = {c.connection.info[galera_module.NODE_KEY] for c in connections}
        for connection in connections:
            connection.close()
        lost = sum(missing_posts(node, database, load.acknowledged) for node in galera.nodes)
        bound = POOL["DATABASE_POOL_SIZE"] + POOL["DATABASE_MAX_OVERFLOW"]
        record("15 galera", "mysql", injected, "failed requests", load.failures(),
               f"<= {bound} (one per pooled connection)", load.failures() <= bound)
        record("15 galera", "mysql", injected, "acknowledged writes lost", lost, "0", lost == 0)
        record("15 galera", "mysql", injected, "seconds to rejoin (IST)", round(rejoin_seconds, 1), "< 90",
               rejoin_seconds < 90)
        assert set(load.statuses) <= {302, 503}, load.statuses
        assert load.failures() <= bound, f"{dict(load.statuses)}\n{while_down}"
        assert len(load.acknowledged) > 100
        assert lost == 0
        assert stopped.address in reached
        # From its own last position, by incremental state transfer, not a full copy.
        assert "Receiving IST" in rejoin_log, rejoin_log[-2000:]
    finally:
        load.finish()
        dispose(app)


def test_killed_connections_on_every_node_are_replaced(galera: GaleraCluster, database: str) -> None:
    """Scenario 2 on the cluster: every connection of the app, on every node, ended by
    ``KILL CONNECTION`` between requests; the pre-ping replaces them before a view sees
    one."""
    app = cluster_app(galera, database, mode="spread")
    try:
        engine = app.extensions["myapp.database"].engine
        held = [engine.connect() for _ in range(POOL["DATABASE_POOL_SIZE"])]  # one per node and more
        assert len({c.connection.info[galera_module.NODE_KEY] for c in held}) == 3
        for connection in held:
            connection.close()
        killed = 0
        for node in galera.nodes:
            for (thread_id,) in node.query(
                "SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()", database
            ):
                node.query(f"KILL CONNECTION {int(thread_id)}")
                killed += 1
        client = app.test_client()
        statuses = Counter(client.get("/").status_code for _ in range(30))
        record("15 galera", "mysql", f"KILL CONNECTION on every app connection ({killed}) on every node",
               "failures in next 30 requests", 30 - statuses[200], "0", statuses[200] == 30)
        assert killed >= POOL["DATABASE_POOL_SIZE"]
        assert statuses == Counter({200: 30})
    finally:
        dispose(app)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -- a breaker per node (issue 19) ------------------------------------------------------------------

THRESHOLD = 3  # DATABASE_BREAKER_THRESHOLD's default


def _two_node_app(cluster: GaleraCluster, database: str, first: Relay) -> Flask:
    """A cluster URL whose first node is a relay to node 1, the second node 2; a route
    that reads, waits, and reads again."""
    url = cluster.nodes[0].url(database).set(port=first.port).update_query_dict({"host": cluster.nodes[1].address})
    app = make_app(url, PROPAGATE_EXCEPTIONS=False, DATABASE_GALERA="pinned", DATABASE_GALERA_SYNC_WAIT=0,
                   DATABASE_NETWORK_TIMEOUT=1, DATABASE_CONNECT_TIMEOUT=1, DATABASE_BREAKER_RESET=30,
                   DATABASE_POOL_SIZE=THRESHOLD)
    entered, resume = threading.Barrier(THRESHOLD + 1), threading.Event()

    @app.get("/_test/read-wait-read")
    def read_wait_read() -> str:
        db.session.execute(text("SELECT 1"))
        entered.wait(10)
        resume.wait(10)
        db.session.execute(text("SELECT 2"))  # on a node gone silent meanwhile
        return "ok"

    app.extensions["test.pause"] = (entered, resume)
    return app


def _statements_lost_on_the_first_node(app: Flask, first: Relay) -> list[int]:
    """THRESHOLD requests hold connections to node 1 when it goes silent under their
    second statement; then two more requests."""
    entered, resume = app.extensions["test.pause"]
    with ThreadPoolExecutor(THRESHOLD) as pool:
        futures = [pool.submit(lambda: app.test_client().get("/_test/read-wait-read").status_code)
                   for _ in range(THRESHOLD)]
        entered.wait(10)
        first.silent.set()
        resume.set()
        lost = [future.result(timeout=30) for future in futures]
    return lost + [app.test_client().get("/").status_code for _ in range(2)]


def test_lost_connections_on_one_node_open_its_breaker_and_the_next_node_serves(
    galera: GaleraCluster, database: str  # noqa: F811
) -> None:
    """Three slow failures on one node open its breaker, never the cluster's (they
    used to); the next requests go to the other node."""
    with relay(("127.0.0.1", galera.nodes[0].port)) as first:
        app = _two_node_app(galera, database, first)
        state = app.extensions["myapp.database"]
        node_breaker = state.feature(galera_module.Galera).node_breakers[f"127.0.0.1:{first.port}"]
        try:
            pages = _statements_lost_on_the_first_node(app, first)
            assert pages == [503] * THRESHOLD + [200, 200], pages
            assert node_breaker.state == "open" and state.feature(Guards).breaker.state == "closed"
            ready = app.test_client().get("/readyz")
            assert ready.status_code == 200
            breakers = ready.json["breakers"]  # type: ignore[index]
            assert breakers["primary"]["state"] == "closed"
            assert breakers[f"galera 127.0.0.1:{first.port}"]["state"] == "open"
            assert breakers[f"galera {galera.nodes[1].address}"]["state"] == "closed"
        finally:
            dispose(app)


def test_negative_control_counted_for_the_cluster_they_refuse_what_another_node_could_serve(
    galera: GaleraCluster, database: str, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    monkeypatch.setattr(breaker_module, "counts_only_connects", lambda state: False)
    monkeypatch.setattr(galera_module, "_count_node_failure", lambda breakers, context: None)
    with relay(("127.0.0.1", galera.nodes[0].port)) as first:
        app = _two_node_app(galera, database, first)
        try:
            pages = _statements_lost_on_the_first_node(app, first)
            assert app.extensions["myapp.database"].feature(Guards).breaker.state == "open"
            assert pages == [503] * (THRESHOLD + 2), pages
        finally:
            dispose(app)
