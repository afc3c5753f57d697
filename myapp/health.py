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
    this worker's circuit breaker is closed (an open one answers at once, no ping).

    With replicas, each one's state and lag as this worker last checked it; a replica
    that is out does not make the app unready (its reads go to the primary). On a
    Galera cluster, the node a new connection reaches, its state and the cluster size.
    """
    breaker = db.breaker_status()
    extra: dict[str, object] = {"breaker": breaker}
    replicas = db.replica_status()
    if replicas is not None:
        extra["replicas"] = replicas
    if breaker is not None and breaker["state"] != "closed":
        reason = f"circuit breaker {breaker['state']}: {breaker['last_error']}"
        return {"status": "unavailable", "reason": reason, **extra}, 503
    try:
        latency = db.ping()
        cluster = db.galera_status()
    except SQLAlchemyError as error:
        return {"status": "unavailable", "reason": describe_error(error), **extra}, 503
    if cluster is not None:
        extra["galera"] = cluster
    return {"status": "ready", "database_latency_ms": round(latency * 1000, 2), **extra}, 200
