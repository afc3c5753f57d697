"""The optional features of the database layer, in one list, in the order they install.

Each feature is built from its own part of the settings; ``build`` returns None when
it is switched off, and then nothing of it is installed. A feature that is on
``install``s itself: the listeners it needs on the app's engines and sessionmaker,
what it adds to a session's birth (``AppState.openers``), and its Flask hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol


from .autocommit import ReadOnlyAutocommit
from .breaker import Guards
from .config import DatabaseSettings
from .deadline import Deadlines
from .galera import Galera
from .instrumentation import QueryBudget, SlowQueryLog
from .statement_metrics import Metrics
from .replication import Replicas
from .state import AppState
from .tracking import WriteTracking

if TYPE_CHECKING:
    from flask import Flask


class Feature(Protocol):
    def install(self, state: AppState, app: Flask) -> None: ...


FEATURES: tuple[Callable[[DatabaseSettings], Feature | None], ...] = (
    ReadOnlyAutocommit.build,  # DATABASE_READ_ONLY_AUTOCOMMIT, on PostgreSQL
    Replicas.build,  # DATABASE_REPLICA_URLS; first, as the features below watch its engines too
    WriteTracking.build,  # always: lost-write detection, and "did this session write"
    Galera.build,  # DATABASE_GALERA, or a MariaDB URL that lists several nodes
    Guards.build,  # DATABASE_BREAKER_THRESHOLD, DATABASE_BULKHEAD
    Deadlines.build,  # DATABASE_NETWORK_TIMEOUT, on PostgreSQL: a frozen server's waits are abandoned
    SlowQueryLog.build,  # DATABASE_SLOW_QUERY_MS
    QueryBudget.build,  # DATABASE_QUERY_BUDGET, in debug and tests
    Metrics.build,  # METRICS: statement latency, pool use, connections by host
)


def install_features(state: AppState, app: Flask) -> None:
    """Build every feature from the app's settings and install those that are on."""
    for build in FEATURES:
        feature = build(state.settings)
        if feature is not None:
            feature.install(state, app)
            state.features.append(feature)
