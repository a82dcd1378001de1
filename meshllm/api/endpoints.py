"""The llama-server endpoints the mesh forwards, and how a request names its model.

One table (``ENDPOINTS``) lists every route of llama-server's (``tools/server/server.cpp`` of the
pinned engine) that the OpenAI app on :9337 forwards, under the same paths llama-server answers,
``/v1`` prefix or not, so a client written against llama-server works against a node unchanged.
The serving node accepts a tunnelled request only for a path of the same table. Left out on purpose:
the routes that change or expose the server itself rather than ask the model (``POST /props``,
``/slots/:id``, ``/lora-adapters``, ``/metrics``), multipart uploads (``/audio/transcriptions``), and
``/models`` and ``/health``, which the node answers for the whole mesh.

A request is for the model its JSON body names in ``model``; else the one a ``model`` query
parameter names (``GET /props?model=M``, ``POST /tokenize?model=M``); else, when the mesh serves
exactly one model, that one; else it is a 400 that says to name one. A name the mesh does not know
also reaches its only model (clients ask for ``gpt-4o-mini`` out of habit): see ``api.routing``.

Errors the node makes itself on an Anthropic route (``/v1/messages...``) come in Anthropic's shape,
which the anthropic SDK parses; everywhere else in OpenAI's (``api.errors``).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs

from meshllm.jsonsafe import loads

__all__ = ["ENDPOINTS", "MODEL_HEADER", "BadRequest", "Endpoint", "endpoint_for", "is_anthropic", "requested_model"]

# the model a requesting node resolved the request to, for the serving node (requests never hop twice,
# and the body's own name may be an alias, or missing)
MODEL_HEADER = "x-meshllm-model"


@dataclass(frozen=True)
class Endpoint:
    """A llama-server route the mesh forwards."""

    path: str
    method: str = "POST"

    @property
    def anthropic(self) -> bool:
        return is_anthropic(self.path)


_POST = (
    # OpenAI
    "/v1/chat/completions", "/chat/completions", "/v1/completions", "/v1/embeddings",
    "/v1/responses", "/responses",
    "/v1/chat/completions/input_tokens", "/chat/completions/input_tokens",
    "/v1/responses/input_tokens", "/responses/input_tokens",
    # Anthropic
    "/v1/messages", "/v1/messages/count_tokens",
    # llama-server's own
    "/completion", "/completions", "/embedding", "/embeddings", "/infill",
    "/tokenize", "/detokenize", "/apply-template",
    "/v1/rerank", "/rerank", "/v1/reranking", "/reranking",
)
_GET = ("/props", "/slots")

ENDPOINTS: tuple[Endpoint, ...] = (*(Endpoint(p) for p in _POST), *(Endpoint(p, "GET") for p in _GET))
_BY_ROUTE = {(e.method, e.path): e for e in ENDPOINTS}


def endpoint_for(method: str, path: str) -> Endpoint | None:
    """The forwarded endpoint at ``method`` ``path``, or None."""
    return _BY_ROUTE.get((method, path))


def is_anthropic(path: str) -> bool:
    """Whether errors on ``path`` take Anthropic's shape."""
    return path.startswith("/v1/messages")


@dataclass(frozen=True)
class BadRequest:
    """What is wrong with a request: a 400, or the ``status`` that says it better."""

    message: str
    code: str
    param: str | None = None
    status: int = 400


def requested_model(body: bytes, query: str) -> str | None | BadRequest:
    """The model the request names (its JSON body's ``model``, else the ``model`` query parameter),
    None when it names none, or what is wrong with the body."""
    if body.strip():
        try:
            payload = loads(body)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, nested too deeply
            return BadRequest(f"request body is not valid JSON: {exc}", "invalid_json")
        if not isinstance(payload, dict):
            return BadRequest("request body must be a JSON object", "invalid_request")
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            return BadRequest("model must be a model name (a string; see /v1/models)", "missing_model", "model")
        if model:
            return model
    if query:
        named = parse_qs(query).get("model")
        if named and named[0]:
            return named[0]
    return None
