"""What every peer shares with myapp apart from its database layer: the templates,
the static files, the endpoint names the templates link to, the post form and the
page object, so that a difference in throughput is a difference in database code.

Configuration comes from the environment, like myapp's: ``SECRET_KEY`` (the same
key lets one signed session cookie log the bench in on every app), ``DATABASE_URL``
and ``POSTS_PER_PAGE``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, abort, g, session
from flask_wtf import FlaskForm
from wtforms import StringField, TextAreaField
from wtforms.validators import DataRequired, Length

# myapp's templates format post times with this filter, so every peer that renders them
# registers it too (a formatting helper, no database work: the comparison is unchanged).
from myapp.posts import html_datetime

MYAPP = Path(__file__).resolve().parents[2] / "myapp"
TITLE_MAX_LENGTH = 200
BODY_MAX_LENGTH = 20_000


class PostForm(FlaskForm):
    """The same fields and limits as myapp's form (CSRF is off in the bench config)."""

    title = StringField(
        "Title",
        filters=[lambda value: value.strip() if value else value],
        validators=[DataRequired(), Length(max=TITLE_MAX_LENGTH)],
    )
    body = TextAreaField("Body", validators=[DataRequired(), Length(max=BODY_MAX_LENGTH)])


@dataclass
class Page:
    """What ``posts/_list.html`` reads: the posts, the page number, and the neighbours."""

    items: list[Any]
    number: int
    has_next: bool

    @property
    def has_prev(self) -> bool:
        return self.number > 1

    @classmethod
    def of_rows(cls, rows: list[Any], number: int, per_page: int, build: Callable[[Any], Any]) -> Page:
        """A page from a query that asked for one row more than a page (the raw peers'
        way of knowing there is a next page); an empty page past the first is a 404."""
        if not rows and number > 1:
            abort(404)
        return cls([build(row) for row in rows[:per_page]], number, has_next=len(rows) > per_page)


@dataclass
class RowAuthor:
    """A post's author as the hand-written peers build it from a row (what templates read)."""

    id: int
    username: str


@dataclass
class RowPost:
    """A post as the hand-written peers build it from a row: the attributes the templates read."""

    id: int
    author_id: int
    title: str
    body: str
    created_at: datetime
    updated_at: datetime | None
    author: RowAuthor


def post_from_row(row: tuple[Any, ...]) -> RowPost:
    """``(id, author_id, title, body, created_at, updated_at, username)``: the column order
    of the hand-written peers' post queries. (``psycopg_raw`` keeps its own copy of these
    classes, unchanged since it was first measured.)"""
    post_id, author_id, title, body, created_at, updated_at, username = row
    return RowPost(post_id, author_id, title, body, created_at, updated_at, RowAuthor(author_id, username))


def make_peer_app(name: str) -> tuple[Flask, Blueprint]:
    """A Flask app on myapp's templates, and the ``posts`` blueprint for its views.

    The endpoints the layout links to but the benchmark never calls are registered
    as 404 stubs so that ``url_for`` builds the same links as myapp's.
    """
    app = Flask(name, template_folder=str(MYAPP / "templates"), static_folder=str(MYAPP / "static"))
    app.config.update(
        SECRET_KEY=os.environ["SECRET_KEY"],
        DATABASE_URL=os.environ.get("DATABASE_URL", ""),
        POSTS_PER_PAGE=int(os.environ.get("POSTS_PER_PAGE", "20")),
        WTF_CSRF_ENABLED=False,
        MAX_CONTENT_LENGTH=1024 * 1024,
    )
    app.add_template_filter(html_datetime, "html_datetime")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    auth = Blueprint("auth", __name__, url_prefix="/auth")
    for rule, endpoint in (("/register", "register"), ("/login", "login"), ("/logout", "logout")):
        auth.add_url_rule(rule, endpoint, _not_served)
    app.register_blueprint(auth)

    posts = Blueprint("posts", __name__)
    posts.add_url_rule("/users/<username>", "user_posts", _not_served)
    posts.add_url_rule("/posts/<int:post_id>/edit", "edit", _not_served)
    posts.add_url_rule("/posts/<int:post_id>/delete", "delete", _not_served)
    return app, posts


def finish_peer_app(app: Flask, posts: Blueprint) -> Flask:
    """Register the peer's views and the ``index`` alias the layout links to."""
    app.register_blueprint(posts)
    app.add_url_rule("/", endpoint="index")
    return app


def logged_in_user_id() -> int | None:
    """The user id of the signed session cookie, as myapp's login stores it."""
    g.user = None
    g.username = None
    user_id = session.get("user_id")
    return user_id if isinstance(user_id, int) else None


def page_number() -> int:
    """``?page=N``, as Flask apps usually read it; a page past the end is a 404."""
    from flask import request

    number = request.args.get("page", 1, type=int)
    if number is None or number < 1:
        abort(404)
    return number


def _not_served(**kwargs: Any) -> Any:
    abort(404)
