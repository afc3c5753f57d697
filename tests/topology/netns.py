"""Network namespaces of our own, each joined to the host by a veth pair on a private /30.

Why: a server in a namespace can be cut off *silently*. Taking the veth end inside the
namespace down drops every packet in both directions without a reset or a FIN, which is
what a client sees when the database host loses power or its network: connects hang,
open connections wait for an answer that never comes. Stopping or killing a server on
loopback can never show that, because the kernel answers for a dead loopback port.

The partition is a black hole: the neighbour (ARP) entries of both ends are pinned, so
a connect during a partition times out rather than failing fast with "No route to host"
once ARP gives up.

Traffic rule of this machine: only loopback and the two addresses of each /30 picked
here (host end ``.1``, namespace end ``.2``, in 10.213.0.0/16, chosen at random per
namespace and never one already on a host interface) ever receive a packet. IPv6 is
switched off on both veth ends so that not even link-local neighbour discovery leaves
them. Everything is undone by the code that made it: processes still inside the
namespace are killed by PID (they can only be ours), then ``ip netns del`` removes
the namespace and with it the veth pair.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

COMMAND_TIMEOUT = 15.0
PREFIX = "myapp-"  # every namespace made here is named myapp-<hex>
SUPERNET = ipaddress.IPv4Network("10.213.0.0/16")


class NamespaceError(RuntimeError):
    """An ``ip`` command failed: the message carries its output."""


def _ip(*args: str) -> str:
    result = subprocess.run(
        ["ip", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    )
    if result.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _networks_in_use() -> set[ipaddress.IPv4Network]:
    """The 10.213.x.y/30 networks already on a host interface (another run's namespaces)."""
    used = set()
    for line in _ip("-4", "-o", "addr", "show").splitlines():
        for word in line.split():
            if "/" in word and word[0].isdigit():
                network = ipaddress.IPv4Interface(word).network
                if network.overlaps(SUPERNET):
                    used.add(network)
    return used


def _pick_network() -> ipaddress.IPv4Network:
    used = _networks_in_use()
    for _ in range(100):
        candidate = ipaddress.IPv4Network(f"10.213.{secrets.randbelow(256)}.{4 * secrets.randbelow(64)}/30")
        if not any(candidate.overlaps(network) for network in used):
            return candidate
    raise NamespaceError("no free /30 in 10.213.0.0/16")


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll ``condition`` until it holds; return the seconds it took, raise after ``timeout``."""
    started = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(interval)


class NetNamespace:
    """One namespace and its veth pair. Use :func:`network_namespace`, which cleans up."""

    def __init__(self) -> None:
        token = secrets.token_hex(3)
        self.name = PREFIX + token
        # Interface names are at most 15 characters.
        self.host_device = f"myapp{token}h"
        self.inner_device = f"myapp{token}n"
        self.network = _pick_network()
        first, second = list(self.network.hosts())
        self.host_address = str(first)  # the host end: the source of every host connection
        self.address = str(second)  # the namespace end: where its servers listen
        self.partitioned = False
        self._made_namespace = self._made_link = False  # never remove what someone else made

    # -- setup and teardown -------------------------------------------------------

    def create(self) -> None:
        _ip("netns", "add", self.name)
        self._made_namespace = True
        _ip("link", "add", self.host_device, "type", "veth", "peer", "name", self.inner_device,
            "netns", self.name)
        self._made_link = True
        Path(f"/proc/sys/net/ipv6/conf/{self.host_device}/disable_ipv6").write_text("1")
        self.run("sysctl", "-qw", f"net.ipv6.conf.{self.inner_device}.disable_ipv6=1")
        _ip("addr", "add", f"{self.host_address}/{self.network.prefixlen}", "dev", self.host_device)
        _ip("-n", self.name, "addr", "add", f"{self.address}/{self.network.prefixlen}", "dev", self.inner_device)
        # Pinned neighbour entries: no ARP on the link, and none failing during a
        # partition. Without them the host's kernel flushes its entry when the link goes
        # down, gives up resolving the address about 3 s later, and new connects then
        # fail after ~1 s with "No route to host" (EHOSTUNREACH): not a silent partition.
        host_mac = Path(f"/sys/class/net/{self.host_device}/address").read_text().strip()
        inner_mac = self.run("cat", f"/sys/class/net/{self.inner_device}/address").strip()
        _ip("neigh", "replace", self.address, "lladdr", inner_mac, "dev", self.host_device, "nud", "permanent")
        _ip("-n", self.name, "neigh", "replace", self.host_address, "lladdr", host_mac, "dev", self.inner_device,
            "nud", "permanent")
        _ip("-n", self.name, "link", "set", "lo", "up")
        _ip("link", "set", self.host_device, "up")
        _ip("-n", self.name, "link", "set", self.inner_device, "up")
        self.wait_for_carrier()

    def destroy(self) -> None:
        """Kill what still runs inside (by PID), delete the namespace and the veth pair."""
        if not self._made_namespace:
            return
        try:
            leftovers = self.pids()
        except NamespaceError:
            leftovers = []
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            wait_for(lambda: not self.pids(), 10, f"processes in {self.name} to exit")
        except (TimeoutError, NamespaceError):
            pass
        errors = []
        try:
            _ip("netns", "del", self.name)
        except NamespaceError as error:
            errors.append(str(error))
        if self._made_link and Path(f"/sys/class/net/{self.host_device}").exists():
            try:  # normally gone with the namespace, which held its peer
                _ip("link", "del", self.host_device)
            except NamespaceError as error:
                errors.append(str(error))
        if self.name in self.list_ours() or Path(f"/sys/class/net/{self.host_device}").exists():
            raise NamespaceError(f"{self.name} not removed: {errors}")

    @staticmethod
    def list_ours() -> list[str]:
        """Namespace names made by this module (of any run) that exist now."""
        return [line.split()[0] for line in _ip("netns", "list").splitlines()
                if line.split() and line.split()[0].startswith(PREFIX)]

    # -- use ------------------------------------------------------------------------

    def exec_prefix(self) -> list[str]:
        """Prefix a command so that it runs inside the namespace (``ip netns exec``
        replaces itself with the command, so a Popen's pid is the command's pid)."""
        return ["ip", "netns", "exec", self.name]

    def run(self, *command: str) -> str:
        result = subprocess.run([*self.exec_prefix(), *command], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        if result.returncode != 0:
            raise NamespaceError(f"{' '.join(command)} in {self.name} failed: {result.stderr.strip()}")
        return result.stdout

    def pids(self) -> list[int]:
        return [int(pid) for pid in _ip("netns", "pids", self.name).split()]

    def operstate(self) -> tuple[str, str]:
        """The operational state of the host end and of the namespace end."""
        host = Path(f"/sys/class/net/{self.host_device}/operstate").read_text().strip()
        inner = self.run("cat", f"/sys/class/net/{self.inner_device}/operstate").strip()
        return host, inner

    def wait_for_carrier(self, timeout: float = 10.0) -> float:
        """Wait until both veth ends are up. After ``link set up`` the kernel needs a
        moment (its link watch runs about once a second) before packets flow."""
        return wait_for(lambda: self.operstate() == ("up", "up"), timeout, f"carrier on {self.name}")

    def partition(self) -> None:
        """Take the namespace end down: packets are dropped silently both ways."""
        _ip("-n", self.name, "link", "set", self.inner_device, "down")
        self.partitioned = True

    def heal(self, timeout: float = 10.0) -> float:
        """Bring the namespace end up again; return the seconds until the link carries."""
        _ip("-n", self.name, "link", "set", self.inner_device, "up")
        self.partitioned = False
        return self.wait_for_carrier(timeout)


@contextmanager
def network_namespace() -> Iterator[NetNamespace]:
    """A fresh namespace joined to the host by a veth pair; removed at the end whatever happens."""
    namespace = NetNamespace()
    try:
        namespace.create()
        yield namespace
    finally:
        namespace.destroy()


class Partitionable:
    """For a server that may live in a namespace: cut it off silently, and heal."""

    netns: NetNamespace | None

    def answers_over_network(self) -> bool:
        """True when a new TCP connection to the server answers a query now (bounded)."""
        raise NotImplementedError

    def _namespace(self) -> NetNamespace:
        if self.netns is None:
            raise NamespaceError("this server is not in a network namespace: it cannot be partitioned")
        return self.netns

    def partition(self) -> None:
        """Cut the server off silently (no RST, no FIN): its namespace's link goes down."""
        self._namespace().partition()

    def heal(self, timeout: float = 20.0) -> float:
        """Link up again, then wait until the server answers a new connection; return the
        seconds from ``link up`` until it answered."""
        started = time.monotonic()
        self._namespace().heal(timeout)
        wait_for(self.answers_over_network, timeout, "server to answer after heal", interval=0.1)
        return time.monotonic() - started
