"""Read replicas (issue 11), in process against a real primary and streaming standbys
(tests/topology): where reads land, read-your-writes over a lagging standby, the
statements that must stay on the primary, sessions that refuse writes, recovery
conflicts, a standby that goes away, and what the operator sees.

Which server served a read is asked of the connection that served it
(``pg_is_in_recovery()``), and the ``X-Read-From`` header is checked against that.
Every scenario has a negative control that shows the check catching the fault.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from flask import Flask, session as cookie
from flask.testing import FlaskClient
from sqlalchemy import delete, func, select, text
from sqlalchemy.engine import URL

from myapp.config import ConfigError
from myapp.db import ReplicaWriteError, db, routing, sticking
from myapp.db.breaker import Guards
from myapp.db.config import parse_max_lag
from myapp.db.replicas import ReplicaSet
from myapp.db.replication import Replicas
from myapp.models import Post, RateLimit, User
from tests.support.apps import make_app
from tests.support.forms import textareas
from tests.support.metrics import Delta, exists, sample
from tests.topology import PgNode, ReplicatedPostgres
from tests.topology.postgres import replicated_postgres
from tests.topology.fixtures import (  # noqa: F401 (fixtures)
    replicated, replicated2, replicated2_session, replicated_session,
)

PASSWORD = "correct horse"


# -- helpers, also used by tests/faults/test_replicas.py -----------------------------------


def replica_urls(topology: ReplicatedPostgres, database: URL, standbys: list[PgNode] | None = None) -> str:
    return ",".join(
        standby.url(str(database.database)).render_as_string(hide_password=False)
        for standby in (topology.standbys if standbys is None else standbys)
    )


def replicas_of(app: Flask) -> ReplicaSet:
    replicas = app.extensions["myapp.database"].feature(Replicas)
    assert replicas is not None
    return replicas.replica_set  # type: ignore[no-any-return]


def wait_until(condition: Any, timeout: float, what: str, interval: float = 0.02) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - started


def dispose(app: Flask) -> None:
    state = app.extensions["myapp.database"]
    state.engine.dispose()
    if state.feature(Replicas) is not None:
        state.feature(Replicas).replica_set.dispose()


@contextmanager
def replica_app(topology: ReplicatedPostgres, database: URL, standbys: list[PgNode] | None = None,
                **config: Any) -> Iterator[Flask]:
    """The app on the topology's primary, reading from its standbys; checked once."""
    settings: dict[str, Any] = {
        "DATABASE_REPLICA_URLS": replica_urls(topology, database, standbys),
        "DATABASE_REPLICA_CHECK_INTERVAL": 0.2,
        "DATABASE_READ_FROM_HEADER": True,
        **config,
    }
    app = make_app(database, **settings)
    app.config["PROPAGATE_EXCEPTIONS"] = False
    _add_probe_routes(app)
    try:
        if settings["DATABASE_REPLICA_URLS"]:
            replicas_of(app).check()
        yield app
    finally:
        dispose(app)


def _add_probe_routes(app: Flask) -> None:
    @app.get("/_test/where")
    def where() -> dict[str, Any]:
        """An ORM read and the question "are you a standby?", on the same session."""
        db.session.scalar(select(func.count()).select_from(User))
        return {"standby": db.session.scalar(text("SELECT pg_is_in_recovery()"))}


def in_recovery(client: FlaskClient, path: str = "/_test/where") -> tuple[bool, str]:
    response = client.get(path)
    assert response.status_code == 200, response.text
    return bool(response.json["standby"]), response.headers["X-Read-From"]  # type: ignore[index]


def register_and_login(client: FlaskClient, username: str) -> None:
    assert client.post("/auth/register", data={"username": username, "password": PASSWORD}).status_code == 302
    assert client.post("/auth/login", data={"username": username, "password": PASSWORD}).status_code == 302


def publish(client: FlaskClient, title: str) -> str:
    response = client.post("/posts/new", data={"title": title, "body": "body of " + title})
    assert response.status_code == 302, response.text
    return str(response.headers["Location"])


def empty_tables(topology: ReplicatedPostgres, database: URL) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine(database, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            for table in (Post, RateLimit, User):
                connection.execute(delete(table))
    finally:
        engine.dispose()
    for standby in topology.standbys:
        if standby.running:
            topology.wait_for_replay(standby)


@pytest.fixture(scope="module")
def database(replicated_session: ReplicatedPostgres) -> Iterator[URL]:
    """A migrated database on the primary of the one-standby topology, replicated."""
    with replicated_session.replayed_database() as url:
        yield url


@pytest.fixture(scope="module")
def database2(replicated2_session: ReplicatedPostgres) -> Iterator[URL]:
    with replicated2_session.replayed_database() as url:
        yield url


@pytest.fixture
def topology(replicated: ReplicatedPostgres, database: URL) -> Iterator[ReplicatedPostgres]:
    yield replicated
    replicated.reset()
    empty_tables(replicated, database)


@pytest.fixture
def topology2(replicated2: ReplicatedPostgres, database2: URL) -> Iterator[ReplicatedPostgres]:
    yield replicated2
    replicated2.reset()
    empty_tables(replicated2, database2)


# -- where reads land ------------------------------------------------------------------------


def test_reads_land_on_the_replica(topology: ReplicatedPostgres, database: URL) -> None:
    delta = Delta()
    with replica_app(topology, database) as app:
        client = app.test_client()
        answers = [in_recovery(client) for _ in range(100)]
    on_standby = sum(standby for standby, _ in answers)
    assert on_standby > 90, f"only {on_standby} of 100 reads were served by the standby"
    # The metrics count each read where it went, and time it on that server.
    assert delta("myapp_db_reads_total", target="replica_1", reason="replica") >= on_standby
    assert delta("myapp_db_statement_duration_seconds_count", server="replica_1") >= on_standby
    # The header tells the truth about the connection that served the reads.
    assert all((header == "replica 1") == standby for standby, header in answers)


def test_negative_control_without_replicas_every_read_is_on_the_primary(
    topology: ReplicatedPostgres, database: URL
) -> None:
    with replica_app(topology, database, standbys=[]) as app:
        client = app.test_client()
        answers = [client.get("/_test/where") for _ in range(20)]
        assert not any(answer.json["standby"] for answer in answers)  # type: ignore[index]
        # With none configured nothing changes: no header, no routing listener, no cookie.
        assert all("X-Read-From" not in answer.headers for answer in answers)
        assert app.extensions["myapp.database"].feature(Replicas) is None
        register_and_login(client, "norep")
        publish(client, "no replicas")
        with client.session_transaction() as kept:
            assert sticking.KEY not in kept


def test_a_request_holds_one_replica_and_one_primary_connection(topology: ReplicatedPostgres, database: URL) -> None:
    with replica_app(topology, database) as app:
        seen: dict[str, Any] = {}

        @app.get("/_test/read-write-read")
        def read_write_read() -> str:
            seen["before"] = db.session.scalar(text("SELECT pg_is_in_recovery()"))
            with db.transaction() as session:
                session.add(User(username="rwr", password_hash="x"))
            seen["after"] = db.session.scalar(text("SELECT pg_is_in_recovery()"))
            seen["primary_pids"] = {db.session.scalar(text("SELECT pg_backend_pid()")) for _ in range(3)}
            return "ok"

        pools = [app.extensions["myapp.database"].engine.pool, replicas_of(app).replicas[0].engine.pool]
        most = [0, 0]

        def watch(index: int) -> Any:
            def checked_out(*args: Any) -> None:
                most[index] = max(most[index], pools[index].checkedout())  # type: ignore[attr-defined]
            return checked_out

        from sqlalchemy import event

        for index, pool in enumerate(pools):
            event.listen(pool, "checkout", watch(index))
        response = app.test_client().get("/_test/read-write-read")
        assert response.text == "ok" and response.headers["X-Read-From"] == "replica 1, primary"
        assert seen["before"] is True and seen["after"] is False  # after the write: the primary
        assert len(seen["primary_pids"]) == 1
        assert most == [1, 1]
        assert all(pool.checkedout() == 0 for pool in pools)  # type: ignore[attr-defined]


# -- what stays on the primary -------------------------------------------------------------


def test_locks_units_of_work_writes_and_use_primary_read_from_the_primary(
    topology: ReplicatedPostgres, database: URL
) -> None:
    with replica_app(topology, database) as app:
        seen: dict[str, Any] = {}
        recovery = text("SELECT pg_is_in_recovery()")

        @app.get("/_test/primary-cases")
        def primary_cases() -> str:
            seen["plain"] = db.session.scalar(recovery)
            with db.use_primary():
                seen["use_primary"] = db.session.scalar(recovery)
            seen["plain_again"] = db.session.scalar(recovery)
            with db.transaction() as session:
                seen["in_transaction"] = session.scalar(recovery)
            seen["after_read_only_unit"] = db.session.scalar(recovery)
            # A row lock: stopped on the replica before it is sent, run on the primary in
            # the unit's transaction, which later reads join.
            db.session.execute(select(User.id).with_for_update())
            seen["after_lock"] = db.session.scalar(recovery)
            db.session.rollback()
            return "ok"

        @app.get("/_test/decorated")
        @db.use_primary()
        def decorated() -> dict[str, Any]:
            return {"standby": db.session.scalar(recovery)}

        @app.get("/_test/text-write")
        def text_write() -> dict[str, Any]:
            before = db.session.scalar(recovery)
            db.session.execute(text("INSERT INTO \"user\" (username, password_hash, created_at) "
                                    "VALUES ('textwrite', 'x', now())"))
            inside = db.session.scalar(recovery)
            db.session.commit()
            return {"before": before, "inside": inside, "after": db.session.scalar(recovery)}

        client = app.test_client()
        delta = Delta()
        assert client.get("/_test/primary-cases").text == "ok"
        assert delta("myapp_db_reads_total", target="primary", reason="use_primary") == 1
        assert delta("myapp_db_reads_total", target="primary", reason="write_unit") >= 2
        assert seen == {
            "plain": True, "use_primary": False, "plain_again": True, "in_transaction": False,
            "after_read_only_unit": True, "after_lock": False,
        }
        assert client.get("/_test/decorated").json == {"standby": False}
        # A write through text() in a GET: re-run on the primary; the session stays there.
        assert client.get("/_test/text-write").json == {"before": True, "inside": False, "after": False}
        with app.app_context(), db.use_primary():
            assert db.session.scalar(select(func.count()).where(User.username == "textwrite")) == 1


def test_commands_read_from_the_primary_unless_they_opt_in(topology: ReplicatedPostgres, database: URL) -> None:
    with replica_app(topology, database) as app:
        with app.app_context():
            assert db.session.scalar(text("SELECT pg_is_in_recovery()")) is False
            with db.replica_session() as session:
                assert session.scalar(text("SELECT pg_is_in_recovery()")) is True


# -- read-your-writes ------------------------------------------------------------------------


def _delay_replay(topology: ReplicatedPostgres, standby: PgNode, delay: str) -> None:
    topology.set_standby_setting(standby, "recovery_min_apply_delay", delay)
    wait_until(lambda: standby.query("SHOW recovery_min_apply_delay")[0][0] == delay, 5, "the delay to apply")
    time.sleep(0.3)  # the startup process reads the reload too


def _writer_sees_own_posts(app: Flask, rounds: int) -> dict[str, Any]:
    """One user posts and at once loads the index and the post page, ``rounds`` times; a
    second user loads the index in the same window."""
    writer, other = app.test_client(), app.test_client()
    register_and_login(writer, "writer")
    missed, other_served, other_stale = 0, [], 0
    for number in range(rounds):
        title = f"fresh post {number}"
        location = publish(writer, title)
        index = writer.get("/")
        page = writer.get(location)
        missed += (title not in index.text) + (page.status_code != 200 or title not in page.text)
        if number % 20 == 0:
            seen = other.get("/")
            other_served.append(seen.headers["X-Read-From"])
            other_stale += title not in seen.text
    return {"missed": missed, "other_served": other_served, "other_stale": other_stale}


def test_read_your_writes_over_a_lagging_standby(topology: ReplicatedPostgres, database: URL) -> None:
    standby = topology.standbys[0]
    _delay_replay(topology, standby, "2s")
    delta = Delta()
    with replica_app(topology, database) as app:
        outcome = _writer_sees_own_posts(app, 200)
    assert outcome["missed"] == 0, f"the writer missed their own post {outcome['missed']} times in 400 reads"
    assert delta("myapp_db_reads_total", target="primary", reason="sticky") > 0
    # Everyone else keeps reading from the standby, which does not have the post yet.
    assert outcome["other_served"] == ["replica 1"] * 10
    assert outcome["other_stale"] == 10


def test_negative_control_without_the_wal_position_the_writer_reads_stale_pages(
    topology: ReplicatedPostgres, database: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    standby = topology.standbys[0]
    _delay_replay(topology, standby, "2s")
    monkeypatch.setattr(sticking, "required_lsn", lambda: None)
    with replica_app(topology, database) as app:
        outcome = _writer_sees_own_posts(app, 20)
    assert outcome["missed"] > 20, f"only {outcome['missed']} stale reads of 40 without the check"


def test_the_position_is_kept_until_every_replica_has_replayed_it(
    topology2: ReplicatedPostgres, database2: URL
) -> None:
    """GitLab #413203: a user unstuck when one replica caught up reads stale pages from
    another. Here one standby is paused: the writer's reads go to the other one, and the
    position stays in the cookie until the paused one has replayed it too."""
    first, second = topology2.standbys
    with replica_app(topology2, database2) as app:
        writer = app.test_client()
        register_and_login(writer, "patient")
        topology2.pause_replay(second)
        location = publish(writer, "only on the primary and the first standby")
        topology2.wait_for_replay(first)
        served = []
        for _ in range(20):
            page = writer.get(location)
            assert page.status_code == 200
            served.append(page.headers["X-Read-From"])
        assert set(served) <= {"replica 1", "primary"} and "replica 1" in served
        with writer.session_transaction() as kept:
            assert sticking.KEY in kept
        topology2.resume_replay(second)
        topology2.wait_for_replay(second)
        replicas_of(app).check()
        writer.get("/")
        with writer.session_transaction() as kept:
            assert sticking.KEY not in kept


def test_negative_control_unsticking_when_one_replica_caught_up_serves_stale_pages(
    topology2: ReplicatedPostgres, database2: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = topology2.standbys

    def any_replica(self: ReplicaSet, lsn: int, age_seconds: float) -> bool:
        return any(replica.replay_lsn >= lsn for replica in self.replicas if replica.state == "healthy")

    monkeypatch.setattr(ReplicaSet, "replayed_everywhere", any_replica)
    with replica_app(topology2, database2) as app:
        writer = app.test_client()
        register_and_login(writer, "impatient")
        topology2.pause_replay(second)
        location = publish(writer, "not on the second standby")
        topology2.wait_for_replay(first)
        replicas_of(app).check()
        statuses = [writer.get(location).status_code for _ in range(30)]
    assert statuses.count(404) > 0, "no stale read although the position was dropped early"


# -- writes refused --------------------------------------------------------------------------


def test_a_replica_session_refuses_writes_before_sending_them(topology: ReplicatedPostgres, database: URL) -> None:
    with replica_app(topology, database) as app:
        with app.app_context():
            with db.replica_session() as session:
                assert session.scalar(text("SELECT pg_is_in_recovery()")) is True
                session.add(User(username="refused", password_hash="x"))
                with pytest.raises(ReplicaWriteError, match="cannot flush"):
                    session.flush()
                session.expunge_all()
                for statement in (
                    "INSERT INTO \"user\" (username, password_hash, created_at) VALUES ('refused2', 'x', now())",
                    "SELECT id FROM \"user\" FOR UPDATE",
                    "WITH gone AS (DELETE FROM \"user\" RETURNING id) SELECT count(*) FROM gone",
                ):
                    with pytest.raises(ReplicaWriteError, match="nothing was sent"):
                        session.execute(text(statement))

        @app.get("/_test/write-in-replica-session")
        def write_in_replica_session() -> str:
            with db.replica_session() as session:
                session.add(User(username="refused3", password_hash="x"))
                session.commit()
            return "written"

        response = app.test_client().get("/_test/write-in-replica-session")
        assert response.status_code == 503
        assert "nothing you sent was saved" in response.text
        with app.app_context(), db.use_primary():
            assert db.session.scalar(select(func.count()).select_from(User)) == 0


def test_a_replica_session_without_replicas_refuses_writes_too(
    topology: ReplicatedPostgres, database: URL
) -> None:
    with replica_app(topology, database, standbys=[]) as app, app.app_context():
        with db.replica_session() as session:
            assert session.scalar(text("SELECT pg_is_in_recovery()")) is False
            with pytest.raises(ReplicaWriteError):
                session.execute(text("DELETE FROM \"user\""))


def test_negative_control_the_same_write_through_db_session_is_written(
    topology: ReplicatedPostgres, database: URL
) -> None:
    with replica_app(topology, database) as app:
        @app.get("/_test/write-in-request-session")
        def write_in_request_session() -> str:
            with db.transaction() as session:
                session.add(User(username="written", password_hash="x"))
            return "written"

        assert app.test_client().get("/_test/write-in-request-session").text == "written"
        with app.app_context(), db.use_primary():
            assert db.session.scalar(select(func.count()).select_from(User)) == 1


# -- failures of a replica -------------------------------------------------------------------


def _prepare_conflict(topology: ReplicatedPostgres, database: URL) -> None:
    standby = topology.standbys[0]
    topology.set_standby_setting(standby, "max_standby_streaming_delay", "100ms")
    _on_primary(database, "DROP TABLE IF EXISTS conflicted", "CREATE TABLE conflicted (n int)")
    topology.wait_for_replay(standby)


def _on_primary(database: URL, *statements: str) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(database.render_as_string(hide_password=False), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            for statement in statements:
                connection.execute(text(statement))
    finally:
        engine.dispose()


def _conflicting_read(app: Flask, database: URL, standby: PgNode) -> tuple[int, str]:
    """A long read on the standby while the primary takes a lock the standby must replay:
    the standby cancels the read after max_standby_streaming_delay."""
    results: dict[str, Any] = {}
    reading = ("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
               "AND query LIKE '%FROM conflicted, pg_sleep%' AND pid <> pg_backend_pid()")

    @app.get("/_test/long-read")
    def long_read() -> dict[str, Any]:
        count = db.session.scalar(text("SELECT count(*) FROM conflicted, pg_sleep(3)"))
        return {"count": count}

    def read() -> None:
        response = app.test_client().get("/_test/long-read")
        results["status"], results["served"] = response.status_code, response.headers.get("X-Read-From", "")

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(lambda: standby.query(reading)[0][0] == 1, 10, "the long read to start on the standby")
    _on_primary(database, "ALTER TABLE conflicted ADD COLUMN later int")  # an AccessExclusiveLock to replay
    reader.join(20)
    return results["status"], results["served"]


def test_a_read_cancelled_by_a_recovery_conflict_is_retried_on_the_primary(
    topology: ReplicatedPostgres, database: URL, caplog: pytest.LogCaptureFixture
) -> None:
    _prepare_conflict(topology, database)
    with replica_app(topology, database) as app:
        caplog.set_level(logging.INFO, "myapp.db.replicas")
        status, served = _conflicting_read(app, database, topology.standbys[0])
        assert status == 200 and served == "primary", (status, served)
        assert "conflict with recovery" in caplog.text
        assert replicas_of(app).replicas[0].state == "healthy"  # a conflict is not an outage


def test_negative_control_without_the_retry_the_conflict_fails_the_request(
    topology: ReplicatedPostgres, database: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    _prepare_conflict(topology, database)
    monkeypatch.setattr(routing, "_recovery_conflict", lambda error: False)
    with replica_app(topology, database) as app:
        status, _ = _conflicting_read(app, database, topology.standbys[0])
    assert status == 503  # the error page: the read failed


def test_a_stopped_replica_is_taken_out_and_rejoins(
    topology: ReplicatedPostgres, database: URL, caplog: pytest.LogCaptureFixture
) -> None:
    standby = topology.standbys[0]
    caplog.set_level(logging.WARNING, "myapp.db.replicas")
    with replica_app(topology, database) as app:
        client = app.test_client()
        assert in_recovery(client) == (True, "replica 1")
        assert sample("myapp_db_replica_in_rotation", replica="replica_1") == 1
        delta = Delta()
        topology.stop(standby)
        # The pooled connection dies with the server: the read is re-run on the primary.
        answers = [in_recovery(client) for _ in range(20)]
        assert answers == [(False, "primary")] * 20
        assert replicas_of(app).replicas[0].state == "down"
        assert "left:" in caplog.text
        assert sample("myapp_db_replica_in_rotation", replica="replica_1") == 0
        assert delta("myapp_db_reads_total", target="primary", reason="replica_failed") == 1
        # /_test/where reads twice: the first read of the first request met the dead
        # replica, every later one found no healthy replica.
        assert delta("myapp_db_reads_total", target="primary", reason="no_healthy_replica") == 2 * 20 - 1
        topology.start(standby)
        topology.wait_for_streaming(standby)
        wait_until(lambda: in_recovery(client) == (True, "replica 1"), 5, "the replica to rejoin", 0.05)
        assert "rejoined" in caplog.text
        assert sample("myapp_db_replica_in_rotation", replica="replica_1") == 1


# -- what the operator sees --------------------------------------------------------------------


def test_readyz_and_db_status_list_each_replica(topology: ReplicatedPostgres, database: URL) -> None:
    with replica_app(topology, database) as app:
        body = app.test_client().get("/readyz").json
        assert body["status"] == "ready"  # type: ignore[index]
        (replica,) = body["replicas"]  # type: ignore[index]
        assert replica["state"] == "healthy" and replica["lag_bytes"] is not None
        assert sample("myapp_db_replica_lag_bytes", replica="replica_1") == replica["lag_bytes"]
        # Every reads series starts at 0: their first reads are a rise rate() sees.
        assert all(exists("myapp_db_reads_total", target="primary", reason=reason)
                   for reason in ("sticky", "no_healthy_replica", "replica_failed", "use_primary", "write_unit"))
        assert exists("myapp_db_reads_total", target="replica_1", reason="replica")
        assert replica["url"].endswith(f"/{database.database}") and "***" not in replica["url"]
        output = app.test_cli_runner().invoke(args=["db", "status"])
        assert output.exit_code == 0, output.output
        assert f"replica  1 {replica['url']} healthy, lag " in output.output


def test_statements_sent_to_a_replica_count_for_the_query_budget(topology: ReplicatedPostgres, database: URL) -> None:
    with replica_app(topology, database, DEBUG=True) as app:
        response = app.test_client().get("/_test/where")
    assert response.headers["X-Read-From"] == "replica 1"
    assert response.headers["X-Query-Count"] == "2"


def test_the_lag_limit_takes_a_paused_replica_out_and_brings_it_back(
    topology: ReplicatedPostgres, database: URL
) -> None:
    standby = topology.standbys[0]
    with replica_app(topology, database, DATABASE_REPLICA_MAX_LAG="0.5s, 1GB") as app:
        replicas = replicas_of(app)
        topology.pause_replay(standby)
        topology.primary.query("CREATE TABLE IF NOT EXISTS lag_marker (n int)")  # WAL it does not replay
        topology.primary.query("INSERT INTO lag_marker VALUES (1)")
        for _ in range(5):
            replicas.check()
            time.sleep(0.2)
        assert replicas.replicas[0].state == "lagging"
        assert "s behind (limit 0.5 s)" in replicas.replicas[0].reason
        assert in_recovery(app.test_client()) == (False, "primary")
        topology.resume_replay(standby)
        topology.wait_for_replay(standby)
        replicas.check()
        assert replicas.replicas[0].state == "healthy"


def test_an_idle_primary_adds_no_time_lag(topology: ReplicatedPostgres, database: URL) -> None:
    """now() - pg_last_xact_replay_timestamp() grows on an idle primary; our lag does not."""
    with replica_app(topology, database, DATABASE_REPLICA_MAX_LAG="0.3s") as app:
        replicas = replicas_of(app)
        for _ in range(4):
            time.sleep(0.2)
            replicas.check()
        assert replicas.replicas[0].state == "healthy"
        assert (replicas.replicas[0].lag_seconds or 0.0) < 0.3
        standby = topology.standbys[0]
        replay_age = standby.query("SELECT extract(epoch FROM now() - pg_last_xact_replay_timestamp())")[0][0]
        assert replay_age is None or float(replay_age) > 0.3


def _fake_set(*replicas: tuple[str, int]) -> ReplicaSet:
    """A replica set without servers, for the decisions that need none."""
    from myapp.db.replicas import Replica

    members = [Replica(number, f"replica{number}", None, None, state, replay_lsn=lsn)  # type: ignore[arg-type]
               for number, (state, lsn) in enumerate(replicas, start=1)]
    return ReplicaSet(members, None, 1.0, 10.0, None)  # type: ignore[arg-type]


def test_a_position_is_dropped_only_when_no_replica_can_miss_it() -> None:
    both = _fake_set(("healthy", 100), ("healthy", 100))
    assert both.replayed_everywhere(100, age_seconds=0.1)
    one = _fake_set(("healthy", 100), ("healthy", 99))
    assert not one.replayed_everywhere(100, age_seconds=0.1)  # GitLab #413203
    out = _fake_set(("healthy", 100), ("down", 0))
    assert not out.replayed_everywhere(100, age_seconds=5)  # it may rejoin within the limit
    # Older than the lag limit plus two checks: any replica that is (or becomes) healthy has it.
    assert out.replayed_everywhere(100, age_seconds=12.5) and one.replayed_everywhere(100, age_seconds=12.5)
    # A commit whose position could not be read keeps its user on the primary until then.
    assert not both.replayed_everywhere(sticking.UNKNOWN_POSITION, age_seconds=11)
    assert both.replayed_everywhere(sticking.UNKNOWN_POSITION, age_seconds=12.5)
    assert both.choose(sticking.UNKNOWN_POSITION, lambda replica: 100) is None


@pytest.mark.parametrize(
    ("value", "limits"),
    [("10s, 16MB", (10.0, 16 * 1024**2)), ("500ms", (0.5, None)), ("1GB", (None, 1024**3)), ("2min,1kB", (120.0, 1024))],
)
def test_max_lag_is_a_time_a_size_or_both(value: str, limits: tuple[float | None, int | None]) -> None:
    assert parse_max_lag(value) == limits


@pytest.mark.parametrize(
    "config",
    [
        {"DATABASE_REPLICA_MAX_LAG": "10 parsecs"},
        {"DATABASE_REPLICA_MAX_LAG": "1s, 2s"},
        {"DATABASE_REPLICA_CHECK_INTERVAL": 0},
        {"DATABASE_REPLICA_URLS": "mysql+pymysql://root@127.0.0.1/x"},
    ],
)
def test_replica_settings_are_checked(config: dict[str, Any]) -> None:
    settings = {"DATABASE_REPLICA_URLS": "postgresql+psycopg://u@127.0.0.1:1/x", **config}
    url = "postgresql+psycopg://u@127.0.0.1:1/x"
    with pytest.raises(ConfigError, match="DATABASE_REPLICA"):
        make_app(url, **settings)


def test_a_user_who_never_wrote_carries_no_position(topology: ReplicatedPostgres, database: URL) -> None:
    with replica_app(topology, database) as app:
        client = app.test_client()
        in_recovery(client)
        with client.session_transaction() as kept:
            assert sticking.KEY not in kept
        with app.test_request_context():
            assert sticking.required_lsn() is None
            cookie[sticking.KEY] = [5, int(time.time())]
            assert sticking.required_lsn() == 5


class _SlowCheckEngine:
    """A check engine whose one check answers "a healthy standby" once released."""

    def __init__(self) -> None:
        self.asked, self.answer = threading.Event(), threading.Event()

    @contextmanager
    def connect(self) -> Iterator[Any]:
        self.asked.set()
        assert self.answer.wait(10)
        yield SimpleNamespace(execute=lambda statement: SimpleNamespace(one=lambda: (True, 100)))


def test_a_check_under_way_cannot_undo_a_requests_mark_down() -> None:
    """Bug: a health check that began before a request marked the replica down, and
    then saw it healthy, put it back in the rotation at once with a stale answer."""
    replica_set = _fake_set(("healthy", 100))
    replica = replica_set.replicas[0]
    check_engine = replica.check_engine = _SlowCheckEngine()  # type: ignore[assignment]
    checking = threading.Thread(target=replica_set._check_replica, args=(replica,))
    checking.start()
    assert check_engine.asked.wait(10)
    replica_set.mark_down(replica, "a request's read failed")
    check_engine.answer.set()
    checking.join(10)
    assert replica.state == "down" and replica.reason == "a request's read failed"
    fresh = threading.Thread(target=replica_set._check_replica, args=(replica,))  # a check begun after it
    fresh.start()
    fresh.join(10)
    assert replica.state == "healthy"


def test_a_replica_that_cannot_answer_the_replay_question_is_marked_down() -> None:
    """Found while reading: the replica was forgotten before it was marked down, so a
    replica that failed the read-your-writes question stayed in the rotation."""
    from sqlalchemy import create_engine

    from myapp.db.session import AppSession

    replica_set = _fake_set(("healthy", 10))
    replica = replica_set.replicas[0]
    replica.engine = create_engine("postgresql+psycopg://app@127.0.0.1:1/site", connect_args={"connect_timeout": 2})
    replica.replay_lsn_at = -1.0  # its cached position is stale: the session asks it
    replica_set._next_check = float("inf")  # no background check in this test
    with AppSession() as session:
        reads = session.state.reads = routing.ReplicaReads(replica_set, required_lsn=100)
        assert routing._replica_for(session, reads) is None  # read from the primary
    assert replica.state == "down" and "Connection refused" in replica.reason
    replica.engine.dispose()


# -- read-only mode: the primary unreachable (issue 19) ----------------------------------------

BANNER = "Read-only for now."
NOT_YET = "Your latest changes are saved but may not show on this page yet."


def _writer_with_an_unreplayed_post(client: FlaskClient, topology: ReplicatedPostgres) -> None:
    """A user with one post every server has and one the standby has not replayed: its
    reads stick to the primary (read-your-writes)."""
    register_and_login(client, "reader")
    publish(client, "Replayed everywhere")
    topology.wait_for_replay(topology.standbys[0])
    topology.pause_replay(topology.standbys[0])
    publish(client, "Only on the primary")


def test_with_the_primary_stopped_pages_are_read_from_the_replica_under_a_banner(
    topology: ReplicatedPostgres, database: URL
) -> None:
    with replica_app(topology, database) as app:
        client = app.test_client()
        _writer_with_an_unreplayed_post(client, topology)
        topology.stop(topology.primary)
        for _ in range(5):  # refused connects: before the breaker, and with it open
            page = client.get("/")
            assert page.status_code == 200 and BANNER in page.text, page.text
            assert NOT_YET in page.text  # the replica lacks their last post, and says so
            assert "Replayed everywhere" in page.text and "Only on the primary" not in page.text
            assert ">reader<" in page.text and page.headers["X-Read-From"] == "replica 1"  # still signed in
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json["status"] == "degraded: read-only from replica 1"  # type: ignore[index]
        topology.start(topology.primary)
        topology.resume_replay(topology.standbys[0])
        wait_until(lambda: BANNER not in client.get("/").text, 5, "the banner to go")
        assert "Only on the primary" in client.get("/").text
        assert client.get("/readyz").json["status"] == "ready"  # type: ignore[index]


def test_with_no_healthy_replica_a_stale_unreachable_primary_is_asked_again(
    topology: ReplicatedPostgres, database: URL
) -> None:
    """The replicas' last check could not reach the primary and found no replica
    healthy; the primary is back before the next check, and the breaker is closed.
    Read-only mode has no replica to read from, so pages are read from the primary
    rather than refused. (Seen under Patroni, scenario 19d: after the failover the new
    leader took writes while every GET got a 503 "the primary is unreachable and no
    replica is healthy" until the next check.) With the primary still down, a page is
    a 503 as before."""
    primary, standby = topology.primary, topology.standbys[0]
    with replica_app(topology, database, DATABASE_REPLICA_CHECK_INTERVAL=3600) as app:
        client = app.test_client()
        register_and_login(client, "stale")
        publish(client, "Written before the outage")
        topology.stop(standby)
        topology.stop(primary)
        replicas_of(app).check()
        assert replicas_of(app).primary_unreachable and replicas_of(app).replicas[0].state == "down"
        assert client.get("/").status_code == 503
        topology.start(primary)
        page = client.get("/")
        assert page.status_code == 200, page.text
        assert page.headers["X-Read-From"] == "primary" and "Written before the outage" in page.text
        assert ">stale<" in page.text  # still signed in: the user row read from the primary too


def test_a_replica_just_promoted_serves_the_read_only_pages_until_the_app_reaches_it_as_primary() -> None:
    """Found by scenario 19d: a Patroni failover promotes the replica behind the read
    port before HAProxy's write port reaches it. The replicas' check then finds it no
    longer a standby, and with the old primary unreachable read-only mode had no replica
    left: GETs got a 503 for those moments. A promoted replica is out of rotation, yet
    the newest data there is: read-only mode reads from it. (A topology of its own: a
    promotion cannot be undone.)"""
    with replicated_postgres(standbys=1) as topology:
        old_primary = topology.primary
        with topology.replayed_database() as database, replica_app(topology, database) as app:
            try:
                _read_from_the_promoted_replica(topology, app)
            finally:
                old_primary.start()  # for the database's drop; the topology goes next


def _read_from_the_promoted_replica(topology: ReplicatedPostgres, app: Flask) -> None:
    client = app.test_client()
    register_and_login(client, "promoted")
    publish(client, "Written before the failover")
    topology.wait_for_replay(topology.standbys[0])
    topology.stop(topology.primary)
    topology.promote(topology.standbys[0])
    replicas_of(app).check()
    replica = replicas_of(app).replicas[0]
    assert replica.state == "promoted" and replicas_of(app).choose(None, lambda replica: None) is None
    for _ in range(3):  # the connect to the old primary refused, then its breaker open
        page = client.get("/")
        assert page.status_code == 200 and BANNER in page.text, page.text
        assert page.headers["X-Read-From"] == "replica 1" and "Written before the failover" in page.text
        assert ">promoted<" in page.text


def test_a_replica_that_failed_a_read_is_not_read_from_again_in_that_request(
    topology: ReplicatedPostgres, database: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in CI (scenario 19d): HAProxy cut a request's replica connection, the read
    went to the primary, which was unreachable, and read-only mode chose that replica
    again (a check had just put it back): the session's connection there had died
    inside its transaction, and the read failed with PendingRollbackError, a 500.
    Here the check's timing is stood in for by a mark-down that does nothing."""
    with replica_app(topology, database) as app:

        @app.get("/_test/read-twice")
        def read_twice() -> str:
            db.session.scalar(select(func.count()).select_from(User))
            topology.standbys[0].query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                       "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")
            db.session.scalar(select(func.count()).select_from(Post))
            return "read twice"

        assert in_recovery(app.test_client()) == (True, "replica 1")
        topology.stop(topology.primary)
        monkeypatch.setattr(ReplicaSet, "mark_down", lambda self, replica, why: None)
        response = app.test_client().get("/_test/read-twice")
        assert response.status_code == 503, response.text
        assert "PendingRollbackError" not in response.text


def test_read_only_mode_reads_from_another_replica_than_the_one_that_failed(
    topology2: ReplicatedPostgres, database2: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same, with two replicas: the one the request failed on is left out of the
    choice, so the other serves the page instead of a 503 (or the 500 above)."""
    with replica_app(topology2, database2) as app:

        @app.get("/_test/read-twice")
        def read_twice() -> str:
            db.session.scalar(select(func.count()).select_from(User))
            for standby in topology2.standbys:
                standby.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")
            db.session.scalar(select(func.count()).select_from(Post))
            return "read twice"

        topology2.stop(topology2.primary)
        monkeypatch.setattr(ReplicaSet, "mark_down", lambda self, replica, why: None)
        for _ in range(6):  # the failed one is chosen first half the time: excluded, never again
            response = app.test_client().get("/_test/read-twice")
            assert response.status_code == 200, response.text
            served = response.headers["X-Read-From"].split(",")
            assert len(served) == 2 and served[0] != served[1], served


def test_negative_control_read_only_mode_off_the_same_pages_get_503s(
    topology: ReplicatedPostgres, database: URL
) -> None:
    with replica_app(topology, database, DATABASE_READ_ONLY_MODE=False) as app:
        client = app.test_client()
        _writer_with_an_unreplayed_post(client, topology)
        topology.stop(topology.primary)
        pages = [client.get("/") for _ in range(5)]
        assert [page.status_code for page in pages] == [503] * 5
        assert not any(BANNER in page.text for page in pages)
        assert client.get("/readyz").status_code == 503


def test_a_post_while_read_only_gives_back_exactly_what_was_typed(
    topology: ReplicatedPostgres, database: URL
) -> None:
    typed = "\nstarts with a blank line\n  <b>indented</b> & \"quoted\" &amp;\n\nlast line "
    with replica_app(topology, database) as app:
        client = app.test_client()
        register_and_login(client, "writer")
        topology.stop(topology.primary)
        response = client.post("/posts/new", data={"title": "Unsaved", "body": typed})
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert BANNER in response.text and 'action="/posts/new"' in response.text
        assert textareas(response.text) == {"title": "Unsaved", "body": typed}
        login = client.post("/auth/login", data={"username": "writer", "password": "typed secret"})
        # The limiter's counts live on the primary: logging in fails closed, the name kept.
        assert login.status_code == 503 and "typed secret" not in login.text
        assert textareas(login.text) == {"username": "writer"}
        topology.start(topology.primary)
        with app.app_context(), db.use_primary():
            assert db.session.scalar(select(func.count()).select_from(Post).where(Post.title == "Unsaved")) == 0


# -- a share of the bulkhead per server (issue 19) ----------------------------------------------------


def _stuck_requests(app: Flask, method: str, path: str, count: int) -> list[threading.Thread]:
    """``count`` requests, each in its own thread, whose statement waits 3 s on a server."""
    threads = [threading.Thread(target=lambda: app.test_client().open(path, method=method)) for _ in range(count)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    return threads


def _add_slow_unit(app: Flask) -> None:
    """POST /_test/slow-unit: a unit of work whose statement waits 3 s on the primary."""

    @app.post("/_test/slow-unit")
    def slow_unit() -> str:
        with db.transaction() as session:
            session.execute(text("SELECT pg_sleep(3)"))
        return "done"


def _active_sleeps(node: PgNode) -> int:
    return node.query("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = 'SELECT pg_sleep(3)'"
                      )[0][0]


def test_a_page_the_replica_serves_is_not_refused_because_the_primary_holds_every_slot(
    topology: ReplicatedPostgres, database: URL
) -> None:
    """Found by scenario 19b (tests/faults/test_read_only.py): in the first seconds of a
    silent partition, before any breaker opens, the requests waiting on the primary (the
    writes, a read that sticks to it) held every slot of a worker's bulkhead, and pages
    that a healthy replica would serve got a 503 "too busy". In small: two slots, two
    units of work that wait on the primary past the bulkhead timeout, and a visitor's
    page that reads from the replica. The primary's share is one slot: the second unit
    is turned away at once, and the page is served."""
    with replica_app(topology, database, DATABASE_BULKHEAD=2, DATABASE_BULKHEAD_TIMEOUT=0.2) as app:
        _add_slow_unit(app)

        client = app.test_client()
        assert in_recovery(client) == (True, "replica 1")  # nothing waits: the replica serves it
        delta = Delta()
        waiting = _stuck_requests(app, "POST", "/_test/slow-unit", 2)
        wait_until(lambda: _active_sleeps(topology.primary) >= 1, 5, "a unit to wait on the primary")
        time.sleep(0.3)  # past the bulkhead timeout
        try:
            response = client.get("/_test/where")
        finally:
            for thread in waiting:
                thread.join(10)
        assert response.status_code == 200, response.text
        assert response.headers["X-Read-From"] == "replica 1"
        assert delta("myapp_db_bulkhead_refusals_total") == 1  # the second unit, over the primary's share


def test_past_the_primarys_stuck_share_a_form_gets_the_read_only_page_and_a_read_the_replica(
    topology: ReplicatedPostgres, database: URL
) -> None:
    """Slots all stuck on the primary are as good as its breaker open: a form sent then
    gets the read-only 503 page with what was typed, and a read that had to go to the
    primary (db.use_primary(), a reader whose last write the replica lacks) is read
    from the replica under the banner instead of being turned away."""
    with replica_app(topology, database, DATABASE_BULKHEAD=2, DATABASE_BULKHEAD_TIMEOUT=0.2) as app:
        _add_slow_unit(app)

        @app.get("/_test/from-the-primary")
        def from_the_primary() -> str:
            with db.use_primary():
                db.session.scalar(select(func.count()).select_from(User))
            return "read-only" if db.read_only_mode() else "read-write"

        client = app.test_client()
        register_and_login(client, "stuck-share")
        waiting = _stuck_requests(app, "POST", "/_test/slow-unit", 1)
        wait_until(lambda: _active_sleeps(topology.primary) == 1, 5, "the unit to wait on the primary")
        time.sleep(0.3)
        try:
            typed = "Typed while\nthe primary hung"
            form = client.post("/posts/new", data={"title": "Kept", "body": typed})
            read = client.get("/_test/from-the-primary")
        finally:
            for thread in waiting:
                thread.join(10)
        assert form.status_code == 503 and BANNER in form.text and form.headers["Retry-After"]
        assert textareas(form.text) == {"title": "Kept", "body": typed}
        assert read.status_code == 200, read.text
        assert read.headers["X-Read-From"] == "replica 1" and read.text == "read-only"
        again = client.get("/_test/from-the-primary")  # the share free again: the primary
        assert again.headers["X-Read-From"].endswith("primary") and again.text == "read-write"


def test_a_write_is_not_refused_because_a_stuck_replica_holds_every_slot(
    topology: ReplicatedPostgres, database: URL
) -> None:
    """The reverse: pages whose reads wait on a replica (a standby stuck on its disk,
    say) hold at most the replica's share, and a write to the primary gets the last slot."""
    with replica_app(topology, database, DATABASE_BULKHEAD=2, DATABASE_BULKHEAD_TIMEOUT=0.2) as app:

        @app.get("/_test/slow-read")
        def slow_read() -> str:
            db.session.execute(text("SELECT pg_sleep(3)"))
            return "read"

        client = app.test_client()
        register_and_login(client, "writes-meanwhile")
        waiting = _stuck_requests(app, "GET", "/_test/slow-read", 2)
        wait_until(lambda: _active_sleeps(topology.standbys[0]) >= 1, 5, "a read to wait on the replica")
        time.sleep(0.3)
        try:
            started = time.monotonic()
            response = client.post("/posts/new", data={"title": "while the replica hangs", "body": "x"})
            took = time.monotonic() - started
        finally:
            for thread in waiting:
                thread.join(10)
        assert response.status_code == 302, response.text
        assert took < 1.0  # no wait for a slot


def test_negative_control_one_bulkhead_for_every_server_refuses_the_replica_page(
    topology: ReplicatedPostgres, database: URL
) -> None:
    """The same two stuck units, with the primary's share widened to the whole bulkhead
    (as one bulkhead for every server was): they hold both slots, and the replica's
    page is refused."""
    with replica_app(topology, database, DATABASE_BULKHEAD=2, DATABASE_BULKHEAD_TIMEOUT=0.2) as app:
        bulkhead = app.extensions["myapp.database"].feature(Guards).bulkhead
        assert bulkhead.share == 1
        bulkhead.share = bulkhead.limit
        _add_slow_unit(app)

        waiting = _stuck_requests(app, "POST", "/_test/slow-unit", 2)
        wait_until(lambda: _active_sleeps(topology.primary) == 2, 5, "both units to wait on the primary")
        time.sleep(0.3)
        try:
            response = app.test_client().get("/_test/where")
        finally:
            for thread in waiting:
                thread.join(10)
        assert response.status_code == 503 and "every database connection is in use" in response.text


# -- a breaker per server (issue 19) ----------------------------------------------------------------


def test_a_failing_replica_opens_its_own_breaker_never_the_primarys(
    topology: ReplicatedPostgres, database: URL
) -> None:
    standby = topology.standbys[0]
    with replica_app(topology, database) as app:
        guards = app.extensions["myapp.database"].feature(Guards)
        replica_breaker, replica = guards.replica_breakers["replica_1"], replicas_of(app).replicas[0]
        replica_breaker.slow_seconds = 0.0  # a refused connect counts here, to drive it fast
        client = app.test_client()
        assert in_recovery(client) == (True, "replica 1")
        topology.stop(standby)
        for _ in range(3):  # each read meets the dead replica once, then the primary serves it
            replicas_of(app).replicas[0].state = "healthy"  # as if a check had not noticed yet
            app.extensions["myapp.database"].engine.dispose()
            replica.engine.dispose()
            assert in_recovery(client) == (False, "primary")
        assert replica_breaker.state == "open" and guards.breaker.state == "closed"
        replica.state = "healthy"
        delta = Delta()
        assert in_recovery(client) == (False, "primary")  # its open breaker keeps it out: not even tried
        assert delta("myapp_db_reads_total", target="primary", reason="replica_failed") == 0
        assert delta("myapp_db_reads_total", target="primary", reason="no_healthy_replica") == 2
        statuses = client.get("/readyz").json["breakers"]  # type: ignore[index]
        assert statuses["primary"]["state"] == "closed" and statuses["replica_1"]["state"] == "open"


def test_an_open_primary_breaker_leaves_the_replicas_serving(topology: ReplicatedPostgres, database: URL) -> None:
    with replica_app(topology, database) as app:
        guards = app.extensions["myapp.database"].feature(Guards)
        guards.breaker.slow_seconds = 0.0
        client = app.test_client()
        register_and_login(client, "still-reading")
        topology.stop(topology.primary)
        for _ in range(3):
            client.post("/posts/new", data={"title": "refused", "body": "x"})  # each a failure to connect
        assert guards.breaker.state == "open" and guards.replica_breakers["replica_1"].state == "closed"
        page = client.get("/")
        assert page.status_code == 200 and BANNER in page.text and ">still-reading<" in page.text
