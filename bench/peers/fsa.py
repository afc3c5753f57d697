"""Flask-SQLAlchemy 3.1, as its documentation writes an app: ``db.Model`` models,
``db.get_or_404``, ``db.paginate`` over a ``select`` that joins each post's author,
``db.session.commit()``. ``pool_pre_ping`` on, the same restart promise as myapp's."""

from __future__ import annotations

from datetime import datetime, timezone

from flask import flash, g, redirect, render_template, url_for
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import ForeignKey, String, Text, select
from sqlalchemy.orm import DeclarativeBase, Mapped, joinedload, mapped_column, relationship
from werkzeug.wrappers import Response

from ._shared import Page, PostForm, finish_peer_app, logged_in_user_id, make_peer_app, page_number


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class User(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "user"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(80), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Post(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "post"

    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("user.id"))
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime | None]
    version: Mapped[int] = mapped_column(default=1)

    author: Mapped[User] = relationship()


app, posts = make_peer_app(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = app.config["DATABASE_URL"]
app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
    "pool_pre_ping": True,
    "connect_args": {"application_name": "bench-fsa"} if app.config["DATABASE_URL"].startswith("postgresql") else {},
}
db.init_app(app)


@app.before_request
def load_logged_in_user() -> None:
    user_id = logged_in_user_id()
    if user_id is not None:
        g.user = db.session.get(User, user_id)
        g.username = g.user.username if g.user is not None else None


@posts.get("/")
def index() -> str:
    stmt = select(Post).options(joinedload(Post.author)).order_by(Post.created_at.desc(), Post.id.desc())
    pagination = db.paginate(stmt, page=page_number(), per_page=app.config["POSTS_PER_PAGE"])
    page = Page(items=pagination.items, number=pagination.page, has_next=pagination.has_next)
    return render_template("posts/index.html", page=page)


@posts.get("/posts/<int:post_id>")
def detail(post_id: int) -> str:
    return render_template("posts/detail.html", post=db.get_or_404(Post, post_id))


@posts.route("/posts/new", methods=("GET", "POST"))
def create() -> str | Response:
    if g.user is None:
        return redirect(url_for("auth.login"))
    form = PostForm()
    if form.validate_on_submit():
        post = Post(title=form.title.data, body=form.body.data, author=g.user)
        db.session.add(post)
        db.session.commit()
        flash("Your post is published.", "success")
        return redirect(url_for("posts.detail", post_id=post.id))
    return render_template("posts/form.html", form=form, post=None)


finish_peer_app(app, posts)
