"""The Session class of every app."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from .autocommit import require_transaction
from .state import SessionState


class AppSession(Session):
    """A Session that carries its typed ``state``, and whose units of work stay on one
    connection (see ``autocommit``).

    Asking for the connection with execution options (an isolation level, say) is
    asking for a transaction: every later statement of the unit runs inside it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state = SessionState()

    def connection(
        self, bind_arguments: Any = None, execution_options: Any = None
    ) -> Connection:
        if execution_options:
            require_transaction(self)
        return super().connection(bind_arguments=bind_arguments, execution_options=execution_options)
