"""A TCP server that accepts every connection and never answers (a hung API or Prometheus)."""

from __future__ import annotations

import socket
import threading


class SilentServer:
    """Listens on 127.0.0.1, accepts connections, reads nothing and never answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.closed = threading.Event()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                connection, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.accepted.append(connection)

    def __enter__(self) -> SilentServer:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.closed.set()
        self.sock.close()
        for connection in self.accepted:
            connection.close()
