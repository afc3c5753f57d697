"""Read replicas as a feature (``DATABASE_REPLICA_URLS``): it builds the replica set,
routes the reads of read-only requests (``routing``), keeps each user's reads
consistent with their last commit (``sticking``), and gives ``db`` its replica methods.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from flask import Flask, request
from werkzeug.wrappers import Response

from . import routing, sticking
from .autocommit import track_units
from .breaker import Guards
from .config import DatabaseSettings, ReplicaSettings
from .engines import make_check_engine, make_engine
from .errors import mask_url
from .metrics import expect_reads
from .replicas import Replica, ReplicaSet
from .session import AppSession, state_of
from .state import AppState, StateAccess

READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Replicas:
    """The feature: one engine per replica, their health checks, and the routing."""

    def __init__(self, settings: DatabaseSettings, replica_settings: ReplicaSettings) -> None:
        self.settings = replica_settings
        members = [
            Replica(number=number, url=mask_url(url),
                    engine=routing.replica_engine(make_engine(settings, replica_url=url)),
                    check_engine=make_check_engine(settings, url, f"check{number}"))
            for number, url in enumerate(replica_settings.urls, start=1)
        ]
        self.replica_set = ReplicaSet(members, make_check_engine(settings, settings.url, "check0"),
                                      replica_settings.check_interval, replica_settings.max_lag_seconds,
                                      replica_settings.max_lag_bytes)

    @classmethod
    def build(cls, settings: DatabaseSettings) -> Replicas | None:
        return cls(settings, settings.replicas) if settings.replicas is not None else None

    def install(self, state: AppState, app: Flask) -> None:
        state.replica_engines.extend(replica.engine for replica in self.replica_set.replicas)
        state.replicas.extend(self.replica_set.replicas)
        expect_reads([replica.label for replica in self.replica_set.replicas])
        track_units(state.sessionmaker)
        routing.route_reads(state.sessionmaker)
        state.openers.append(self._read_from_replicas)

        # Registered before the lifecycle's commit-on-success hook, so it runs after it
        # (Flask runs after_request functions in reverse order).
        @app.after_request
        def _keep_reads_consistent(response: Response) -> Response:
            sticking.after_request(response, state.current_session(), self.replica_set, state.engine,
                                   reading=request.method in READ_ONLY_METHODS,
                                   header=self.settings.read_from_header)
            return response

    def _read_from_replicas(self, session: AppSession, reading: bool) -> None:
        """A read-only request's session may read from a replica that has replayed the
        WAL position of its user's last commit.

        It starts read-only when the primary's breaker refused it, or when the
        replicas' last check could not reach the primary and a replica is healthy. That
        check's word is up to an interval old: with no healthy replica to read from, the
        primary is asked (a failure then goes read-only, and gets its 503, as usual)."""
        if reading:
            state = state_of(session)
            read_only_by_check = self.replica_set.primary_unreachable and any(
                replica.state == "healthy" for replica in self.replica_set.replicas)
            read_only = self.settings.read_only_mode and (state.primary_unreachable or read_only_by_check)
            state.reads = routing.ReplicaReads(self.replica_set, sticking.required_lsn(), read_only=read_only,
                                               may_go_read_only=self.settings.read_only_mode)


@dataclass(frozen=True)
class ReadOnlyMode:
    """The site reads from a replica because the primary is unreachable."""

    replica: str | None  # the replica this request reads from ("replica 1"), if it read yet
    behind_the_user: bool  # it has not replayed the user's last commit


class ReplicaMethods(StateAccess):
    """The ``db`` methods for replicas."""

    def read_only_mode_allowed(self) -> bool:
        """Replicas are configured and DATABASE_READ_ONLY_MODE is on."""
        replicas = self.app_state().feature(Replicas)
        return replicas is not None and replicas.settings.read_only_mode

    def read_only_mode(self) -> ReadOnlyMode | None:
        """None, unless the site is read-only for now: the current session reads from a
        replica because the primary is unreachable, or the primary's breaker is open, or
        the replicas' last check could not reach the primary."""
        state = self.app_state()
        replicas = state.feature(Replicas)
        if replicas is None or not replicas.settings.read_only_mode:
            return None
        session = state.current_session()
        reads = state_of(session).reads if session is not None else None
        if reads is not None and reads.read_only:
            return ReadOnlyMode(reads.replica.name if reads.replica else None, reads.behind_the_user)
        guards = state.feature(Guards)
        primary_down = replicas.replica_set.primary_unreachable or (guards is not None and guards.primary_is_down())
        return ReadOnlyMode(None, False) if primary_down else None

    @contextmanager
    def use_primary(self) -> Iterator[None]:
        """Send every statement of the block to the primary: for a read that must be
        fresh. Also a decorator: ``@db.use_primary()``."""
        with routing.primary_only(self.session()):
            yield

    @contextmanager
    def replica_session(self) -> Iterator[AppSession]:
        """An independent session that reads from a healthy replica (the primary when
        there is none) and refuses to write (``ReplicaWriteError``, before anything is
        sent): how a command or a job opts in to replica reads."""
        state = self.app_state()
        replicas = state.feature(Replicas)
        bind = state.engine
        if replicas is not None:
            if all(replica.state == "unknown" for replica in replicas.replica_set.replicas):
                replicas.replica_set.check()  # a command's first use: no request has started a check
            replica = replicas.replica_set.choose(None, lambda replica: None)
            bind = replica.engine if replica is not None else bind
        session = state.sessionmaker(bind=routing.refusing_writes(bind))
        routing.refuse_flushes(state.sessionmaker, session)
        session.state.origin = "replica session"
        try:
            yield session
        finally:
            session.close()

    def replica_status(self, check: bool = False) -> list[dict[str, Any]] | None:
        """Each replica's state and lag (None without replicas); ``check`` checks first."""
        replicas = self.app_state().feature(Replicas)
        if replicas is None:
            return None
        if check:
            replicas.replica_set.check()
        else:
            replicas.replica_set.maybe_check()
        return replicas.replica_set.status()
