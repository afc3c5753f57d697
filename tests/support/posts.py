"""Posts stored for a test, with known titles, authors and times."""

from __future__ import annotations

from datetime import datetime, timedelta

from flask import Flask
from sqlalchemy import select

from myapp.db import db
from myapp.models import Post, User


def add_posts(app: Flask, count: int, authors: tuple[str, ...] = ("alice", "bob", "carol")) -> list[int]:
    """Store ``count`` posts, a minute apart and round-robin over ``authors``; return
    their ids, oldest first. Titles are "post 0", "post 1", ..."""
    start = datetime(2026, 1, 1)
    with app.app_context():
        with db.transaction() as session:
            users = {}
            for name in authors:
                user = session.scalar(select(User).where(User.username == name))
                users[name] = user or User(username=name, password_hash="not used")
            posts = [
                Post(
                    title=f"post {number}",
                    body=f"body {number}",
                    author=users[authors[number % len(authors)]],
                    created_at=start + timedelta(minutes=number),
                )
                for number in range(count)
            ]
            session.add_all(posts)
        return [post.id for post in posts]
