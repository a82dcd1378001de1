"""A TCP relay that counts the bytes crossing it: how much an RPC client really sends a worker.

``CountingTcpRelay(target)`` listens on 127.0.0.1 (an ephemeral port, ``.port``) and pipes every
connection to 127.0.0.1:``target``, counting bytes towards the server (``to_server``) and back
(``to_client``). Threads, not asyncio, so tests and benchmarks can use it beside blocking code.
"""

from __future__ import annotations

import socket
import threading

__all__ = ["CountingTcpRelay"]


class CountingTcpRelay:
    def __init__(self, target: int) -> None:
        self.target = target
        self.to_server = self.to_client = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while chunk := src.recv(1 << 20):
                dst.sendall(chunk)
                with self._lock:
                    if upstream:
                        self.to_server += len(chunk)
                    else:
                        self.to_client += len(chunk)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            src.close()  # each socket is the source of one pump, which closes it

    def close(self) -> None:
        self._sock.close()
