"""The database settings, parsed and checked once into one typed object.

``init_app`` calls ``DatabaseSettings.from_config`` and hands each part to what it
builds: the engines take the connection and pool parts, each feature its own part, and
a feature whose part is ``None`` is switched off. Nothing else reads ``app.config``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import click
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import mask_url

GaleraMode = Literal["pinned", "spread"]
GALERA_MODES: tuple[GaleraMode, ...] = ("pinned", "spread")


class ConfigError(click.ClickException):
    """A setting is missing or invalid; the message names the setting to fix.

    A ClickException, so that the ``flask`` command, which builds the app before it
    runs any command, prints it as one ``Error:`` line and exits 1. Defined here, the
    lowest module that raises it; ``myapp.config`` re-exports it.
    """


@dataclass(frozen=True)
class PoolSettings:
    size: int
    max_overflow: int
    timeout: float
    recycle: int


@dataclass(frozen=True)
class BreakerSettings:
    threshold: int
    reset_seconds: float


@dataclass(frozen=True)
class BulkheadSettings:
    limit: int
    timeout: float  # a holder waiting this long on the database counts as stuck
    max_wait: float  # the longest a request over the cap waits for a slot


@dataclass(frozen=True)
class ReplicaSettings:
    urls: tuple[str, ...]
    check_interval: float
    max_lag_seconds: float | None
    max_lag_bytes: int | None
    read_from_header: bool
    read_only_mode: bool = True  # the primary unreachable: GET pages from a replica, writes refused


@dataclass(frozen=True)
class GaleraSettings:
    mode: GaleraMode
    nodes: tuple[tuple[str, int], ...]  # one: an address in front of the cluster
    sync_wait: int


@dataclass(frozen=True)
class DatabaseSettings:
    """Everything the database layer reads from the app's config, checked."""

    url: URL  # relative SQLite paths resolved, MariaDB's charset and Galera's node list applied
    app_name: str
    echo: bool
    pool: PoolSettings
    connect_timeout: int
    ping_timeout: int
    statement_timeout_ms: int
    network_timeout: int
    sqlite_busy_timeout: float
    pgbouncer: bool  # behind PgBouncer's transaction pooling
    commit_on_success: bool
    read_only_autocommit: bool  # PostgreSQL, and a statement timeout that needs no SET LOCAL
    slow_query_ms: float  # 0: off
    query_budget: int  # 0: off (it only runs in debug and tests)
    metrics: bool  # the hot path's Prometheus metrics (db.metrics)
    breaker: BreakerSettings | None
    bulkhead: BulkheadSettings | None
    replicas: ReplicaSettings | None
    galera: GaleraSettings | None

    @property
    def backend(self) -> str:
        return self.url.get_backend_name()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], instance_path: str, *, debug: bool = False,
                    testing: bool = False) -> DatabaseSettings:
        """Parse ``app.config``; raise ConfigError naming the first setting that is wrong."""
        url = _database_url(config["DATABASE_URL"], instance_path)
        galera = _galera(config, url)
        if galera is not None:
            url = url.difference_update_query(["host"])
        if url.get_backend_name() in ("mysql", "mariadb"):
            url = url.update_query_dict({"charset": "utf8mb4"})
        pgbouncer = _pgbouncer(config["DATABASE_PGBOUNCER"])
        statement_timeout_ms = int(config["DATABASE_STATEMENT_TIMEOUT"] or 0)
        return cls(
            url=url, app_name=str(config["DATABASE_APP_NAME"]), echo=bool(config["DATABASE_ECHO"]),
            pool=PoolSettings(int(config["DATABASE_POOL_SIZE"]), int(config["DATABASE_MAX_OVERFLOW"]),
                              float(config["DATABASE_POOL_TIMEOUT"]), int(config["DATABASE_POOL_RECYCLE"])),
            connect_timeout=int(config["DATABASE_CONNECT_TIMEOUT"]), ping_timeout=int(config["DATABASE_PING_TIMEOUT"]),
            statement_timeout_ms=statement_timeout_ms, network_timeout=int(config["DATABASE_NETWORK_TIMEOUT"] or 0),
            sqlite_busy_timeout=float(config["SQLITE_BUSY_TIMEOUT"]), pgbouncer=pgbouncer,
            commit_on_success=bool(config["DATABASE_COMMIT_ON_SUCCESS"]),
            # Behind PgBouncer a statement timeout is SET LOCAL, which needs a transaction.
            read_only_autocommit=bool(config["DATABASE_READ_ONLY_AUTOCOMMIT"]) and url.get_backend_name() == "postgresql"
            and not (pgbouncer and statement_timeout_ms),
            slow_query_ms=float(config["DATABASE_SLOW_QUERY_MS"] or 0),
            query_budget=int(config["DATABASE_QUERY_BUDGET"] or 0) if debug or testing else 0,
            metrics=bool(config.get("METRICS", True)),
            breaker=_breaker(config), bulkhead=_bulkhead(config, url),
            replicas=_replicas(config, url, debug), galera=galera,
        )


def _database_url(raw: Any, instance_path: str) -> URL:
    """Parse DATABASE_URL; a relative SQLite path lives in the instance folder."""
    try:
        url = make_url(raw)
        url.get_dialect()  # an unknown backend or a driver that is not installed
    except (ArgumentError, ImportError, ValueError) as error:
        raise ConfigError(f"DATABASE_URL {mask_url(raw)!r} is invalid: {error}") from None
    if url.get_backend_name() == "sqlite" and not is_memory(url):
        assert url.database is not None
        if not os.path.isabs(url.database) and not url.database.startswith("file:"):
            os.makedirs(instance_path, exist_ok=True)
            url = url.set(database=os.path.join(instance_path, url.database))
    return url


def is_memory(url: URL) -> bool:
    """True for an in-memory SQLite database (one connection shared by every session)."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _choice(name: str, value: Any, allowed: tuple[str, ...], hint: str) -> str:
    """A setting that takes one of a few words (or nothing)."""
    word = str(value or "")
    if word not in ("", *allowed):
        raise ConfigError(f"{name} is invalid: {word!r}; {hint}")
    return word


def _pgbouncer(value: Any) -> bool:
    mode = _choice("DATABASE_PGBOUNCER", value, ("session", "transaction"),
                   'use "transaction" behind PgBouncer\'s transaction pooling, or leave it empty.')
    return mode == "transaction"


def _breaker(config: Mapping[str, Any]) -> BreakerSettings | None:
    threshold = int(config["DATABASE_BREAKER_THRESHOLD"] or 0)
    return BreakerSettings(threshold, float(config["DATABASE_BREAKER_RESET"])) if threshold else None


def _bulkhead(config: Mapping[str, Any], url: URL) -> BulkheadSettings | None:
    """SQLite has no network to hang on: a writer that waits is queued for the file's
    lock, fairly and within SQLITE_BUSY_TIMEOUT, and must not be turned away."""
    limit = int(config["DATABASE_BULKHEAD"] or 0)
    if not limit or url.get_backend_name() == "sqlite":
        return None
    return BulkheadSettings(limit, float(config["DATABASE_BULKHEAD_TIMEOUT"]), float(config["DATABASE_POOL_TIMEOUT"]))


def _galera(config: Mapping[str, Any], url: URL) -> GaleraSettings | None:
    """A cluster is named by DATABASE_GALERA, or by a MariaDB URL that lists several
    nodes (pinned to one writer node unless told otherwise)."""
    mode = _choice("DATABASE_GALERA", config["DATABASE_GALERA"], GALERA_MODES,
                   'use "pinned" or "spread" for a Galera cluster, or leave it empty.')
    sync_wait = int(config["DATABASE_GALERA_SYNC_WAIT"])
    if not 0 <= sync_wait <= 15:
        raise ConfigError("DATABASE_GALERA_SYNC_WAIT must be a wsrep_sync_wait bit mask from 0 to 15.")
    mariadb = url.get_backend_name() in ("mysql", "mariadb")
    if mode and not mariadb:
        raise ConfigError(f"DATABASE_GALERA={mode} needs a MariaDB DATABASE_URL (mysql+pymysql://...).")
    if not mariadb or not (mode or "host" in url.query):
        return None
    return GaleraSettings(mode or "pinned", cluster_nodes(url), sync_wait)  # type: ignore[arg-type]


def cluster_nodes(url: URL) -> tuple[tuple[str, int], ...]:
    """The nodes of a cluster URL, in order: ``...@node1:3306/db?host=node2:3306&host=node3``
    lists three (the port defaults to 3306), the way libpq takes several hosts."""
    extra = url.query.get("host", ())
    extra = (extra,) if isinstance(extra, str) else tuple(extra)
    nodes = [(url.host or "127.0.0.1", url.port or 3306)]
    for entry in extra:
        host, _, port = entry.rpartition(":") if ":" in entry else (entry, "", "3306")
        if not host or not port.isdigit():
            raise ConfigError(f"DATABASE_URL is invalid: host={entry!r} in the cluster URL must be written host or host:port")
        nodes.append((host, int(port)))
    return tuple(nodes)


def _replicas(config: Mapping[str, Any], url: URL, debug: bool) -> ReplicaSettings | None:
    try:
        max_lag = parse_max_lag(config["DATABASE_REPLICA_MAX_LAG"])
    except ValueError as error:
        raise ConfigError(f"DATABASE_REPLICA_MAX_LAG is invalid: {error}") from None
    interval = float(config["DATABASE_REPLICA_CHECK_INTERVAL"])
    if interval <= 0:
        raise ConfigError("DATABASE_REPLICA_CHECK_INTERVAL must be a positive number of seconds.")
    urls = replica_urls(config["DATABASE_REPLICA_URLS"])
    if not urls:
        return None
    for each in [url, *urls]:
        if not str(each).startswith("postgresql"):
            raise ConfigError(
                "DATABASE_REPLICA_URLS needs PostgreSQL for the primary and every replica (read-your-writes "
                f"compares WAL positions); got {str(each).split(':', 1)[0]!r}."
            )
    for each in urls:
        try:
            make_url(each).get_dialect()
        except (ArgumentError, ImportError, ValueError) as error:
            raise ConfigError(f"DATABASE_REPLICA_URLS is invalid: {error}") from None
    return ReplicaSettings(tuple(urls), interval, *max_lag,
                           read_from_header=bool(config["DATABASE_READ_FROM_HEADER"] or debug),
                           read_only_mode=bool(config.get("DATABASE_READ_ONLY_MODE", True)))


def replica_urls(value: Any) -> list[str]:
    """DATABASE_REPLICA_URLS as a list: a list as it is, a string split on commas and spaces."""
    if not value:
        return []
    if isinstance(value, str):
        return [url for url in re.split(r"[\s,]+", value) if url]
    return [str(url) for url in value]


_LAG_UNITS = {
    "ms": ("seconds", 0.001), "s": ("seconds", 1.0), "min": ("seconds", 60.0), "h": ("seconds", 3600.0),
    "b": ("bytes", 1), "kb": ("bytes", 1024), "mb": ("bytes", 1024**2), "gb": ("bytes", 1024**3),
    "tb": ("bytes", 1024**4),
}
_LAG_PART = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$", re.IGNORECASE)


def parse_max_lag(value: str) -> tuple[float | None, int | None]:
    """``"10s, 16MB"`` -> (10.0, 16777216): the time and size limits, either may be None."""
    limits: dict[str, float] = {}
    for part in str(value).split(","):
        match = _LAG_PART.match(part)
        unit = _LAG_UNITS.get(match.group(2).lower()) if match else None
        if match is None or unit is None or unit[0] in limits:
            raise ValueError(f"{value!r}: write a time, a size or both, like \"10s, 16MB\"")
        limits[unit[0]] = float(match.group(1)) * unit[1]
    size = limits.get("bytes")
    return limits.get("seconds"), int(size) if size is not None else None
