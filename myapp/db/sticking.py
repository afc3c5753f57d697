"""Read-your-writes across requests: the primary's WAL position after a user's last
commit, kept in their signed session cookie (so it also survives a flashed redirect).

While a replica has not replayed that position, the user's reads go to one that has, or
to the primary; other users are not affected. The position is dropped once no replica
could serve a read that misses it (``ReplicaSet.replayed_everywhere``). Only used when
replicas are configured: without them the cookie never carries it.
"""

from __future__ import annotations

import time

from flask import session as cookie

from .replicas import ReplicaSet

KEY = "_db_lsn"  # [WAL position as an integer, Unix time of the commit]

# A position that no replica reaches: the commit's position could not be read (the
# primary went away just after it), so the user reads from the primary until the write
# is old enough for every healthy replica to have it.
UNKNOWN_POSITION = 2**63 - 1


def required_lsn() -> int | None:
    """The WAL position this user's reads must see, or None."""
    kept = cookie.get(KEY)
    return int(kept[0]) if kept else None


def remember(lsn: int | None) -> None:
    """Keep the position of the commit this request made (the later of two)."""
    position = UNKNOWN_POSITION if lsn is None else lsn
    kept = cookie.get(KEY)
    if kept and int(kept[0]) >= position:
        return
    cookie[KEY] = [position, int(time.time())]


def forget_if_replayed(replicas: ReplicaSet) -> None:
    """Drop the position once no replica can serve a read that misses it."""
    kept = cookie.get(KEY)
    if kept and replicas.replayed_everywhere(int(kept[0]), time.time() - int(kept[1])):
        del cookie[KEY]
