"""Count the SQL statements a block of test code sends, to pin down query budgets."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flask import Flask
from sqlalchemy import event

# Statements that do work; BEGIN, SAVEPOINT and ROLLBACK come from the isolation.
_COUNTED = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\b", re.IGNORECASE)


@dataclass
class QueryLog:
    statements: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.statements)


@contextmanager
def count_queries(app: Flask) -> Iterator[QueryLog]:
    """Record the SQL statements (not BEGIN, SAVEPOINT or ROLLBACK) the block sends."""
    engine = app.extensions["myapp.database"].engine
    log = QueryLog()

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if _COUNTED.match(statement):
            log.statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield log
    finally:
        event.remove(engine, "before_cursor_execute", record)


@contextmanager
def assert_num_queries(app: Flask, expected: int) -> Iterator[QueryLog]:
    """Fail unless the block sends exactly ``expected`` statements (like Django's)."""
    with count_queries(app) as log:
        yield log
    assert log.count == expected, f"expected {expected} queries, got {log.count}:\n" + "\n".join(
        log.statements
    )
