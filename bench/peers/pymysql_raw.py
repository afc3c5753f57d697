"""Hand-written PyMySQL, the MariaDB counterpart of ``psycopg_raw``: one connection per
thread, raw SQL, autocommit (each statement its own transaction). The floor of what
MariaDB can cost through the driver myapp uses there; no pre-ping, so it would fail
requests after a database restart."""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pymysql
from flask import abort, flash, g, redirect, render_template, url_for
from werkzeug.wrappers import Response

from ._shared import (
    Page, PostForm, RowAuthor, finish_peer_app, logged_in_user_id, make_peer_app, page_number, post_from_row,
)

app, posts = make_peer_app(__name__)
_local = threading.local()


def connect_args(database_url: str) -> dict[str, Any]:
    """PyMySQL's arguments from SQLAlchemy's spelling, ``mysql+pymysql://user:pw@host:port/db``."""
    parts = urlsplit(database_url)
    if parts.scheme not in ("mysql+pymysql", "mariadb+pymysql", "mysql", "mariadb"):
        raise ValueError(f"not a MariaDB URL: {parts.scheme}://...")
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    args: dict[str, Any] = {
        "host": parts.hostname or "localhost",
        "port": parts.port or 3306,
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "database": unquote(parts.path.lstrip("/")),
        "charset": query.get("charset", "utf8mb4"),  # what myapp's engine uses
        "autocommit": True,
    }
    if "unix_socket" in query:
        args["unix_socket"] = query["unix_socket"]
    return args


_CONNECT_ARGS = connect_args(app.config["DATABASE_URL"])
_POST_COLUMNS = (
    "p.id, p.author_id, p.title, p.body, p.created_at, p.updated_at, u.username "
    "FROM post p JOIN `user` u ON u.id = p.author_id"
)

# The page's ids from the (created_at, id) index alone, then only those rows joined, as
# myapp's query does: MariaDB plans psycopg_raw's plain join with ORDER BY ... OFFSET as
# a temporary table and a filesort of every post (about 250 ms a page on the bench data,
# against 2 ms), which would make this peer no floor at all.
_PAGE_QUERY = (
    f"SELECT {_POST_COLUMNS} JOIN (SELECT id FROM post ORDER BY created_at DESC, id DESC LIMIT %s OFFSET %s) page "
    "ON page.id = p.id ORDER BY p.created_at DESC, p.id DESC"
)


def connection() -> pymysql.connections.Connection[Any]:
    """This thread's connection, opened on first use (after gunicorn's fork)."""
    conn: pymysql.connections.Connection[Any] | None = getattr(_local, "conn", None)
    if conn is None or not conn.open:
        conn = pymysql.connect(**_CONNECT_ARGS)
        _local.conn = conn
    return conn


def fetch(sql: str, args: tuple[Any, ...]) -> tuple[tuple[Any, ...], ...]:
    with connection().cursor() as cursor:
        cursor.execute(sql, args)
        rows: tuple[tuple[Any, ...], ...] = cursor.fetchall()
        return rows


@app.before_request
def load_logged_in_user() -> None:
    user_id = logged_in_user_id()
    if user_id is not None:
        rows = fetch("SELECT id, username FROM `user` WHERE id = %s", (user_id,))
        if rows:
            g.user = RowAuthor(*rows[0])
            g.username = g.user.username


@posts.get("/")
def index() -> str:
    number, per_page = page_number(), app.config["POSTS_PER_PAGE"]
    rows = fetch(_PAGE_QUERY, (per_page + 1, (number - 1) * per_page))
    return render_template("posts/index.html", page=Page.of_rows(rows, number, per_page, post_from_row))


@posts.get("/posts/<int:post_id>")
def detail(post_id: int) -> str:
    rows = fetch(f"SELECT {_POST_COLUMNS} WHERE p.id = %s", (post_id,))
    if not rows:
        abort(404)
    return render_template("posts/detail.html", post=post_from_row(rows[0]))


@posts.route("/posts/new", methods=("GET", "POST"))
def create() -> str | Response:
    if g.user is None:
        return redirect(url_for("auth.login"))
    form = PostForm()
    if form.validate_on_submit():
        with connection().cursor() as cursor:
            cursor.execute(
                "INSERT INTO post (author_id, title, body, created_at, version) VALUES (%s, %s, %s, UTC_TIMESTAMP(), 1)",
                (g.user.id, form.title.data, form.body.data),
            )
            post_id = cursor.lastrowid
        flash("Your post is published.", "success")
        return redirect(url_for("posts.detail", post_id=post_id))
    return render_template("posts/form.html", form=form, post=None)


finish_peer_app(app, posts)
