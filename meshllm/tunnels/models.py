"""Pieces of model files between nodes, over the HTTP tunnel: a split participant without the file
fetches its tensors from a peer that has it (``engine.sparse``).

The requesting node sends ``GET /_meshllm/gguf/<model>?fingerprint=<fingerprint>`` with a ``Range``
header through an HTTP-kind stream (``tunnels.http``); the serving node answers ``206`` with those
bytes of its own copy of the model, or an error: 404 when it has no copy whose header matches the
fingerprint (it never serves another file), 416 for a range outside it. Only mesh members reach the
tunnel, and only files of the models in the state document that resolve on the serving node (a GGUF,
checked) are ever read. The requesting node checks every tensor it receives against the mesh's
hashes, so a peer with a damaged copy is caught, not trusted.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote

import anyio

from meshllm.engine.models import file_fingerprint, resolve_model
from meshllm.engine.sparse import RangeSourceError
from meshllm.errors import ModelError
from meshllm.state.schema import ModelName, ModelSpec, NodeId
from meshllm.tunnels.http import Answer, HttpTunnelClient, LocalForward, TunnelError, TunnelRequest

__all__ = ["GGUF_PREFIX", "ModelFileServer", "PeerRanges", "local_copies"]

GGUF_PREFIX = "/_meshllm/gguf/"
CHUNK = 1 << 20
_RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")

# model name and fingerprint -> this node's copy of the model file, or None
Lookup = Callable[[ModelName, str], Path | None]


class _FileAnswer:
    """An ``Answer`` streaming ``[start, end]`` of a file (or an empty error answer)."""

    def __init__(self, status: int, *, path: Path | None = None, start: int = 0, end: int = -1,
                 message: str = "") -> None:
        self.status_code = status
        self.path, self.start, self.end = path, start, end
        length = end - start + 1 if path is not None else len(message.encode())
        self.headers = [("content-length", str(length))]
        if path is not None:
            self.headers.append(("content-range", f"bytes {start}-{end}/{path.stat().st_size}"))
        self.message = message

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.path is None:
            if self.message:
                yield self.message.encode()
            return
        async with await anyio.open_file(self.path, "rb") as f:
            await f.seek(self.start)
            left = self.end - self.start + 1
            while left > 0:
                chunk = await f.read(min(CHUNK, left))
                if not chunk:
                    raise OSError(f"{self.path} ends early")
                left -= len(chunk)
                yield chunk

    async def aclose(self) -> None:
        pass


class ModelFileServer:
    """Wraps a node's ``LocalForward``: model-file requests are answered here, the rest passed on."""

    def __init__(self, lookup: Lookup, forward: LocalForward) -> None:
        self.lookup, self.forward = lookup, forward

    async def __call__(self, request: TunnelRequest) -> Answer:
        if not request.path.startswith(GGUF_PREFIX):
            return await self.forward(request)
        return await anyio.to_thread.run_sync(self._answer, request)

    def _answer(self, request: TunnelRequest) -> Answer:
        model = ModelName(unquote(request.path.removeprefix(GGUF_PREFIX)))  # a peer's request names it
        fingerprint = (parse_qs(request.query).get("fingerprint") or [""])[0]
        path = self.lookup(model, fingerprint) if request.method == "GET" else None
        if path is None:
            return _FileAnswer(404, message=f"no copy of {model} with fingerprint {fingerprint} on this node")
        ranged = next((v for k, v in request.headers if k.lower() == "range"), "")
        match = _RANGE.match(ranged.strip())
        size = path.stat().st_size
        if match is None or int(match[1]) > int(match[2]) or int(match[2]) >= size:
            return _FileAnswer(416, message=f"expected a range within bytes=0-{size - 1}, got {ranged!r}")
        return _FileAnswer(206, path=path, start=int(match[1]), end=int(match[2]))


class PeerRanges:
    """The ranges of ``model``'s file on ``node``, through the HTTP tunnel (a ``RangeSource``)."""

    def __init__(self, tunnels: HttpTunnelClient, node: NodeId, model: ModelName, fingerprint: str) -> None:
        self.tunnels, self.node, self.model, self.fingerprint = tunnels, node, model, fingerprint
        self.name = f"node {node}"
        self.received = 0

    async def stream(self, offset: int, length: int) -> AsyncIterator[bytes]:
        request = TunnelRequest("GET", GGUF_PREFIX + quote(self.model, safe=""),
                                f"fingerprint={quote(self.fingerprint, safe='')}",
                                [("range", f"bytes={offset}-{offset + length - 1}")], b"")
        try:
            response = await self.tunnels.request(self.node, request)
        except TunnelError as exc:
            raise RangeSourceError(str(exc)) from None
        try:
            if response.status_code != 206:
                body = (await response.aread()).decode(errors="replace")
                raise RangeSourceError(f"HTTP {response.status_code}: {body}")
            async for chunk in response:
                self.received += len(chunk)
                yield chunk
        except TunnelError as exc:
            raise RangeSourceError(str(exc)) from None
        finally:
            await response.aclose()


def local_copies(models: Callable[[], Mapping[ModelName, ModelSpec]]) -> Lookup:
    """A ``Lookup`` over the state document's models (``models``): the file a model's source resolves
    to on this node, when its header's fingerprint is the one asked for (a sparse copy never is: it
    lives apart, in the models folder's ``.split``)."""
    checked: dict[tuple[Path, int, int], str] = {}

    def lookup(model: ModelName, fingerprint: str) -> Path | None:
        spec = models().get(model)
        if spec is None or not fingerprint:
            return None
        try:
            path = resolve_model(spec.source, name=spec.name).path
            stat = path.stat()
            key = (path, stat.st_size, stat.st_mtime_ns)
            if key not in checked:
                checked[key] = file_fingerprint(path)
        except (ModelError, OSError):
            return None
        return path if checked[key] == fingerprint else None

    return lookup
