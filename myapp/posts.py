"""Posts: the index, a post's page, a user's page, and writing, editing, deleting."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NoReturn, cast

from flask import Blueprint, abort, current_app, flash, g, redirect, render_template, request, url_for
from flask_wtf import FlaskForm
from sqlalchemy import select
from sqlalchemy.orm import joinedload
from sqlalchemy.orm.exc import StaleDataError
from werkzeug.wrappers import Response
from wtforms import HiddenField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, ValidationError

from .auth import login_required
from .db import db
from .models import TITLE_MAX_LENGTH, Post, User, normalize_username
from .post_reads import PostRecord, latest_records, post_record

bp = Blueprint("posts", __name__)

BODY_MAX_LENGTH = 20_000
MAX_PAGE = 10_000  # an absurd page number is a 404, not an OFFSET the database must walk
_MAX_ID = 2**31 - 1  # the largest id every backend's INTEGER holds


def _no_nul(form: FlaskForm, field: Any) -> None:
    # PostgreSQL refuses NUL in text; refuse it everywhere, as a form error.
    if field.data and "\x00" in field.data:
        raise ValidationError("This field contains a character that is not allowed.")


class PostForm(FlaskForm):  # type: ignore[misc]  # Flask-WTF ships no type hints
    title = StringField(
        "Title",
        filters=[lambda value: value.strip() if value else value],
        validators=[DataRequired(), Length(max=TITLE_MAX_LENGTH), _no_nul],
    )
    body = TextAreaField(
        "Body", validators=[DataRequired(), Length(max=BODY_MAX_LENGTH), _no_nul]
    )
    version = HiddenField()


@bp.app_template_filter("html_datetime")
def html_datetime(value: datetime) -> str:
    """A ``<time datetime>`` value: HTML allows at most 3 fractional digits (isoformat()
    writes 6), and the columns hold naive UTC (models.utcnow), so say UTC with "Z"."""
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value.isoformat(timespec="seconds") + "Z"


@dataclass
class Page:
    items: list[PostRecord]
    number: int
    has_next: bool

    @property
    def has_prev(self) -> bool:
        return self.number > 1


def _page_number() -> int:
    raw = request.args.get("page", "1")
    # ASCII only: str.isdigit() also accepts "²" (which int() rejects: a 500) and "١".
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_PAGE:
        abort(404)
    return int(raw)


def paginate(number: int, author_id: int | None = None) -> Page:
    """One query per page, whatever its size (``post_reads``); a page past the last is a 404."""
    per_page = current_app.config["POSTS_PER_PAGE"]
    records = latest_records(per_page + 1, (number - 1) * per_page, author_id)
    if not records and number > 1:
        abort(404)
    return Page(items=records[:per_page], number=number, has_next=len(records) > per_page)


def _missing(post_id: int) -> NoReturn:
    abort(404, f"Post {post_id} does not exist.")


def get_post(post_id: int) -> Post:
    """The logged-in user's own post, as an ORM object to change: 404 if there is no
    such post, 403 if someone else wrote it."""
    post = db.session.get(Post, post_id, options=[joinedload(Post.author)]) if 0 < post_id <= _MAX_ID else None
    if post is None:
        _missing(post_id)
    if g.user is None or post.author_id != g.user.id:
        abort(403)
    return post


@bp.get("/")
def index() -> str:
    page = paginate(_page_number())
    return render_template("posts/index.html", page=page)


@bp.get("/users/<username>")
def user_posts(username: str) -> str:
    name = normalize_username(username)
    # No account holds a NUL, and PostgreSQL refuses one even in a WHERE clause (a 500).
    user = db.session.scalar(select(User).where(User.username == name)) if "\x00" not in name else None
    if user is None:
        abort(404, "No such user.")
    page = paginate(_page_number(), author_id=user.id)
    return render_template("posts/user.html", user=user, page=page)


@bp.get("/posts/<int:post_id>")
def detail(post_id: int) -> str:
    post = post_record(post_id) if 0 < post_id <= _MAX_ID else None
    if post is None:
        _missing(post_id)
    return render_template("posts/detail.html", post=post)


@bp.route("/posts/new", methods=("GET", "POST"))
@login_required
def create() -> str | Response:
    form = PostForm()
    if form.validate_on_submit():

        @db.retrying()
        def publish() -> Post:
            post = Post(title=form.title.data, body=form.body.data, author_id=g.user.id)
            with db.transaction() as session:
                session.add(post)
            return post

        post = publish()
        flash("Your post is published.", "success")
        return redirect(url_for("posts.detail", post_id=post.id))
    return render_template("posts/form.html", form=form, post=None)


@bp.route("/posts/<int:post_id>/edit", methods=("GET", "POST"))
@login_required
def edit(post_id: int) -> tuple[str, int] | str | Response:
    post = get_post(post_id)
    form = PostForm(obj=post)
    if request.method == "GET":
        form.version.data = str(post.version)
    elif form.validate_on_submit():

        @db.retrying()
        def save() -> bool:
            # Inside the retried unit: a retry re-reads the post, and a save that
            # committed meanwhile (the one our certification lost to) is a conflict.
            if form.version.data != str(post.version):
                return False
            with db.transaction():
                post.title = cast(str, form.title.data)
                post.body = cast(str, form.body.data)
            return True

        try:
            saved = save()
        except StaleDataError:
            # The version check in the UPDATE lost a race with another save.
            saved = False
        if not saved:
            return _conflict(form, post)
        flash("Your changes are saved.", "success")
        return redirect(url_for("posts.detail", post_id=post.id))
    return render_template("posts/form.html", form=form, post=post)


def _conflict(form: PostForm, post: Post) -> tuple[str, int]:
    """Someone saved this post since the form was loaded: keep the user's text, say so."""
    db.session.refresh(post)
    form.version.data = str(post.version)
    form.form_errors.append(
        "This post was changed by someone else while you were editing. Your text is kept "
        "below; review the post and save again to overwrite it."
    )
    return render_template("posts/form.html", form=form, post=post), 409


@bp.post("/posts/<int:post_id>/delete")
@login_required
def delete(post_id: int) -> Response:

    @db.retrying()
    def remove() -> None:
        with db.transaction() as session:
            session.delete(get_post(post_id))

    remove()
    flash("The post is deleted.", "info")
    return redirect(url_for("index"))
