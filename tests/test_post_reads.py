"""The read-only post pages' queries (myapp/post_reads.py): the same values the ORM
would load, newest first, one statement each, and no ORM object in the session."""

from __future__ import annotations

import dataclasses

from flask import Flask
from sqlalchemy import select
from sqlalchemy.orm import joinedload

from myapp.db import db
from myapp.models import Post, User
from myapp.post_reads import Author, PostRecord, latest_records, post_record
from tests.support.posts import add_posts
from tests.support.queries import assert_num_queries


def test_a_record_holds_what_the_orm_loads(app: Flask) -> None:
    post_id = add_posts(app, 2, authors=("alice",))[1]
    with app.test_request_context():
        with assert_num_queries(app, 1):
            record = post_record(post_id)
        assert len(db.session.identity_map) == 0  # rows, not objects: nothing to track
        post = db.session.get(Post, post_id, options=[joinedload(Post.author)])
        assert post is not None
        assert record == PostRecord(
            post.id, post.author_id, post.title, post.body, post.created_at, post.updated_at,
            Author(post.author_id, post.author.username),
        )
        assert record.title == "post 1" and record.author.username == "alice"


def test_a_record_has_every_column_of_a_post_but_its_version(app: Flask) -> None:
    """A column added to the model shows up here, to be added to the record (or not)."""
    record_fields = {field.name for field in dataclasses.fields(PostRecord)}
    assert {column.key for column in Post.__table__.columns} - record_fields == {"version"}


def test_no_such_post_is_none(app: Flask) -> None:
    with app.test_request_context():
        assert post_record(123_456) is None


def test_latest_newest_first_with_limit_and_offset(app: Flask) -> None:
    add_posts(app, 7)
    with app.test_request_context():
        with assert_num_queries(app, 1):
            records = latest_records(3, 2)
        assert [record.title for record in records] == ["post 4", "post 3", "post 2"]
        assert [record.author.username for record in records] == ["bob", "alice", "carol"]
        assert latest_records(5, 5) == latest_records(2, 5)  # the end: two left
        assert len(db.session.identity_map) == 0


def test_latest_of_one_author(app: Flask) -> None:
    add_posts(app, 7)
    with app.test_request_context():
        bob = db.session.scalar(select(User.id).where(User.username == "bob"))
        records = latest_records(10, 0, author_id=bob)
    assert [record.title for record in records] == ["post 4", "post 1"]
    assert {record.author_id for record in records} == {bob}
