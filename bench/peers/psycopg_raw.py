"""Hand-written psycopg 3: one connection per thread, raw SQL, autocommit (each
statement is its own transaction, so a page costs exactly its queries' round trips).
The floor of what the database can cost; it has no pre-ping, so unlike the others it
would fail requests after a database restart."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime

import psycopg
from flask import abort, flash, g, redirect, render_template, url_for
from werkzeug.wrappers import Response

from ._shared import Page, PostForm, finish_peer_app, logged_in_user_id, make_peer_app, page_number

app, posts = make_peer_app(__name__)
# postgresql+psycopg://... is SQLAlchemy's spelling; libpq wants postgresql://...
_CONNINFO = app.config["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://", 1)
_local = threading.local()


@dataclass
class Author:
    id: int
    username: str


@dataclass
class Post:
    id: int
    author_id: int
    title: str
    body: str
    created_at: datetime
    updated_at: datetime | None
    author: Author


_POST_COLUMNS = 'p.id, p.author_id, p.title, p.body, p.created_at, p.updated_at, u.username FROM post p JOIN "user" u ON u.id = p.author_id'


def connection() -> psycopg.Connection[tuple]:
    """This thread's connection, opened on first use (after gunicorn's fork)."""
    conn: psycopg.Connection[tuple] | None = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = psycopg.connect(_CONNINFO, autocommit=True, application_name="bench-psycopg")
        _local.conn = conn
    return conn


def _post(row: tuple) -> Post:
    post_id, author_id, title, body, created_at, updated_at, username = row
    return Post(post_id, author_id, title, body, created_at, updated_at, Author(author_id, username))


@app.before_request
def load_logged_in_user() -> None:
    user_id = logged_in_user_id()
    if user_id is not None:
        row = connection().execute('SELECT id, username FROM "user" WHERE id = %s', (user_id,)).fetchone()
        if row is not None:
            g.user = Author(*row)
            g.username = g.user.username


@posts.get("/")
def index() -> str:
    number, per_page = page_number(), app.config["POSTS_PER_PAGE"]
    rows = connection().execute(
        f"SELECT {_POST_COLUMNS} ORDER BY p.created_at DESC, p.id DESC LIMIT %s OFFSET %s",
        (per_page + 1, (number - 1) * per_page),
    ).fetchall()
    if not rows and number > 1:
        abort(404)
    page = Page([_post(row) for row in rows[:per_page]], number, has_next=len(rows) > per_page)
    return render_template("posts/index.html", page=page)


@posts.get("/posts/<int:post_id>")
def detail(post_id: int) -> str:
    row = connection().execute(f"SELECT {_POST_COLUMNS} WHERE p.id = %s", (post_id,)).fetchone()
    if row is None:
        abort(404)
    return render_template("posts/detail.html", post=_post(row))


@posts.route("/posts/new", methods=("GET", "POST"))
def create() -> str | Response:
    if g.user is None:
        return redirect(url_for("auth.login"))
    form = PostForm()
    if form.validate_on_submit():
        row = connection().execute(
            "INSERT INTO post (author_id, title, body, created_at, version) "
            "VALUES (%s, %s, %s, now() AT TIME ZONE 'UTC', 1) RETURNING id",
            (g.user.id, form.title.data, form.body.data),
        ).fetchone()
        assert row is not None
        flash("Your post is published.", "success")
        return redirect(url_for("posts.detail", post_id=row[0]))
    return render_template("posts/form.html", form=form, post=None)


finish_peer_app(app, posts)
