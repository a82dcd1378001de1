"""Byte ranges of a model file on the hub: ``GET`` with ``Range`` (a ``RangeSource`` for ``engine.sparse``).

It honours ``HF_ENDPOINT`` and ``HF_TOKEN`` like the whole-file download (``engine.download``), follows
the hub's redirects to its storage, and pins the file's version: the ETag of the first answer (the
file's sha256 on the hub) must be the ETag of every later one, so pieces of two versions of a file
are never mixed. A failed request is tried again (``RETRIES``, with backoff) before the source gives up.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import anyio
import httpx

from meshllm.engine.download import HubFile
from meshllm.engine.sparse import RangeSourceError
from meshllm.engine.tensors import NeedMore, parse_table
from meshllm.errors import ModelError

__all__ = ["HubRanges", "remote_fingerprint"]

RETRIES = 3
CHUNK = 4 << 20


class HubRanges:
    """The ranges of one hub file, through one pooled HTTP client (``aclose`` it)."""

    def __init__(self, file: HubFile, *, retries: int = RETRIES, backoff: float = 0.5) -> None:
        self.file = file
        self.name = f"the hub ({file.url().split('/' + file.repo)[0]})"
        self.etag = ""
        self.retries, self.backoff = retries, backoff
        token = os.environ.get("HF_TOKEN")
        self.client = httpx.AsyncClient(follow_redirects=True, timeout=httpx.Timeout(30.0, connect=10.0),
                                        headers={"Authorization": f"Bearer {token}"} if token else {})
        self.received = 0  # bytes of content received

    async def aclose(self) -> None:
        await self.client.aclose()

    async def stream(self, offset: int, length: int) -> AsyncIterator[bytes]:
        sent = 0
        for attempt in range(self.retries + 1):
            try:
                async for chunk in self._once(offset + sent, length - sent):
                    sent += len(chunk)
                    yield chunk
                return
            except (httpx.HTTPError, RangeSourceError) as exc:
                if isinstance(exc, RangeSourceError) and "changed" in str(exc) or attempt == self.retries:
                    raise RangeSourceError(str(exc) or type(exc).__name__) from None
            await anyio.sleep(self.backoff * 2 ** attempt)

    async def _once(self, offset: int, length: int) -> AsyncIterator[bytes]:
        if length <= 0:
            return
        headers = {"Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity"}
        async with self.client.stream("GET", self.file.url(), headers=headers) as response:
            if response.status_code != 206:
                hint = "; set HF_TOKEN" if response.status_code in (401, 403) else ""
                raise RangeSourceError(f"{self.file.repo}/{self.file.path}: HTTP {response.status_code} to a "
                                       f"range request{hint}")
            etag = (response.headers.get("x-linked-etag") or response.headers.get("etag") or "").strip('"')
            if self.etag and etag and etag != self.etag:
                raise RangeSourceError(f"{self.file.repo}/{self.file.path} changed on the hub while its pieces "
                                       "were fetched")
            self.etag = self.etag or etag
            got = 0
            async for chunk in response.aiter_raw(CHUNK):
                chunk = chunk[:length - got]
                got += len(chunk)
                self.received += len(chunk)
                if chunk:
                    yield chunk
            if got < length:
                raise httpx.ReadError(f"the hub sent {got} of {length} bytes")


def remote_fingerprint(file: HubFile, size: int, *, first: int = 256 << 10) -> str:
    """The fingerprint (``engine.tensors``) of a hub file of ``size`` bytes, from its header alone (a
    few ``Range`` requests): what a model nobody has fetched yet is known by in the mesh."""
    token = os.environ.get("HF_TOKEN")
    want = min(size, first)
    with httpx.Client(follow_redirects=True, timeout=30.0,
                      headers={"Authorization": f"Bearer {token}"} if token else {}) as client:
        while True:
            try:
                answer = client.get(file.url(), headers={"Range": f"bytes=0-{want - 1}", "Accept-Encoding": "identity"})
            except httpx.HTTPError as exc:
                raise ModelError(f"{file.repo}/{file.path}: cannot read its header from the hub ({exc})") from None
            if answer.status_code not in (200, 206):
                raise ModelError(f"{file.repo}/{file.path}: HTTP {answer.status_code} reading its header")
            try:
                return parse_table(answer.content[:want], size).fingerprint
            except NeedMore as more:
                if want >= size:
                    raise ModelError(f"{file.repo}/{file.path}: its GGUF header runs past the end") from None
                want = min(size, max(more.size, 2 * want))
