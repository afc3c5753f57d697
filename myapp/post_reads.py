"""What the read-only post pages show: rows from Core statements, not ORM objects.

A page that only displays posts needs no identity map, no change tracking and no lazy
loads. Selecting the tables' columns and building small frozen records takes a fifth
off the post page's CPU in process, the query itself a third, against loading ``Post``
and ``User`` instances (bench/notes.md). The models stay the source of truth: the columns come from their
tables, and the statements are built once, at import, with bound parameters, so a
request only binds values and finds the compiled form in SQLAlchemy's cache.

Pages that change a post (edit, delete) still load the ORM object.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Integer, Select, bindparam, select

from .db import db
from .models import Post, User

_post, _user = Post.__table__.c, User.__table__.c


@dataclass(frozen=True, slots=True)
class Author:
    id: int
    username: str


@dataclass(frozen=True, slots=True)
class PostRecord:
    """A post as the templates read it (``post.author.username`` included)."""

    id: int
    author_id: int
    title: str
    body: str
    created_at: datetime
    updated_at: datetime | None
    author: Author


def _with_author(*columns: Any) -> Select[Any]:
    return select(*columns).join_from(Post.__table__, User.__table__, _post.author_id == _user.id)


_COLUMNS = (_post.id, _post.author_id, _post.title, _post.body, _post.created_at, _post.updated_at, _user.username)
_BY_ID = _with_author(*_COLUMNS).where(_post.id == bindparam("post_id"))


def _page_of(ids: Select[Any]) -> Select[Any]:
    """The page's ids come from the (created_at, id) index alone, one row more than a
    page instead of a COUNT; only those rows are joined to their text and author, so a
    deep OFFSET walks the index, not whole rows."""
    order = (_post.created_at.desc(), _post.id.desc())
    picked = (
        ids.order_by(*order)
        .limit(bindparam("limit", type_=Integer))
        .offset(bindparam("offset", type_=Integer))
        .subquery()
    )
    return _with_author(*_COLUMNS).join(picked, _post.id == picked.c.id).order_by(*order)


_LATEST = _page_of(select(_post.id))
_BY_AUTHOR = _page_of(select(_post.id).where(_post.author_id == bindparam("author_id")))


def _record(row: Sequence[Any]) -> PostRecord:
    post_id, author_id, title, body, created_at, updated_at, username = row
    return PostRecord(post_id, author_id, title, body, created_at, updated_at, Author(author_id, username))


def post_record(post_id: int) -> PostRecord | None:
    """The post with its author's name, in one query; None if there is none."""
    row = db.session.execute(_BY_ID, {"post_id": post_id}).first()
    return _record(row) if row is not None else None


def latest_records(limit: int, offset: int, author_id: int | None = None) -> list[PostRecord]:
    """Up to ``limit`` posts, newest first, from ``offset`` on (one query); only
    ``author_id``'s posts if given."""
    if author_id is None:
        result = db.session.execute(_LATEST, {"limit": limit, "offset": offset})
    else:
        result = db.session.execute(_BY_AUTHOR, {"limit": limit, "offset": offset, "author_id": author_id})
    return [_record(row) for row in result]
