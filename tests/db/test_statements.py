"""What the layer reads from a statement's text (myapp/db/statements.py)."""

from __future__ import annotations

import pytest

from myapp.db.statements import classify, locks, needs_transaction, statement_verb, writes


@pytest.mark.parametrize(
    ("statement", "verb", "write", "lock", "transaction"),
    [
        ("SELECT 1", "SELECT", False, False, False),
        ("  (SELECT 1) UNION (SELECT 2)", "SELECT", False, False, False),
        ("SELECT * FROM post FOR UPDATE", "SELECT", False, True, True),
        ("select * from post for no key update", "SELECT", False, True, True),
        ("INSERT INTO post VALUES (1)", "INSERT", True, False, True),
        ("WITH x AS (SELECT 1) SELECT * FROM x", "WITH", False, False, False),
        ("WITH gone AS (DELETE FROM post RETURNING id) SELECT * FROM gone", "WITH", True, False, True),
        ("SAVEPOINT sa_1", "SAVEPOINT", False, False, True),
        ("CREATE TABLE t (id int)", "CREATE", True, False, True),
        ("", "", False, False, True),
        # Comments put in front by tracing tools (sqlcommenter and the like).
        ("/* controller='posts' */ DELETE FROM post", "DELETE", True, False, True),
        ("-- traced\nUPDATE post SET title = 'x'", "UPDATE", True, False, True),
        ("/* a */ /* b */\n -- c\n (SELECT 1)", "SELECT", False, False, False),
        ("/* unterminated SELECT 1", "", False, False, True),
    ],
)
def test_a_statement_is_read_for_what_it_does(
    statement: str, verb: str, write: bool, lock: bool, transaction: bool
) -> None:
    assert (statement_verb(statement), writes(statement), locks(statement), needs_transaction(statement)) == (
        verb, write, lock, transaction
    )


def test_the_answer_is_computed_once_per_distinct_statement() -> None:
    statement = "SELECT 'cached once' FROM post"
    classify.cache_clear()
    for _ in range(5):
        classify(statement)
    info = classify.cache_info()
    assert (info.misses, info.hits) == (1, 4)
