"""The benchmark's peers serve the very pages myapp serves, from the same rows, on each
backend they are measured on, so the benchmark compares database layers and nothing
else (bench/peers/)."""

from __future__ import annotations

import importlib
import re
import sys
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.pool import NullPool

from myapp.db import db
from myapp.models import Post, User
from tests.support.apps import SECRET_KEY
from tests.support.databases import Backend
from tests.support.queries import assert_num_queries

pytestmark = [pytest.mark.real_commits]

# The database peers bench/run.py serves on each backend.
PEERS_BY_BACKEND = {
    "postgresql": ("fsa", "scoped", "psycopg_raw"),
    "mysql": ("fsa", "pymysql_raw"),
    "sqlite": ("fsa", "sqlite_raw"),
}
DB_PEERS = [
    "fsa",
    pytest.param("scoped", marks=pytest.mark.backends("postgresql")),
    pytest.param("psycopg_raw", marks=pytest.mark.backends("postgresql")),
    pytest.param("pymysql_raw", marks=pytest.mark.backends("mysql")),
    pytest.param("sqlite_raw", marks=pytest.mark.backends("sqlite")),
]


def _import_peer(name: str) -> ModuleType:
    """Import a peer afresh: each builds its app (and engine) from the environment."""
    sys.modules.pop(f"bench.peers.{name}", None)
    return importlib.import_module(f"bench.peers.{name}")


def _close_peer(name: str, module: ModuleType) -> None:
    if name == "fsa":
        with module.app.app_context():
            module.db.engine.dispose()
    elif name == "scoped":
        module.engine.dispose()
    elif name in ("psycopg_raw", "pymysql_raw", "sqlite_raw"):
        conn = getattr(module._local, "conn", None)
        if conn is not None:
            conn.close()
    sys.modules.pop(f"bench.peers.{name}", None)


@pytest.fixture
def peers(app: Flask, backend: Backend, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, ModuleType]]:
    """The seeded database, and every peer app pointed at it."""
    result = app.test_cli_runner().invoke(args=["seed", "--users", "3", "--posts", "45"])
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("DATABASE_URL", backend.url.render_as_string(hide_password=False))
    monkeypatch.setenv("SECRET_KEY", SECRET_KEY)
    monkeypatch.setenv("POSTS_PER_PAGE", "20")
    modules = {name: _import_peer(name) for name in (*PEERS_BY_BACKEND[backend.name], "bare")}
    try:
        yield modules
    finally:
        for name, module in modules.items():
            _close_peer(name, module)


def _first_post_ids(app: Flask) -> list[int]:
    with app.app_context():
        return list(db.session.scalars(select(Post.id).order_by(Post.id).limit(3)))


@pytest.mark.parametrize("peer", DB_PEERS)
def test_peer_serves_the_same_pages_as_myapp(app: Flask, peers: dict[str, ModuleType], peer: str) -> None:
    ours, theirs = app.test_client(), peers[peer].app.test_client()
    paths = ["/", "/?page=2", "/?page=3"] + [f"/posts/{i}" for i in _first_post_ids(app)]
    for path in paths:
        expected, got = ours.get(path), theirs.get(path)
        assert expected.status_code == got.status_code == 200, path
        assert got.get_data(as_text=True) == expected.get_data(as_text=True), f"{peer} differs on {path}"
    # Page 3 of 45 posts holds the last 5 and no "Older" link, in both.
    last = theirs.get("/?page=3").get_data(as_text=True)
    assert last.count('<article class="card post">') == 5 and 'rel="next"' not in last
    assert ours.get("/?page=4").status_code == theirs.get("/?page=4").status_code == 404
    assert ours.get("/posts/999999").status_code == theirs.get("/posts/999999").status_code == 404


@pytest.mark.parametrize("peer", DB_PEERS)
def test_peer_create_writes_a_post_myapp_shows(app: Flask, peers: dict[str, ModuleType], peer: str) -> None:
    with app.app_context():
        author = db.session.scalars(select(User).order_by(User.id)).first()
        assert author is not None
        before = db.session.scalar(select(func.count(Post.id)))
    client = peers[peer].app.test_client()
    with client.session_transaction() as cookie:
        cookie["user_id"] = author.id
    response = client.post("/posts/new", data={"title": f"Written by {peer}", "body": "Same schema"})
    assert response.status_code == 302
    post_id = int(re.fullmatch(r"/posts/(\d+)", response.headers["Location"]).group(1))  # type: ignore[union-attr]
    page = app.test_client().get(f"/posts/{post_id}").get_data(as_text=True)
    assert f"Written by {peer}" in page and author.username in page
    with app.app_context():
        assert db.session.scalar(select(func.count(Post.id))) == before + 1
        assert db.session.get(Post, post_id).author_id == author.id  # type: ignore[union-attr]


@pytest.mark.backends("postgresql")
def test_bare_flask_serves_the_same_layout_without_a_database(peers: dict[str, ModuleType]) -> None:
    client = peers["bare"].app.test_client()
    assert client.get("/healthz").get_json() == {"status": "ok"}
    index = client.get("/?page=7").get_data(as_text=True)
    assert index.count('<article class="card post">') == 20 and "Page 7" in index
    assert "<h1>Post number 1</h1>" in client.get("/posts/42").get_data(as_text=True)
    with client.session_transaction() as cookie:
        cookie["user_id"] = 1
    assert client.post("/posts/new", data={"title": "t", "body": "b"}).status_code == 302


@pytest.mark.backends("postgresql")
@pytest.mark.parametrize("per_page, number", [(5, 1), (20, 2), (50, 1)])
def test_index_is_one_query_whatever_the_page(
    app: Flask, peers: dict[str, ModuleType], per_page: int, number: int
) -> None:
    """Goal 3 of the benchmark: the index costs one query at any page size and number."""
    app.config["POSTS_PER_PAGE"] = per_page
    client = app.test_client()
    with assert_num_queries(app, 1):
        page = client.get(f"/?page={number}").get_data(as_text=True)
    assert page.count('<article class="card post">') == min(per_page, 45 - (number - 1) * per_page)


# -- what the benchmark changed: a pre-ping without a round trip (PostgreSQL) ---------


def _last_query(observer: Any, pid: int) -> str:
    with observer.connect() as connection:
        return str(connection.execute(text("SELECT query FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}).scalar())


def _pooled_backend_pid(engine: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())


@pytest.mark.backends("postgresql")
def test_quiet_connection_skips_the_ping_and_a_spoken_one_gets_it(app: Flask, backend: Backend) -> None:
    engine = app.extensions["myapp.database"].engine
    observer = create_engine(backend.url, poolclass=NullPool)
    try:
        pid = _pooled_backend_pid(engine)  # back in the pool after a ROLLBACK
        with engine.connect() as connection:  # checkout: a quiet socket, so no SELECT 1
            assert _last_query(observer, pid) == "ROLLBACK"
            connection.execute(text("LISTEN bench_ping"))
            connection.commit()
        with observer.connect() as other:
            other.execute(text("NOTIFY bench_ping"))
            other.commit()
        time.sleep(0.2)  # let the notification reach the pooled connection's socket
        with engine.connect() as connection:  # something to read: the real ping runs
            assert _last_query(observer, pid) == ";"  # the psycopg dialect's ping
            assert connection.execute(text("SELECT pg_backend_pid()")).scalar_one() == pid
    finally:
        observer.dispose()


@pytest.mark.backends("postgresql")
def test_terminated_pooled_connection_is_replaced_without_an_error(app: Flask, backend: Backend) -> None:
    engine = app.extensions["myapp.database"].engine
    observer = create_engine(backend.url, poolclass=NullPool)
    try:
        pid = _pooled_backend_pid(engine)
        with observer.connect() as connection:
            assert connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
        for _ in range(50):  # the server has closed that socket once the backend is gone
            if _last_query(observer, pid) == "None":
                break
            time.sleep(0.05)
        client = app.test_client()
        assert all(client.get("/").status_code == 200 for _ in range(5))
        assert _pooled_backend_pid(engine) != pid
    finally:
        observer.dispose()


@pytest.mark.backends("postgresql")
def test_a_read_request_sends_its_select_and_nothing_else(app: Flask, backend: Backend) -> None:
    """The post page's one round trip: no ping, no BEGIN before it, no ROLLBACK after."""
    engine = app.extensions["myapp.database"].engine
    observer = create_engine(backend.url, poolclass=NullPool)
    try:
        with app.app_context():
            db.session.add(User(username="reader", password_hash="x"))
            db.session.commit()
            author = db.session.scalar(select(User.id).where(User.username == "reader"))
            db.session.add(Post(author_id=author, title="Read me", body="Once", version=1))
            db.session.commit()
            post_id = db.session.scalar(select(Post.id).where(Post.title == "Read me"))
        pid = _pooled_backend_pid(engine)
        assert engine.pool.checkedin() == 1  # the next request gets this connection
        assert "Read me" in app.test_client().get(f"/posts/{post_id}").get_data(as_text=True)
        last = _last_query(observer, pid)
        assert last.startswith("SELECT") and "FROM post" in last, last
    finally:
        observer.dispose()
