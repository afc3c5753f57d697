"""A TCP relay in front of a real server, which a test can make go silent: the server
seems to hang (no answer, no reset), as a frozen or cut-off node does to its clients."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .network import free_port


class Relay:
    """Relays 127.0.0.1:``port`` to ``target``; while ``silent`` is set nothing moves
    either way and new connections get no answer."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.silent = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.1)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        while self.silent.is_set() and not self._closed.is_set():
            self._closed.wait(0.05)  # accepted by the kernel, never answered
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        self._sockets.append(server)
        threading.Thread(target=self._pump, args=(server, client), daemon=True).start()
        self._pump(client, server)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(0.05)
        while not self._closed.is_set():
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            while self.silent.is_set() and not self._closed.is_set():
                self._closed.wait(0.05)  # held, never delivered while silent
            try:
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._closed.set()
        for each in [self._listener, *self._sockets]:
            try:
                each.close()
            except OSError:
                pass


@contextmanager
def relay(target: tuple[str, int]) -> Iterator[Relay]:
    running = Relay(target)
    try:
        yield running
    finally:
        running.close()
