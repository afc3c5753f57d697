"""The bulkhead itself (myapp/db/bulkhead.py), without a server: slots, nesting, and
what counts as a holder stuck on the database. Its place in a served app is in
tests/db/test_breaker.py and fault scenario 9."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from myapp.db.breaker import _watch
from myapp.db.bulkhead import Bulkhead
from myapp.db.errors import DatabaseUnavailable


def _try_in_another_thread(bulkhead: Bulkhead) -> tuple[str, float]:
    """Acquire from another thread; say how it went and how long it took."""
    outcome: list[tuple[str, float]] = []

    def attempt() -> None:
        started = time.monotonic()
        try:
            bulkhead.acquire()()
            outcome.append(("served", time.monotonic() - started))
        except DatabaseUnavailable:
            outcome.append(("refused", time.monotonic() - started))

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join(10)
    return outcome[0]


def test_nested_contexts_in_one_thread_share_its_slot() -> None:
    """Bug: each nested app context took a slot of its own (and overwrote the thread's
    record of the first), so a view that pushed one could exhaust a cap of one."""
    bulkhead = Bulkhead(limit=1, timeout=0.05, max_wait=0.3)
    outer = bulkhead.acquire()
    inner = bulkhead.acquire()  # the same thread: no wait, no refusal
    inner()
    assert _try_in_another_thread(bulkhead)[0] == "refused"  # the outer context still holds it
    outer()
    assert _try_in_another_thread(bulkhead)[0] == "served"


def test_a_release_counts_once() -> None:
    bulkhead = Bulkhead(limit=1, timeout=0.05, max_wait=0.3)
    outer = bulkhead.acquire()
    inner = bulkhead.acquire()
    inner()
    inner()  # a second call must not give back the outer context's hold
    assert _try_in_another_thread(bulkhead)[0] == "refused"
    outer()


@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_a_holder_that_committed_or_rolled_back_is_not_stuck(tmp_path: object, end: str) -> None:
    """Bug: COMMIT and ROLLBACK marked the holder as waiting on the database, and nothing
    cleared the mark, so a request rendering after its commit (or an error page after
    its rollback) looked stuck and the next request was refused at once."""
    engine = create_engine(f"sqlite:///{tmp_path}/bulkhead.sqlite")
    bulkhead = Bulkhead(limit=1, timeout=0.05, max_wait=2.0)
    _watch(engine, None, bulkhead)
    release = bulkhead.acquire()
    with Session(engine) as session:
        session.execute(text("SELECT 1"))
        getattr(session, end)()
    time.sleep(0.1)  # past the stuck timeout: now busy with its own work, a template say
    timer = threading.Timer(0.3, release)
    timer.start()
    outcome, waited = _try_in_another_thread(bulkhead)
    timer.join()
    engine.dispose()
    assert outcome == "served" and waited >= 0.25  # it queued for the slot instead of being refused


def test_a_holder_waiting_on_the_database_is_stuck(tmp_path: object) -> None:
    """The control: a holder whose statement is under way past the timeout is stuck."""
    bulkhead = Bulkhead(limit=1, timeout=0.05, max_wait=2.0)
    release = bulkhead.acquire()
    bulkhead.waiting(True)  # what before_cursor_execute reports
    time.sleep(0.1)
    outcome, waited = _try_in_another_thread(bulkhead)
    release()
    assert outcome == "refused" and waited < 0.5
