"""A lean HTTP/1.1 client for this node's own llama-servers, on asyncio protocols and httptools.

Every token of every streamed completion passes through here, so the per-chunk path is short: the
event loop hands received bytes to the C parser, the parser hands body bytes to a buffer, and the
reader takes everything buffered at once. A general client (httpx) spends several times more CPU per
chunk in its layers, and on a CPU-only node that CPU is taken from llama-server's decoding threads.

Only what talking to llama-server on loopback needs is here: one request per connection at a time,
keep-alive reuse, chunked and sized bodies, back-pressure, and closing the connection to cancel a
request (llama-server stops generating when its client goes away). A connection goes back to the
pool only after a whole final response: interim ``1xx`` responses are skipped, and a connection on
which anything arrives that no request asked for is closed, so no answer can reach the wrong request.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Iterable

import httptools

from meshllm.api.errors import BackendBroken, BackendUnavailable

__all__ = ["UpstreamBroken", "UpstreamPool", "UpstreamResponse"]

_HIGH_WATER = 1 << 20  # stop reading from llama-server while this much is buffered and unread


class UpstreamBroken(BackendBroken):
    """The upstream server closed the connection or sent a malformed response: before the response
    head, ``UpstreamPool.request`` turns it into ``BackendUnavailable`` (502)."""


class _Connection(asyncio.Protocol):
    """One TCP connection; carries one request/response exchange at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.closed = False
        self.error: Exception | None = None
        self.got_bytes = False
        self.paused = False
        self.keep_alive = False
        self.interim = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBroken("upstream tried to upgrade the connection"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBroken(f"upstream sent a malformed response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if not self.complete:
            try:
                self.parser.feed_data(b"")  # a body delimited by the connection closing ends here
            except httptools.HttpParserError:
                pass
        if not self.complete:
            self._fail(UpstreamBroken("upstream closed the connection before the response ended"))

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete or self.head is None:  # bytes no request asked for: this connection is out of step
            self._fail(UpstreamBroken("upstream sent a response no request asked for"))
            raise UpstreamBroken("unsolicited response")  # stops the parser (as HttpParserCallbackError)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200:  # interim (100 Continue, 103 Early Hints): the final response follows
            self.interim = True
            return
        self.keep_alive = self.parser.should_keep_alive()  # only valid until the message completes
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim, self.headers = False, []
            return
        self.complete = True
        self._wake()

    # helpers

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        self._wake()
        if self.transport is not None and not self.closed:
            self.transport.close()

    def begin(self, request: bytes) -> asyncio.Future[None]:
        assert self.transport is not None
        self.head = asyncio.get_running_loop().create_future()
        self.status, self.headers, self.complete, self.got_bytes, self.keep_alive = 0, [], False, False, False
        self.interim = False
        self.body.clear()
        self.buffered = 0
        self.parser = httptools.HttpResponseParser(self)
        self.transport.write(request)
        return self.head

    def take(self) -> bytes:
        body = self.body
        data = body.popleft() if len(body) == 1 else b"".join(body)
        body.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None


class UpstreamResponse:
    """A response whose head has arrived; iterate it for the body as it comes, then ``aclose()``."""

    def __init__(self, connection: _Connection) -> None:
        self._conn = connection
        self.status_code = connection.status
        self.headers = connection.headers
        self._released = False

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        while True:
            if conn.body:
                return conn.take()
            if conn.complete:
                raise StopAsyncIteration
            if conn.error is not None:
                raise conn.error
            conn.waiter = asyncio.get_running_loop().create_future()
            try:
                await conn.waiter
            finally:
                conn.waiter = None

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        """Give the connection back if the response was read to its end, else close it (which
        cancels the request upstream)."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        if conn.reusable() and not conn.body:
            conn.pool._release(conn)
        elif conn.transport is not None and not conn.closed:
            conn.transport.close()


class UpstreamPool:
    """Connections to upstream servers, kept alive between requests."""

    def __init__(self, *, connect_timeout: float = 5.0, max_idle_per_host: int = 16) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    async def request(self, host: str, port: int, method: str, target: str,
                      headers: Iterable[tuple[str, str]], body: bytes) -> UpstreamResponse:
        """Send a request; returns when the final response head has arrived. ``BackendUnavailable``
        when none came (503: nothing listens; 502: the server closed or garbled its answer).

        A kept-alive connection may have been closed by the server just as this request was sent on
        it; such a request never reached the server, so it is sent once more on a fresh connection.
        """
        request = _encode(method, target, host, port, headers, body)
        while True:
            conn, reused = await self._checkout(host, port)
            try:
                await conn.begin(request)
            except UpstreamBroken as exc:
                if reused and not conn.got_bytes:
                    continue
                raise BackendUnavailable(f"{host}:{port} gave no response: {exc}", status=502,
                                         code="upstream_failed") from None
            except BaseException:
                if conn.transport is not None:
                    conn.transport.close()
                raise
            return UpstreamResponse(conn)

    async def _checkout(self, host: str, port: int) -> tuple[_Connection, bool]:
        idle = self._idle.get((host, port))
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn, True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(self, (host, port)), host, port)
        except (OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"cannot connect to {host}:{port}: {exc}") from None
        return conn, False

    def _release(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) < self.max_idle_per_host:
            idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()

    def _forget(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()

    async def __aenter__(self) -> UpstreamPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _encode(method: str, target: str, host: str, port: int, headers: Iterable[tuple[str, str]],
            body: bytes) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
