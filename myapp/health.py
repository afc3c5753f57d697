"""Probes for a load balancer or an orchestrator."""

from __future__ import annotations

from flask import Blueprint
from sqlalchemy.exc import SQLAlchemyError

from .db import db
from .db.errors import describe_error

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive; the database is not consulted."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> tuple[dict[str, object], int]:
    """Ready when the database accepts a new connection within the ping timeout and
    this worker's circuit breaker on the primary is closed (an open one answers at once,
    no ping). ``breakers`` shows each server's: the primary's, each replica's, each
    Galera node's.

    With replicas, each one's state and lag as this worker last checked it; a replica
    that is out does not make the app unready (its reads go to the primary). With the
    primary unreachable and a healthy replica, the answer is 200, "degraded: read-only
    from replica N": the instance still serves every page, so a load balancer must keep
    it in rotation (taking all of them out would leave nothing to read). On a Galera
    cluster, the node a new connection reaches, its state and the cluster size.
    """
    breaker = db.breaker_status()
    extra: dict[str, object] = {"breaker": breaker, "breakers": {**db.breakers_status(), **db.node_breakers_status()}}
    replicas = db.replica_status()
    if replicas is not None:
        extra["replicas"] = replicas
    if breaker is not None and breaker["state"] != "closed":
        return _not_ready(f"circuit breaker {breaker['state']}: {breaker['last_error']}", replicas, extra)
    try:
        latency = db.ping()
        cluster = db.galera_status()
    except SQLAlchemyError as error:
        return _not_ready(describe_error(error), replicas, extra)
    if cluster is not None:
        extra["galera"] = cluster
    return {"status": "ready", "database_latency_ms": round(latency * 1000, 2), **extra}, 200


def _not_ready(reason: str, replicas: list[dict[str, object]] | None,
               extra: dict[str, object]) -> tuple[dict[str, object], int]:
    """The primary does not answer: degraded (200) while a replica serves, else 503."""
    serving = _read_only_from(replicas)
    if serving is not None:
        return {"status": f"degraded: read-only from {serving}", "reason": reason, **extra}, 200
    return {"status": "unavailable", "reason": reason, **extra}, 503


def _read_only_from(replicas: list[dict[str, object]] | None) -> str | None:
    """The replica a read-only site reads from, if read-only mode is on and one is healthy."""
    if not db.read_only_mode_allowed():
        return None
    healthy = [replica["replica"] for replica in replicas or [] if replica["state"] == "healthy"]
    return f"replica {healthy[0]}" if healthy else None
