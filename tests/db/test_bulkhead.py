"""The bulkhead itself (myapp/db/bulkhead.py), without a server: one slot per thread,
given back once, at checkin or after an answer in autocommit, and what counts as a
holder stuck on the database. Its place in a served app is in
tests/db/test_breaker.py and fault scenario 9."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from myapp.db.breaker import _watch
from myapp.db.bulkhead import Bulkhead
from myapp.db.errors import DatabaseUnavailable


def _try_in_another_thread(bulkhead: Bulkhead) -> tuple[str, float]:
    """Begin a unit of work from another thread; say how it went and how long it took."""
    outcome: list[tuple[str, float]] = []

    def attempt() -> None:
        started = time.monotonic()
        try:
            bulkhead.admit()
            bulkhead.release()
            outcome.append(("served", time.monotonic() - started))
        except DatabaseUnavailable:
            outcome.append(("refused", time.monotonic() - started))

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join(10)
    return outcome[0]


def test_a_thread_holds_one_slot_however_often_it_is_admitted() -> None:
    bulkhead = Bulkhead(limit=1, timeout=0.05, max_wait=0.3)
    bulkhead.admit()
    bulkhead.admit()  # a statement of the unit already admitted: the same slot
    assert _try_in_another_thread(bulkhead)[0] == "refused"
    bulkhead.release()
    outcome, waited = _try_in_another_thread(bulkhead)
    assert outcome == "served" and waited < 0.05


def test_an_answer_in_autocommit_gives_the_slot_back_and_one_in_a_transaction_keeps_it() -> None:
    """A thread reading in autocommit holds nothing between statements, so a page that
    renders after its reads holds no slot; inside a transaction (locks, a PgBouncer
    server connection) it keeps its slot until its connection goes back."""
    bulkhead = Bulkhead(limit=1, timeout=10, max_wait=0.2)
    bulkhead.admit()
    bulkhead.answered(release=False)
    assert _try_in_another_thread(bulkhead)[0] == "refused"
    bulkhead.admit()
    bulkhead.answered(release=True)
    assert _try_in_another_thread(bulkhead)[0] == "served"


def test_a_release_counts_once() -> None:
    bulkhead = Bulkhead(limit=1, timeout=0.05, max_wait=0.3)
    bulkhead.admit()
    bulkhead.release()
    bulkhead.release()  # the checkin after an autocommit answer: nothing more to give back
    bulkhead.admit()
    assert _try_in_another_thread(bulkhead)[0] == "refused"
    bulkhead.release()


def test_a_slot_left_behind_is_given_back_through_its_holder() -> None:
    """The session's end gives back a slot whose events never released it, from
    whatever thread closes the session."""
    bulkhead = Bulkhead(limit=1, timeout=10, max_wait=0.2)
    bulkhead.admit()
    mine = bulkhead.holder()
    assert _try_in_another_thread(bulkhead)[0] == "refused"  # waited max_wait: not stuck
    closer = threading.Thread(target=bulkhead.release, args=(mine,))
    closer.start()
    closer.join()
    assert _try_in_another_thread(bulkhead)[0] == "served"


def test_a_commit_or_rollback_is_never_refused() -> None:
    bulkhead = Bulkhead(limit=1, timeout=0.05, max_wait=0.3)
    bulkhead.admit()
    time.sleep(0.1)  # the holder is stuck
    ended: list[str] = []

    def commit() -> None:
        bulkhead.admit(force=True)
        ended.append("committed")
        bulkhead.release()

    thread = threading.Thread(target=commit)
    thread.start()
    thread.join(5)
    bulkhead.release()
    assert ended == ["committed"]


@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_a_thread_that_committed_or_rolled_back_holds_no_slot(tmp_path: object, end: str) -> None:
    """Bug (of the first bulkhead): COMMIT and ROLLBACK marked the holder as waiting on
    the database and nothing cleared the mark, so a request rendering after its commit
    looked stuck and the next request was refused at once. Now the connection's
    return to the pool ends the wait and gives the slot back."""
    engine = create_engine(f"sqlite:///{tmp_path}/bulkhead.sqlite")
    bulkhead = Bulkhead(limit=1, timeout=0.05, max_wait=2.0)
    _watch(engine, None, bulkhead)
    with Session(engine) as session:
        session.execute(text("SELECT 1"))
        getattr(session, end)()
    time.sleep(0.1)  # past the stuck timeout: now busy with its own work, a template say
    outcome, waited = _try_in_another_thread(bulkhead)
    engine.dispose()
    assert outcome == "served" and waited < 0.05


def test_a_failed_statement_ends_its_wait(tmp_path: object) -> None:
    """The holder keeps its slot (its transaction is still open) but is no longer
    waiting: the next thread queues for the slot instead of being refused."""
    engine = create_engine(f"sqlite:///{tmp_path}/bulkhead.sqlite")
    bulkhead = Bulkhead(limit=1, timeout=0.05, max_wait=0.3)
    _watch(engine, None, bulkhead)
    with engine.connect() as connection:
        with pytest.raises(OperationalError):
            connection.execute(text("SELECT * FROM no_such_table"))
        time.sleep(0.1)  # past the stuck timeout
        outcome, waited = _try_in_another_thread(bulkhead)
    engine.dispose()
    assert outcome == "refused" and waited >= 0.25  # queued the whole max_wait: not stuck


def test_a_holder_waiting_on_the_database_is_stuck() -> None:
    """The control: a holder whose wait has lasted past the timeout is stuck."""
    bulkhead = Bulkhead(limit=1, timeout=0.05, max_wait=2.0)
    bulkhead.admit()  # what before_cursor_execute does
    time.sleep(0.1)
    outcome, waited = _try_in_another_thread(bulkhead)
    bulkhead.release()
    assert outcome == "refused" and waited < 0.5
