"""Account writes shared by the registration form and the ``flask user`` commands.

Each function is one unit of work: it commits once, in its own transaction, and is
re-run whole after a Galera certification failure. Input is validated by the caller
(the registration form's rules); these functions only store it.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from werkzeug.security import generate_password_hash

from .db import db
from .models import User


class UsernameTaken(Exception):
    """Another account already has this (normalised) username."""


class UnknownUser(LookupError):
    """No account has this username."""


def create_user(username: str, password: str) -> User:
    """Store a new account with a hash of ``password``; raise ``UsernameTaken`` if the
    name is in use.

    The name is checked before the deliberately slow hash, so a taken name answers at
    once; the unique index still settles a race with a concurrent registration.
    """
    if db.session.scalar(select(User.id).where(User.username == username)) is not None:
        raise UsernameTaken(username)
    password_hash = generate_password_hash(password)

    @db.retrying()
    def add_user() -> User:
        user = User(username=username, password_hash=password_hash)
        with db.transaction() as session:
            session.add(user)
        return user

    try:
        return add_user()
    except IntegrityError:
        raise UsernameTaken(username) from None


def set_password(username: str, password: str) -> None:
    """Replace the account's password hash; raise ``UnknownUser`` if there is none."""
    password_hash = generate_password_hash(password)

    @db.retrying()
    def replace_hash() -> None:
        # Inside the retried unit: a retry reads the account again.
        user = db.session.scalar(select(User).where(User.username == username))
        if user is None:
            raise UnknownUser(username)
        with db.transaction():
            user.password_hash = password_hash

    replace_hash()
