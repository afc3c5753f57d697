"""The Flask documentation's "SQLAlchemy in Flask" pattern: a module-level engine, a
thread-scoped ``scoped_session(sessionmaker(...))``, and ``shutdown_session`` removing
it in ``teardown_appcontext``; queries in SQLAlchemy 2.x style. ``pool_pre_ping`` on,
the same restart promise as myapp's."""

from __future__ import annotations

from datetime import datetime, timezone

from flask import abort, flash, g, redirect, render_template, url_for
from sqlalchemy import ForeignKey, String, Text, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, joinedload, mapped_column, relationship, scoped_session, sessionmaker
from werkzeug.wrappers import Response

from ._shared import Page, PostForm, finish_peer_app, logged_in_user_id, make_peer_app, page_number

app, posts = make_peer_app(__name__)
_url = app.config["DATABASE_URL"]
engine = create_engine(
    _url,
    pool_pre_ping=True,
    connect_args={"application_name": "bench-scoped"} if _url.startswith("postgresql") else {},
)
db_session = scoped_session(sessionmaker(autoflush=False, bind=engine))


class Base(DeclarativeBase):
    pass


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class User(Base):
    __tablename__ = "user"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(80), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Post(Base):
    __tablename__ = "post"

    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("user.id"))
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime | None]
    version: Mapped[int] = mapped_column(default=1)

    author: Mapped[User] = relationship()


@app.teardown_appcontext
def shutdown_session(exception: BaseException | None = None) -> None:
    db_session.remove()


@app.before_request
def load_logged_in_user() -> None:
    user_id = logged_in_user_id()
    if user_id is not None:
        g.user = db_session.get(User, user_id)
        g.username = g.user.username if g.user is not None else None


@posts.get("/")
def index() -> str:
    number, per_page = page_number(), app.config["POSTS_PER_PAGE"]
    stmt = (
        select(Post)
        .options(joinedload(Post.author))
        .order_by(Post.created_at.desc(), Post.id.desc())
        .limit(per_page + 1)
        .offset((number - 1) * per_page)
    )
    rows = list(db_session.scalars(stmt))
    if not rows and number > 1:
        abort(404)
    return render_template("posts/index.html", page=Page(rows[:per_page], number, len(rows) > per_page))


@posts.get("/posts/<int:post_id>")
def detail(post_id: int) -> str:
    post = db_session.get(Post, post_id)
    if post is None:
        abort(404)
    return render_template("posts/detail.html", post=post)


@posts.route("/posts/new", methods=("GET", "POST"))
def create() -> str | Response:
    if g.user is None:
        return redirect(url_for("auth.login"))
    form = PostForm()
    if form.validate_on_submit():
        post = Post(title=form.title.data, body=form.body.data, author=g.user)
        db_session.add(post)
        db_session.commit()
        flash("Your post is published.", "success")
        return redirect(url_for("posts.detail", post_id=post.id))
    return render_template("posts/form.html", form=form, post=None)


finish_peer_app(app, posts)
