"""``POST /api/rotate-key`` on the console port: give the mesh a new secret and return its invite token.

The rotation itself belongs to the node (``node.rotation``); this module only exposes it, through an
injected callable, so the API layer needs nothing above it. The console's ``AdminGate`` guards it like
every route that changes state (admin token, a JSON body), which matters twice here: the answer holds
the new secret.
"""

from __future__ import annotations

import logging
from typing import Protocol

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

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
        rotated = await rotate()
        log.warning("mesh key rotated on request: key %s -> %s", rotated.previous_key_id, rotated.key_id)
        return JSONResponse(rotated.model_dump())

    return [Route("/api/rotate-key", rotate_key, methods=["POST"])]
