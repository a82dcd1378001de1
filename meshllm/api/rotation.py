"""``POST /api/rotate-key`` on the console port: give the mesh a new secret and return its invite token.

The rotation itself belongs to the node (``node.rotation``); this module only exposes it, through an
injected callable, so the API layer needs nothing above it. The request must be JSON (a cross-site
form or a ``fetch`` without CORS cannot send that), and the answer holds a secret: the console's
admin authentication guards this route like every other that reads a secret or changes state.
"""

from __future__ import annotations

import logging
from typing import Protocol

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from meshllm.api.errors import openai_error

__all__ = ["RotateKey", "Rotated", "rotation_routes"]

log = logging.getLogger(__name__)


class Rotated(BaseModel):
    """What a rotation gives the operator: the new invite token and the key ids."""

    token: str
    mesh_id: str
    key_id: str
    previous_key_id: str


class RotateKey(Protocol):
    """Rotate the mesh key on this node (the node provides it)."""

    async def __call__(self) -> Rotated: ...


def rotation_routes(rotate: RotateKey) -> list[Route]:
    async def rotate_key(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return openai_error(415, "send the request as application/json", code="unsupported_media_type")
        rotated = await rotate()
        log.warning("mesh key rotated on request: key %s -> %s", rotated.previous_key_id, rotated.key_id)
        return JSONResponse(rotated.model_dump())

    return [Route("/api/rotate-key", rotate_key, methods=["POST"])]
