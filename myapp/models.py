"""The models: users and their posts."""

from __future__ import annotations

import unicodedata
from datetime import datetime, timezone

from sqlalchemy import Double, ForeignKey, Index, String, Text
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .db import Base

USERNAME_MAX_LENGTH = 80
TITLE_MAX_LENGTH = 200
RATE_LIMIT_KEY_MAX_LENGTH = 255

# Case- and space-sensitive on every backend: MariaDB's default collation would
# otherwise treat "Alice" and "alice " as equal while PostgreSQL and SQLite do not.
_UsernameType = String(USERNAME_MAX_LENGTH).with_variant(
    mysql.VARCHAR(USERNAME_MAX_LENGTH, collation="utf8mb4_bin"), "mysql", "mariadb"
)

# Rate-limit keys hold a normalised username: compared byte for byte, like usernames.
_RateLimitKeyType = String(RATE_LIMIT_KEY_MAX_LENGTH).with_variant(
    mysql.VARCHAR(RATE_LIMIT_KEY_MAX_LENGTH, collation="utf8mb4_bin"), "mysql", "mariadb"
)


def utcnow() -> datetime:
    """Naive UTC, the one form that all three backends store and return alike."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def normalize_username(raw: str) -> str:
    """The canonical form of a username, so that uniqueness means the same everywhere."""
    return unicodedata.normalize("NFKC", raw).strip().casefold()


class User(Base):
    __tablename__ = "user"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(_UsernameType, unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    posts: Mapped[list[Post]] = relationship(
        back_populates="author", cascade="all, delete-orphan", passive_deletes=True
    )

    def __repr__(self) -> str:
        return f"<User {self.id} {self.username!r}>"


class Post(Base):
    __tablename__ = "post"

    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), index=True)
    title: Mapped[str] = mapped_column(String(TITLE_MAX_LENGTH))
    # MEDIUMTEXT on MariaDB/MySQL: TEXT holds 65,535 bytes, and 20,000 four-byte
    # characters (the form's limit) are 80,000.
    body: Mapped[str] = mapped_column(Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(onupdate=utcnow)
    # Optimistic locking: an UPDATE that finds another version raises StaleDataError
    # instead of silently overwriting a concurrent edit.
    version: Mapped[int] = mapped_column()

    author: Mapped[User] = relationship(back_populates="posts")

    __mapper_args__ = {"version_id_col": version}
    # The index pages' order, read backwards: a page is found without sorting the table.
    __table_args__ = (Index("ix_post_created_at_id", "created_at", "id"),)

    def __repr__(self) -> str:
        return f"<Post {self.id} {self.title!r}>"


class RateLimit(Base):
    """One fixed-window counter of the login rate limiter (see ``myapp.security``).

    In the app's database so that every gunicorn worker counts in the same place.
    ``expires_at`` is in Unix seconds, a DOUBLE (MariaDB's FLOAT would round it to
    minutes).
    """

    __tablename__ = "rate_limit"

    key: Mapped[str] = mapped_column(_RateLimitKeyType, primary_key=True)
    count: Mapped[int]
    expires_at: Mapped[float] = mapped_column(Double, index=True)

    def __repr__(self) -> str:
        return f"<RateLimit {self.key!r} {self.count}>"
