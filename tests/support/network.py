"""Loopback ports for the servers tests start."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ports for listening servers come from below the kernel's ephemeral range, which the
# source ports of outgoing connections come from: a server stopped and started again
# (a Galera node rejoining, a restarted database) must find its port still free, and a
# client connection made meanwhile may take any free ephemeral port. Seen: a Galera
# node's IST port taken while it was down, so its state transfer failed.
_LOWEST = 20000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Every port handed out in this process: a port picked for a server that has not bound
# it yet is free to the next pick, and was once handed out twice.
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on now, below the ephemeral range, picked at
    random so that servers started side by side (or by parallel runs) do not collide,
    and never the same one twice in a process."""
    highest = max(_LOWEST + 1000, _ephemeral_start() - 1)
    for _ in range(200):
        port = random.randint(_LOWEST, highest)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port between {_LOWEST} and {highest}")
