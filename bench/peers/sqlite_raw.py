"""Hand-written ``sqlite3``, the SQLite counterpart of ``psycopg_raw``: one connection per
thread, raw SQL, autocommit (``isolation_level=None``: each statement its own
transaction). The floor of what SQLite can cost from Python. A busy timeout lets the
writers of every thread and worker queue for the write lock instead of failing, and
the connection gets myapp's pragmas (WAL, foreign keys) so that SQLite does the same work."""

from __future__ import annotations

import os
import sqlite3
import threading
from datetime import datetime, timezone
from typing import Any

from flask import abort, flash, g, redirect, render_template, url_for
from werkzeug.wrappers import Response

from ._shared import (
    Page, PostForm, RowAuthor, RowPost, finish_peer_app, logged_in_user_id, make_peer_app, page_number, post_from_row,
)

app, posts = make_peer_app(__name__)
_local = threading.local()
_BUSY_TIMEOUT = float(os.environ.get("SQLITE_BUSY_TIMEOUT", "5"))  # seconds; myapp's default


def database_path(database_url: str) -> str:
    """The file of SQLAlchemy's ``sqlite:////abs/path.sqlite`` (or ``sqlite:///relative.sqlite``)."""
    scheme, separator, rest = database_url.partition(":///")
    if scheme not in ("sqlite", "sqlite+pysqlite") or not separator or not rest.split("?", 1)[0]:
        raise ValueError(f"not an SQLite file URL: {database_url!r}")
    return rest.split("?", 1)[0]


_PATH = database_path(app.config["DATABASE_URL"])
_POST_COLUMNS = (
    'p.id, p.author_id, p.title, p.body, p.created_at, p.updated_at, u.username '
    'FROM post p JOIN "user" u ON u.id = p.author_id'
)

# The page's ids from the (created_at, id) index alone, then only those rows joined, as
# myapp's query does: with psycopg_raw's plain join SQLite steps through every skipped
# row and its author (about 3 ms of CPU a page on the bench data, against 0.1 ms),
# which would make this peer no floor at all.
_PAGE_QUERY = (
    f"SELECT {_POST_COLUMNS} JOIN (SELECT id FROM post ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?) page "
    "ON page.id = p.id ORDER BY p.created_at DESC, p.id DESC"
)


def connection() -> sqlite3.Connection:
    """This thread's connection, opened on first use (after gunicorn's fork)."""
    conn: sqlite3.Connection | None = getattr(_local, "conn", None)
    if conn is None:
        conn = sqlite3.connect(_PATH, timeout=_BUSY_TIMEOUT, isolation_level=None)
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA journal_mode=WAL")
        _local.conn = conn
    return conn


def _post(row: tuple[Any, ...]) -> RowPost:
    """SQLite hands back the text SQLAlchemy stored (``YYYY-MM-DD HH:MM:SS.ffffff``)."""
    created_at, updated_at = row[4], row[5]
    return post_from_row((
        *row[:4], datetime.fromisoformat(created_at), datetime.fromisoformat(updated_at) if updated_at else None, row[6],
    ))


@app.before_request
def load_logged_in_user() -> None:
    user_id = logged_in_user_id()
    if user_id is not None:
        row = connection().execute('SELECT id, username FROM "user" WHERE id = ?', (user_id,)).fetchone()
        if row is not None:
            g.user = RowAuthor(*row)
            g.username = g.user.username


@posts.get("/")
def index() -> str:
    number, per_page = page_number(), app.config["POSTS_PER_PAGE"]
    rows = connection().execute(_PAGE_QUERY, (per_page + 1, (number - 1) * per_page)).fetchall()
    return render_template("posts/index.html", page=Page.of_rows(rows, number, per_page, _post))


@posts.get("/posts/<int:post_id>")
def detail(post_id: int) -> str:
    row = connection().execute(f"SELECT {_POST_COLUMNS} WHERE p.id = ?", (post_id,)).fetchone()
    if row is None:
        abort(404)
    return render_template("posts/detail.html", post=_post(row))


@posts.route("/posts/new", methods=("GET", "POST"))
def create() -> str | Response:
    if g.user is None:
        return redirect(url_for("auth.login"))
    form = PostForm()
    if form.validate_on_submit():
        # The text form SQLAlchemy writes, so that rows of every app sort alike.
        now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
        cursor = connection().execute(
            "INSERT INTO post (author_id, title, body, created_at, version) VALUES (?, ?, ?, ?, 1)",
            (g.user.id, form.title.data, form.body.data, now),
        )
        flash("Your post is published.", "success")
        return redirect(url_for("posts.detail", post_id=cursor.lastrowid))
    return render_template("posts/form.html", form=form, post=None)


finish_peer_app(app, posts)
