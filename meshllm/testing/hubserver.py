"""A local HTTP server that speaks the Hugging Face hub's download protocol, for tests and benches.

``HEAD``/``GET /ORG/REPO/resolve/REV/PATH`` answer as the hub does for an LFS file: ``ETag`` and
``X-Linked-Etag`` (the file's sha256), ``X-Linked-Size``, ``X-Repo-Commit``, ``Accept-Ranges`` and
``Range`` requests (206). Files are registered with ``add`` (bytes or a path on disk); faults on demand:
drop the connection after N bytes (``drop_after``, once), serve one flipped byte (``corrupt``, ``corrupt_at``), answer
401 as a gated repository (``gated``; a request with ``token`` as its bearer passes), advertise another size (``advertise_size``). What was asked is
counted (``gets``, ``ranges``, ``bytes_sent``) so a test can prove a file was fetched once, or resumed.
Point huggingface_hub at it with ``HF_ENDPOINT=server.url``.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["HubFileEntry", "HubServer"]

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 1 << 20


@dataclass
class HubFileEntry:
    path: Path
    size: int
    sha256: str
    drop_after: int | None = None  # the next GET ends after this many bytes (then cleared)
    corrupt: bool = False  # serve the byte in the middle flipped (the sha256 advertised stays right)
    corrupt_at: int | None = None  # serve the byte at this offset flipped instead (in a tensor, say)
    gated: bool = False  # 401 as a gated repository, unless the request brings ``token``
    token: str = ""
    advertise_size: int | None = None
    gets: int = 0  # GETs that read to the end of the file: downloads; pieces are in ``ranges`` only
    ranges: list[str] = field(default_factory=list)


class HubServer:
    """``with HubServer() as hub: hub.add("org/repo", "f.gguf", path)``; ``hub.url`` is its endpoint."""

    def __init__(self, *, rate: int | None = None) -> None:
        self.files: dict[tuple[str, str], HubFileEntry] = {}
        self.bytes_sent = 0
        self.rate = rate  # bytes a second per response, None: as fast as it goes
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, repo: str, path: str, source: Path, **faults: Any) -> HubFileEntry:
        """Serve ``source`` (a file on disk) as ``repo``'s ``path``, with ``faults`` (see the fields)."""
        digest = hashlib.sha256()
        with source.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        entry = HubFileEntry(path=source, size=source.stat().st_size, sha256=digest.hexdigest(), **faults)
        self.files[(repo, path)] = entry
        return entry

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


_PATH = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _error(self, status: int, code: str, message: str) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _answer(self, *, body: bool) -> None:
            match = _PATH.match(self.path.split("?")[0])
            entry = hub.files.get((match[1], match[3])) if match else None
            if entry is None:
                self._error(404, "EntryNotFound", "Entry not found")
                return
            if entry.gated and self.headers.get("Authorization") != f"Bearer {entry.token}":
                self._error(401, "GatedRepo", "Access to this repository is restricted")
                return
            start, end = 0, entry.size - 1
            ranged = self.headers.get("Range")
            if ranged and body:
                entry.ranges.append(ranged)
                m = re.match(r"bytes=(\d+)-(\d*)", ranged)
                if m:
                    start, end = int(m[1]), int(m[2]) if m[2] else entry.size - 1
            self.send_response(206 if ranged and body else 200)
            etag = f'"{entry.sha256}"'
            for name, value in (("ETag", etag), ("X-Linked-Etag", etag), ("X-Repo-Commit", COMMIT),
                                ("X-Linked-Size", str(entry.advertise_size or entry.size)),
                                ("Accept-Ranges", "bytes"), ("Content-Type", "application/octet-stream"),
                                ("Content-Length", str(end - start + 1 if body else entry.size))):
                self.send_header(name, value)
            if ranged and body:
                self.send_header("Content-Range", f"bytes {start}-{end}/{entry.size}")
            self.end_headers()
            if body:
                with hub.lock:
                    entry.gets += end == entry.size - 1  # a download (or its resumption), not a piece
                    drop, entry.drop_after = entry.drop_after, None
                self._send(entry, start, end, drop)

        def _send(self, entry: HubFileEntry, start: int, end: int, drop: int | None) -> None:
            import time

            flip = entry.corrupt_at if entry.corrupt_at is not None else entry.size // 2 if entry.corrupt else -1
            sent = 0
            with entry.path.open("rb") as f:
                f.seek(start)
                pos = start
                while pos <= end:
                    chunk = bytearray(f.read(min(CHUNK, end + 1 - pos)))
                    if pos <= flip < pos + len(chunk):
                        chunk[flip - pos] ^= 0xFF
                    if drop is not None and sent + len(chunk) > drop:
                        self.wfile.write(chunk[: drop - sent])
                        self.wfile.flush()
                        hub.bytes_sent += drop - sent
                        self.close_connection = True
                        self.connection.shutdown(2)  # a cut transfer, as a broken network leaves it
                        return
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    pos += len(chunk)
                    with hub.lock:
                        hub.bytes_sent += len(chunk)
                    if hub.rate:
                        time.sleep(len(chunk) / hub.rate)

    return Handler
