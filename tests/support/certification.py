"""Galera's certification failures, simulated on every backend."""

from __future__ import annotations

from typing import Any

import pymysql
from sqlalchemy.exc import OperationalError


class CertificationFailures:
    """Make the next ``n`` commits of any app session fail the way a Galera node aborts
    a transaction that lost certification: MariaDB error 1213 at COMMIT, nothing saved.

    On every backend, so that each write path is shown to re-run its whole unit of
    work; the real thing is fault scenario 15 (tests/faults/test_galera.py). The
    ``certification_failures`` fixture listens with it on ``AppSession``.
    """

    def __init__(self) -> None:
        self.remaining = 0
        self.raised = 0

    def next(self, count: int) -> None:
        self.remaining = count

    def before_commit(self, session: Any) -> None:
        if self.remaining > 0:
            self.remaining -= 1
            self.raised += 1
            raise OperationalError(
                "COMMIT", {}, pymysql.err.OperationalError(1213, "Deadlock: wsrep aborted transaction")
            )
