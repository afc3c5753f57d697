"""Test support: every session of a test inside one outer transaction, rolled back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .lifecycle import AppState


@contextmanager
def isolated(state: AppState, make_sessionmaker: Callable[..., Any]) -> Iterator[None]:
    """Bind the app's sessions to one connection whose outer transaction is rolled back.

    Each session joins it through a SAVEPOINT (SQLAlchemy's "joining a session into an
    external transaction" recipe), so a view's ``commit()`` works as usual and later
    requests of the same test see it, yet nothing reaches the database.
    """
    saved = state.sessionmaker
    with state.engine.connect() as connection:
        outer = connection.begin()
        state.sessionmaker = make_sessionmaker(connection, join_transaction_mode="create_savepoint")
        state.isolated = True
        try:
            yield
        finally:
            state.sessionmaker, state.isolated = saved, False
            outer.rollback()
