"""Bare Flask: the same pages from constants, no database at all. The ceiling: what
Flask, Jinja and the templates cost without any data access."""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace

from flask import flash, g, redirect, render_template, url_for
from werkzeug.wrappers import Response

from ._shared import Page, PostForm, finish_peer_app, logged_in_user_id, make_peer_app, page_number

app, posts = make_peer_app(__name__)

_AUTHOR = SimpleNamespace(id=1, username="constant-author")
_POSTS = [
    SimpleNamespace(
        id=number,
        author_id=_AUTHOR.id,
        author=_AUTHOR,
        title=f"Post number {number}",
        body="Seeded text. " * 20,
        created_at=datetime(2026, 1, 1, 12, 0),
        updated_at=None,
    )
    for number in range(1, 22)
]


@app.before_request
def load_logged_in_user() -> None:
    if logged_in_user_id() is not None:
        g.user, g.username = _AUTHOR, _AUTHOR.username


@posts.get("/")
def index() -> str:
    per_page = app.config["POSTS_PER_PAGE"]
    page = Page(items=_POSTS[:per_page], number=page_number(), has_next=True)
    return render_template("posts/index.html", page=page)


@posts.get("/posts/<int:post_id>")
def detail(post_id: int) -> str:
    return render_template("posts/detail.html", post=_POSTS[0])


@posts.route("/posts/new", methods=("GET", "POST"))
def create() -> str | Response:
    form = PostForm()
    if form.validate_on_submit():
        flash("Your post is published.", "success")
        return redirect(url_for("posts.detail", post_id=_POSTS[0].id))
    return render_template("posts/form.html", form=form, post=None)


finish_peer_app(app, posts)
