"""The features plug in through one list (myapp/db/features.py): each that is on adds
its own listeners and nothing else; each that is off adds none.

Listeners are counted on the app's engine (connection, dialect and pool events) and on
a session of its sessionmaker, minus what SQLAlchemy itself installs on a plain engine
and session for the same URL. No server is needed: engines connect lazily.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session

from myapp import create_app
from myapp.db.state import AppState

POSTGRES = "postgresql+psycopg://app@127.0.0.1:1/site"
MARIADB_CLUSTER = "mysql+pymysql://app@127.0.0.1:1/site?host=127.0.0.1:2"
ALL_OFF = {"DATABASE_BREAKER_THRESHOLD": 0, "DATABASE_SLOW_QUERY_MS": 0, "DATABASE_READ_ONLY_AUTOCOMMIT": False,
           "METRICS": False, "DATABASE_NETWORK_TIMEOUT": 0}


def _listeners(engine: Engine, session: Session) -> Counter[str]:
    counts: Counter[str] = Counter()
    targets = {"engine": engine, "dialect": engine.dialect, "pool": engine.pool, "session": session}
    for label, target in targets.items():
        for name in dir(target.dispatch):
            collection = getattr(target.dispatch, name)
            if not name.startswith("_") and hasattr(collection, "__len__") and len(collection):
                counts[f"{label}.{name}"] = len(collection)
    return counts


def listener_counts(app: Flask, engine: Engine | None = None, **plain_options: Any) -> Counter[str]:
    """Our listeners on the app's engine (or one of its replica engines) and sessions;
    ``plain_options`` make the plain engine like that one (an isolation level)."""
    state: AppState = app.extensions["myapp.database"]
    engine = engine if engine is not None else state.engine
    with state.sessionmaker() as session, Session() as plain_session:
        ours = _listeners(engine, session)
        plain_engine = create_engine(engine.url, **plain_options)
        ours.subtract(_listeners(plain_engine, plain_session))
        plain_engine.dispose()
    return +ours


def _app(url: str, **config: Any) -> Flask:
    return create_app({"SECRET_KEY": "features-" + "x" * 32, "DATABASE_URL": url, **config})


def _features(app: Flask) -> list[str]:
    return [type(feature).__name__ for feature in app.extensions["myapp.database"].features]


# Always there: write tracking (6 session events, a statement listener, the connection
# link cleared at checkin), after-commit hooks (2), and PostgreSQL's own setup: the
# connection's name, a read-only server counted as a disconnect, the free pre-ping.
CORE = Counter({
    "session.before_flush": 1, "session.after_flush": 1, "session.after_flush_postexec": 1,
    "session.after_begin": 1, "session.after_commit": 2, "session.after_soft_rollback": 2,
    "engine.before_cursor_execute": 1, "pool.checkin": 2,
    "dialect.do_connect": 1, "dialect.handle_error": 1,
})
AUTOCOMMIT = Counter({
    "engine.begin": 1, "engine.before_cursor_execute": 1, "pool.checkin": 1,
    "session.after_transaction_create": 1, "session.after_begin": 1, "session.after_transaction_end": 1,
})
BREAKER = Counter({"dialect.do_connect": 1, "engine.before_cursor_execute": 1, "engine.after_cursor_execute": 1,
                   "dialect.handle_error": 1})
SLOW_QUERY_LOG = Counter({"engine.before_cursor_execute": 1, "engine.after_cursor_execute": 1})
# Statement latency (a start and an answer), connections checked out and back, new
# connections by host. The pool's wait is timed by the pool itself (MeasuredPool).
# A wait begins at a statement, a COMMIT, a ROLLBACK or the pool's reset, and ends at
# its answer, its failure or the checkin; a connect is refused while the server has
# just left one unanswered.
DEADLINES = Counter({"engine.before_cursor_execute": 1, "engine.after_cursor_execute": 1, "dialect.handle_error": 1,
                     "engine.commit": 1, "engine.rollback": 1, "pool.reset": 1, "pool.checkin": 1,
                     "dialect.do_connect": 1})
METRICS = Counter({"engine.before_cursor_execute": 1, "engine.after_cursor_execute": 1, "pool.checkout": 1,
                   "pool.checkin": 1, "pool.connect": 1})


def test_the_default_postgresql_config_installs_38_listeners() -> None:
    app = _app(POSTGRES)
    assert _features(app) == ["ReadOnlyAutocommit", "WriteTracking", "Guards", "Deadlines", "SlowQueryLog",
                              "Metrics"]
    assert listener_counts(app) == CORE + AUTOCOMMIT + BREAKER + DEADLINES + SLOW_QUERY_LOG + METRICS
    # 42 before the redesign, 25 before the metrics and the deadlines
    assert sum(listener_counts(app).values()) == 38


def test_with_every_feature_off_only_the_core_is_installed() -> None:
    app = _app(POSTGRES, **ALL_OFF)
    assert _features(app) == ["WriteTracking"]
    assert listener_counts(app) == CORE


@pytest.mark.parametrize(
    ("switched_off", "its_listeners"),
    [
        ({"DATABASE_READ_ONLY_AUTOCOMMIT": False}, AUTOCOMMIT),
        ({"DATABASE_BREAKER_THRESHOLD": 0}, BREAKER),
        ({"DATABASE_SLOW_QUERY_MS": 0}, SLOW_QUERY_LOG),
        ({"METRICS": False}, METRICS),
        ({"DATABASE_NETWORK_TIMEOUT": 0}, DEADLINES),
    ],
)
def test_a_feature_switched_off_removes_exactly_its_listeners(
    switched_off: dict[str, Any], its_listeners: Counter[str]
) -> None:
    assert listener_counts(_app(POSTGRES)) - listener_counts(_app(POSTGRES, **switched_off)) == its_listeners


def test_everything_on_for_postgresql() -> None:
    """Replicas, the bulkhead beside the breaker, and the query budget (debug)."""
    app = _app(POSTGRES, DEBUG=True, DATABASE_BULKHEAD=3,
               DATABASE_REPLICA_URLS="postgresql+psycopg://app@127.0.0.1:2/site")
    assert _features(app) == ["ReadOnlyAutocommit", "Replicas", "WriteTracking", "Guards", "Deadlines",
                              "SlowQueryLog", "QueryBudget", "Metrics"]
    bulkhead = Counter({"engine.commit": 1, "engine.rollback": 1, "pool.checkout": 1, "pool.checkin": 1,
                        "dialect.handle_error": 1, "session.after_transaction_create": 1})
    query_budget = Counter({"engine.before_cursor_execute": 1})
    replica_routing = Counter({"session.do_orm_execute": 1})
    assert listener_counts(app) == (CORE + AUTOCOMMIT + BREAKER + SLOW_QUERY_LOG + bulkhead + query_budget
                                    + replica_routing + METRICS + DEADLINES)
    replica_engine = app.extensions["myapp.database"].replica_engines[0]
    # A replica's engine: what it must not run is stopped, the bulkhead, slow queries,
    # the budget, write tracking's checkin, the connection's name, the free pre-ping,
    # the metrics, the deadline, and its own breaker's failure count.
    replica_only = +Counter({key: value for key, value in listener_counts(
        app, replica_engine, isolation_level="AUTOCOMMIT").items() if not key.startswith("session.")})
    assert replica_only == Counter({
        "engine.before_cursor_execute": 6, "engine.after_cursor_execute": 4, "engine.commit": 2,
        "engine.rollback": 2, "pool.checkout": 2, "pool.checkin": 5, "pool.connect": 1, "pool.reset": 1,
        "dialect.do_connect": 3, "dialect.handle_error": 3,
    })


def test_a_galera_cluster_adds_node_choice_and_the_checkout_check() -> None:
    plain = listener_counts(_app("mysql+pymysql://app@127.0.0.1:1/site"))
    cluster = _app(MARIADB_CLUSTER)
    assert "Galera" in _features(cluster)
    # The node's readiness at connect and checkout, 1047 as a disconnect, and a lost
    # connection counted on its node's breaker.
    assert listener_counts(cluster) - plain == Counter({
        "dialect.do_connect": 1, "pool.checkout": 1, "dialect.handle_error": 2,
    })
