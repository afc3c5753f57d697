"""Several hosts in one PostgreSQL URL: the host that answered last is tried first
(myapp/db/hosts.py). Under a real failover: tests/faults/test_failover.py."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine

from myapp.db.hosts import LastGoodHost, prefer_the_last_good_host

MULTI = "postgresql+psycopg://app@/site?host=old:5432&host=new:5433&target_session_attrs=read-write"


def test_the_listed_order_until_a_host_answers() -> None:
    choice = LastGoodHost(["old", "new"], ["5432", "5433"])
    assert choice.order() == [("old", "5432"), ("new", "5433")]
    choice.answered("new", "5433")
    assert choice.order() == [("new", "5433"), ("old", "5432")]
    choice.failed()  # the last good host failed: the listed order, without it first
    assert choice.order() == [("old", "5432"), ("new", "5433")]
    choice.failed()  # the first listed host failed too: next time it is tried last
    assert choice.order() == [("new", "5433"), ("old", "5432")]


def test_a_failed_first_host_goes_last_until_a_host_answers() -> None:
    choice = LastGoodHost(["a", "b", "c"], ["1", "2", "3"])
    choice.order()
    choice.failed()
    assert choice.order() == [("b", "2"), ("c", "3"), ("a", "1")]
    choice.answered("c", "3")
    assert choice.order() == [("c", "3"), ("a", "1"), ("b", "2")]


def test_a_host_not_in_the_list_changes_nothing() -> None:
    choice = LastGoodHost(["old", "new"], ["5432", "5433"])
    choice.answered("elsewhere", "1")
    assert choice.order() == [("old", "5432"), ("new", "5433")]


@pytest.mark.parametrize("url", ["postgresql+psycopg://app@db:5432/site", "postgresql+psycopg://app@/site?host=db"])
def test_one_host_gets_no_ordering(url: str) -> None:
    assert prefer_the_last_good_host(create_engine(url)) is None


def test_the_connect_parameters_put_the_last_good_host_first() -> None:
    engine = create_engine(MULTI)
    choice = prefer_the_last_good_host(engine)
    assert choice is not None
    choice.answered("new", "5433")
    cparams = {"host": "old,new", "port": "5432,5433"}
    engine.dialect.dispatch.do_connect(engine.dialect, None, [], cparams)
    assert cparams == {"host": "new,old", "port": "5433,5432"}
