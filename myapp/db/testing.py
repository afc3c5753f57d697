"""Test support: every session of a test inside one outer transaction, rolled back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING


from .state import StateAccess

if TYPE_CHECKING:
    from flask import Flask


class TestingMethods(StateAccess):
    """The ``db`` method for test suites."""

    @contextmanager
    def test_isolation(self, app: Flask) -> Iterator[None]:
        """Bind the app's sessions to one connection whose outer transaction is rolled back.

        Each session joins it through a SAVEPOINT (SQLAlchemy's "joining a session into
        an external transaction" recipe), so a view's ``commit()`` works as usual and
        later requests of the same test see it, yet nothing reaches the database.
        """
        state = self.app_state(app)
        with state.engine.connect() as connection:
            outer = connection.begin()
            state.sessionmaker.configure(bind=connection, join_transaction_mode="create_savepoint")
            state.isolated = True
            try:
                yield
            finally:
                state.sessionmaker.configure(bind=state.engine, join_transaction_mode="conservative_savepoint")
                state.isolated = False
                outer.rollback()
