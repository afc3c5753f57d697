"""What a SQL statement does, read from its text: does it write, does it lock, may it
run outside a transaction.

Several features ask this of every statement (write tracking, the read-only fast path,
the replicas), and SQLAlchemy sends the same compiled strings again and again, so the
answer is computed once per distinct string and cached.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

# Statements that read and lock nothing may run outside a transaction.
_READ_VERBS = frozenset({"SELECT", "SHOW", "EXPLAIN", "VALUES", "TABLE"})
_LOCKING_CLAUSE = re.compile(r"\bFOR\s+(?:NO\s+KEY\s+)?(?:UPDATE|SHARE|KEY\s+SHARE)\b", re.IGNORECASE)
# Statements that change data or schema: what a forgotten commit would lose.
_WRITE_VERBS = frozenset({
    "INSERT", "UPDATE", "DELETE", "MERGE", "REPLACE", "UPSERT", "TRUNCATE", "COPY",
    "CREATE", "ALTER", "DROP", "GRANT", "REVOKE", "COMMENT", "CALL", "DO",
})
_DATA_MODIFYING = re.compile(r"\b(?:INSERT|UPDATE|DELETE|MERGE)\b", re.IGNORECASE)
# What may stand before the first keyword: blanks, "(", and SQL comments, which tracing
# tools (sqlcommenter and the like) put in front of a statement.
_PREAMBLE = re.compile(r"(?:[\s(]+|/\*.*?\*/|--[^\n]*(?:\n|$))*", re.DOTALL)
_FIRST_WORD = re.compile(r"[A-Za-z_]+")
# What SQLAlchemy and the layer send to run transactions, not to do the work: left out
# of a request's statement count (the query budget, the metrics). A prefix test, since
# it runs for every statement.
TRANSACTION_CONTROL = ("BEGIN", "SAVEPOINT", "RELEASE", "ROLLBACK", "COMMIT")


class Statement(NamedTuple):
    verb: str  # the first keyword, upper-cased ("" for an empty statement)
    writes: bool  # changes data or schema (a data-modifying CTE included)
    locks: bool  # takes row locks (SELECT ... FOR UPDATE/SHARE)
    needs_transaction: bool  # anything but a plain read


@lru_cache(maxsize=2048)
def classify(statement: str) -> Statement:
    """Read what the statement does (cached per distinct string)."""
    start = _PREAMBLE.match(statement)
    word = _FIRST_WORD.match(statement, start.end() if start else 0)
    verb = word.group(0).upper() if word else ""
    locks = bool(_LOCKING_CLAUSE.search(statement))
    if verb == "WITH":
        writes = bool(_DATA_MODIFYING.search(statement))
    else:
        writes = verb in _WRITE_VERBS
    reads_only = (verb in _READ_VERBS or (verb == "WITH" and not writes)) and not locks
    return Statement(verb, writes, locks, not reads_only)


def statement_verb(statement: str) -> str:
    return classify(statement).verb


def writes(statement: str) -> bool:
    return classify(statement).writes


def locks(statement: str) -> bool:
    return classify(statement).locks


def needs_transaction(statement: str) -> bool:
    return classify(statement).needs_transaction
