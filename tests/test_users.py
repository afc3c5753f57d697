"""Account writes (myapp.users), called directly as the registration view and the
``flask user`` commands call them, on every backend."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from sqlalchemy import Select, false, select
from werkzeug.security import check_password_hash, generate_password_hash

import myapp.users
from myapp.db import db
from myapp.models import User
from myapp.users import UnknownUser, UsernameTaken, create_user, set_password

from tests.support.certification import CertificationFailures

PASSWORD = "correct horse"


def accounts(app: Flask) -> dict[str, str]:
    """Every stored account's password hash, by username."""
    with app.app_context():
        rows = db.session.execute(select(User.username, User.password_hash))
        return {username: password_hash for username, password_hash in rows}


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The passwords create_user and set_password hashed, in order."""
    passwords: list[str] = []

    def recording_hash(password: str) -> str:
        passwords.append(password)
        return generate_password_hash(password)

    monkeypatch.setattr(myapp.users, "generate_password_hash", recording_hash)
    return passwords


def test_create_user_stores_one_account_with_a_hash_of_the_password(app: Flask) -> None:
    with app.app_context():
        user_id = create_user("alice", PASSWORD).id
        assert db.session.scalar(select(User.id).where(User.username == "alice")) == user_id
    stored = accounts(app)
    assert list(stored) == ["alice"] and PASSWORD not in stored["alice"]
    assert check_password_hash(stored["alice"], PASSWORD)


def test_create_user_refuses_a_taken_name_before_hashing(app: Flask, hashed: list[str]) -> None:
    with app.app_context():
        create_user("alice", PASSWORD)
        with pytest.raises(UsernameTaken):
            create_user("alice", "another password")
    assert hashed == [PASSWORD], "no slow hash for a name that is taken"
    assert check_password_hash(accounts(app)["alice"], PASSWORD)


def test_create_user_turns_the_unique_index_into_username_taken_and_can_go_on(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pre-check misses the other account (as when it commits just after the
    check): the INSERT hits the unique index, the caller gets UsernameTaken, and the
    failed transaction is rolled back, so the same session writes again."""
    with app.app_context():
        create_user("alice", PASSWORD)

    def select_missing_ids(*entities: Any) -> Select[Any]:
        statement = select(*entities)
        return statement.where(false()) if entities == (User.id,) else statement

    monkeypatch.setattr(myapp.users, "select", select_missing_ids)
    with app.app_context():
        with pytest.raises(UsernameTaken):
            create_user("alice", "another password")
        create_user("bob", "bob's password")
    stored = accounts(app)
    assert sorted(stored) == ["alice", "bob"]
    assert check_password_hash(stored["alice"], PASSWORD)


def test_create_user_is_rerun_whole_after_a_certification_failure(
    app: Flask, certification_failures: CertificationFailures, hashed: list[str]
) -> None:
    certification_failures.next(1)
    with app.app_context():
        create_user("alice", PASSWORD)
    assert certification_failures.raised == 1
    assert list(accounts(app)) == ["alice"]
    assert hashed == [PASSWORD], "the retry re-runs the transaction, not the hash"


def test_set_password_replaces_the_hash(app: Flask) -> None:
    with app.app_context():
        create_user("alice", PASSWORD)
        create_user("bob", PASSWORD)
        set_password("alice", "new password")
    stored = accounts(app)
    assert check_password_hash(stored["alice"], "new password")
    assert check_password_hash(stored["bob"], PASSWORD), "only that account"


def test_set_password_of_an_unknown_user_changes_nothing(app: Flask) -> None:
    with app.app_context():
        create_user("alice", PASSWORD)
        with pytest.raises(UnknownUser):
            set_password("mallory", "new password")
    assert check_password_hash(accounts(app)["alice"], PASSWORD)


def test_set_password_is_rerun_whole_after_a_certification_failure(
    app: Flask, certification_failures: CertificationFailures
) -> None:
    with app.app_context():
        create_user("alice", PASSWORD)
    certification_failures.next(1)
    with app.app_context():
        set_password("alice", "new password")
    assert certification_failures.raised == 1
    assert check_password_hash(accounts(app)["alice"], "new password")
