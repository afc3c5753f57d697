"""What a session wrote (myapp/db/tracking.py): one record for lost-write detection,
read-your-writes and the replicas."""

from __future__ import annotations

import pytest
from flask import Flask
from sqlalchemy import text

from myapp.db import LostWriteError, db, has_writes
from myapp.db.session import state_of
from myapp.db.tracking import describe_uncommitted
from myapp.models import User


def test_a_flushed_write_is_uncommitted_until_the_commit_then_committed(app: Flask) -> None:
    with app.app_context():
        session = db.session()
        session.add(User(username="tracked", password_hash="x"))
        session.flush()
        assert describe_uncommitted(session) == ["flushed new User"]
        assert has_writes(session) and state_of(session).wrote
        session.commit()
        state = state_of(session)
        assert state.uncommitted == [] and state.committed_writes and state.wrote
        assert not has_writes(session)


def test_a_rollback_forgets_what_was_written(app: Flask) -> None:
    with app.app_context():
        session = db.session()
        session.execute(text("UPDATE post SET title = title WHERE 1 = 0"))
        assert describe_uncommitted(session) == ["flushed UPDATE statement"]
        session.rollback()
        assert describe_uncommitted(session) == [] and not state_of(session).wrote


def test_a_write_behind_a_tracing_comment_is_still_a_lost_write(app: Flask) -> None:
    """Bug: the verb was read after spaces and "(" only, so a comment in front (the
    style sqlcommenter adds) hid a DELETE from lost-write detection."""

    @app.post("/_test/commented-delete")
    def commented_delete() -> str:
        db.session.execute(text("/* controller='posts',action='purge' */ DELETE FROM post WHERE 1 = 0"))
        return "forgot to commit"

    with pytest.raises(LostWriteError, match="DELETE statement"):
        app.test_client().post("/_test/commented-delete")


def test_each_session_has_its_own_state(app: Flask) -> None:
    with app.app_context():
        first = db.get_session()
        second = db.get_session()
        try:
            first.add(User(username="only-in-first", password_hash="x"))
            first.flush()
            assert state_of(first).uncommitted and not state_of(second).uncommitted
        finally:
            first.close()
            second.close()
