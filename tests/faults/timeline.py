"""What the failover scenarios share: the app's short timeouts under gunicorn, and the
history of a load seen from the moment a new primary took writes (its :class:`Timeline`).

Used by scenario 11 (tests/faults/test_failover.py: a standby promoted by hand) and
scenario 19d (tests/faults/test_patroni.py: Patroni elects the new leader).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .test_restart import Call

WORKERS, THREADS = 2, 4
CONNECT_TIMEOUT = 2  # libpq applies it per host: a dead first host costs this much per connect
PING_TIMEOUT = 2  # the breaker's probe: a fresh connection, the same per-host rule
POOL_TIMEOUT = 2
NETWORK_TIMEOUT = 3  # tcp_user_timeout and keepalives: a silent partition fails within ~this
BREAKER_RESET = 1.0
APP_ENV = {
    "WEB_CONCURRENCY": str(WORKERS),
    "GUNICORN_THREADS": str(THREADS),
    "DATABASE_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
    "DATABASE_PING_TIMEOUT": str(PING_TIMEOUT),
    "DATABASE_POOL_TIMEOUT": str(POOL_TIMEOUT),
    "DATABASE_NETWORK_TIMEOUT": str(NETWORK_TIMEOUT),
    "DATABASE_BREAKER_RESET": str(BREAKER_RESET),
    "DATABASE_APP_NAME": "myapp-failover",
}
# Failed requests counted at the end of the load: with the app as it is there are none.
TAIL_SECONDS = 2.0
# The app's log line for a request that met SQLSTATE 25006: a 503 with the rule (the
# connection counted as lost), a 500 without it (myapp/errors.py).
READ_ONLY_ERROR = re.compile(
    r"database (?:error|unavailable \(\w+\)): ReadOnlySqlTransaction: cannot execute \w+ in a read-only transaction"
)


@dataclass
class Switch:
    """When the fault began and when the new primary accepted writes (monotonic)."""

    fault_at: float = 0.0
    promoted_at: float = 0.0
    promote_seconds: float = 0.0
    log_offset: int = 0  # the gunicorn log's size when the promotion completed


def read_only_errors(log: bytes) -> int:
    return len(READ_ONLY_ERROR.findall(log.decode(errors="replace")))


@dataclass
class Timeline:
    """The history seen from the promotion: t = 0 when the new primary took writes."""

    failed: int
    failed_after_promotion: int
    first_failure: float  # start of the first failed request
    last_failure: float  # end of the last failed request
    first_write_on_new_primary: float  # end of the first write acknowledged after t = 0
    failed_after_first_write: int  # e.g. in the other worker, still waiting for its breaker
    writes_acknowledged_after: int
    server_errors_after: int
    failed_in_tail: int  # failed requests that started in the last TAIL_SECONDS of the load
    read_only_before: int  # 25006 log lines before the promotion completed
    read_only_after: int  # and after it: the figure that must be 0
    promote_seconds: float
    fault_to_promotion: float
    write_p99_before: float  # seconds, the acknowledged writes that started before the fault
    write_p99_settled: float  # those that started 5 to 15 s after the promotion


def timeline(calls: list[Call], switch: Switch, log: bytes) -> Timeline:
    at = switch.promoted_at
    failed = [c for c in calls if not c.succeeded()]
    # Only the new primary can acknowledge a write that ends after t = 0: the old one is
    # stopped, cut off or read-only by then.
    acknowledged = sorted(c.ended - at for c in calls if c.ended > at and c.kind == "write" and c.status == 302)
    first_write = acknowledged[0] if acknowledged else float("inf")
    last_start = max(c.started for c in calls)
    return Timeline(
        failed=len(failed),
        failed_after_promotion=sum(c.ended > at for c in failed),
        first_failure=round(min((c.started - at for c in failed), default=0.0), 2),
        last_failure=round(max((c.ended - at for c in failed), default=0.0), 2),
        first_write_on_new_primary=round(first_write, 3),
        failed_after_first_write=sum(c.ended - at > first_write for c in failed),
        writes_acknowledged_after=len(acknowledged),
        server_errors_after=sum(c.ended > at and c.status is not None and c.status >= 500 and c.status != 503
                                for c in calls),
        failed_in_tail=sum(c.started >= last_start - TAIL_SECONDS for c in failed),
        read_only_before=read_only_errors(log[: switch.log_offset]),
        read_only_after=read_only_errors(log[switch.log_offset:]),
        promote_seconds=round(switch.promote_seconds, 2),
        fault_to_promotion=round(at - switch.fault_at, 2),
        write_p99_before=_write_p99(calls, float("-inf"), switch.fault_at),
        write_p99_settled=_write_p99(calls, at + 5, at + 15),
    )


def _write_p99(calls: list[Call], after: float, before: float) -> float:
    """The 99th percentile of the acknowledged writes that started in [after, before)."""
    seconds = sorted(c.ended - c.started for c in calls
                     if c.kind == "write" and c.status == 302 and after <= c.started < before)
    return round(seconds[int(0.99 * (len(seconds) - 1))], 3) if seconds else float("nan")
