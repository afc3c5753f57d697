"""The bulkhead itself (myapp/db/bulkhead.py), without a server: one slot per thread,
given back once, at checkin or after an answer in autocommit, and what counts as a
holder stuck on the database, and each server's share of it. Its place in a served
app is in tests/db/test_breaker.py, tests/db/test_replicas.py and fault scenario 9."""

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


def _try_in_another_thread(bulkhead: Bulkhead, server: str | None = None) -> tuple[str, float]:
    """Begin a unit of work from another thread (waiting on ``server``); say how it went
    and how long it took."""
    outcome: list[tuple[str, float]] = []

    def attempt() -> None:
        started = time.monotonic()
        try:
            bulkhead.admit()
            bulkhead.admit(server)
            bulkhead.release()
            outcome.append(("served", time.monotonic() - started))
        except DatabaseUnavailable:
            outcome.append(("refused", time.monotonic() - started))

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join(10)
    return outcome[0]


def _commit_in_another_thread(bulkhead: Bulkhead, server: str | None = None) -> list[str]:
    """A unit admitted (before it knew its server) that commits on ``server``, in
    another thread: ["committed"] if the COMMIT was let through."""
    ended: list[str] = []

    def commit() -> None:
        try:
            bulkhead.admit()
        except DatabaseUnavailable:  # the unit's own admission may be refused; its COMMIT never
            pass
        bulkhead.admit(server, force=True)
        ended.append("committed")
        bulkhead.release()

    thread = threading.Thread(target=commit)
    thread.start()
    thread.join(5)
    return ended


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
    assert _commit_in_another_thread(bulkhead) == ["committed"]
    bulkhead.release()


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


# -- a share per server -------------------------------------------------------------


def test_a_server_stuck_on_its_share_leaves_the_last_slot_to_the_other_servers() -> None:
    """With a primary and a replica, the primary holds at most limit - 1 slots: a thread
    more for it is turned away (every holder there is stuck), one for the replica served."""
    bulkhead = Bulkhead(limit=3, timeout=0.05, max_wait=2.0, servers=2)
    assert bulkhead.share == 2
    bulkhead.admit("primary")
    assert _try_in_another_thread(bulkhead, "primary")[0] == "served"  # the share's second slot
    stuck = threading.Thread(target=bulkhead.admit, args=("primary",))  # holds it: its thread ends waiting
    stuck.start()
    stuck.join()
    time.sleep(0.1)  # both holders are now stuck on the primary
    outcome, waited = _try_in_another_thread(bulkhead, "primary")
    assert outcome == "refused" and waited < 0.5
    outcome, waited = _try_in_another_thread(bulkhead, "replica_1")
    assert outcome == "served" and waited < 0.05


def test_negative_control_with_one_server_its_share_is_the_whole_bulkhead() -> None:
    bulkhead = Bulkhead(limit=2, timeout=0.05, max_wait=2.0, servers=1)
    assert bulkhead.share == 2
    bulkhead.admit("primary")
    stuck = threading.Thread(target=bulkhead.admit, args=("primary",))
    stuck.start()
    stuck.join()
    time.sleep(0.1)
    assert _try_in_another_thread(bulkhead, "replica_1")[0] == "refused"  # nothing kept back


def test_a_unit_waiting_for_its_servers_share_holds_no_slot_meanwhile() -> None:
    """A unit is admitted before it knows its server (its checkout has not happened);
    should the share it then needs be taken, it gives its slot back while it waits, so
    a page for another server is not blocked behind it."""
    bulkhead = Bulkhead(limit=2, timeout=10, max_wait=1.0, servers=2)
    bulkhead.admit("primary")  # the primary's share: busy, not stuck
    waiter: list[tuple[str, float]] = []
    thread = threading.Thread(target=lambda: waiter.append(_try_in_another_thread(bulkhead, "primary")))
    thread.start()
    time.sleep(0.2)  # it was admitted (2 of 2), then found the primary's share taken
    outcome, waited = _try_in_another_thread(bulkhead, "replica_1")
    thread.join(5)
    bulkhead.release()
    assert outcome == "served" and waited < 0.05
    assert waiter[0][0] == "refused" and waiter[0][1] >= 0.9  # it queued the whole max_wait


def test_a_commit_is_admitted_over_its_servers_share() -> None:
    bulkhead = Bulkhead(limit=2, timeout=0.05, max_wait=0.3, servers=2)
    bulkhead.admit("primary")
    time.sleep(0.1)  # the primary's share is stuck
    assert _commit_in_another_thread(bulkhead, "primary") == ["committed"]
    bulkhead.release()
