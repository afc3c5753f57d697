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
    this worker's circuit breaker is closed (an open one answers at once, no ping)."""
    breaker = db.breaker_status()
    if breaker is not None and breaker["state"] != "closed":
        reason = f"circuit breaker {breaker['state']}: {breaker['last_error']}"
        return {"status": "unavailable", "reason": reason, "breaker": breaker}, 503
    try:
        latency = db.ping()
    except SQLAlchemyError as error:
        return {"status": "unavailable", "reason": describe_error(error), "breaker": breaker}, 503
    return {"status": "ready", "database_latency_ms": round(latency * 1000, 2), "breaker": breaker}, 200
