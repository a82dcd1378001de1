"""The API layer: the OpenAI-compatible proxy on :9337 (its data plane: router, backends, pooled upstream
client; API keys, CORS, failover) and the management API and console on :3131. The names other layers use."""

from meshllm.api.admin import ConsoleAccess
from meshllm.api.backends import DataPlane
from meshllm.api.blackboard import BlackboardAPI
from meshllm.api.control import AppliedHook, EventSource
from meshllm.api.cors import CorsGate, CorsPolicy, DEFAULT_CORS_ORIGINS
from meshllm.api.errors import openai_error
from meshllm.api.events import EventHub
from meshllm.api.keys import ApiKeyGate, KeyRing, check_local_key, exposure_warning, key_routes, new_key
from meshllm.api.metrics import MeshMetrics, NodeGauges, RequestMetering
from meshllm.api.openai import DEFAULT_MAX_BODY, create_openai_app
from meshllm.api.rotation import Rotated, rotation_routes
from meshllm.api.routing import Router
from meshllm.api.status import create_status_app, status_snapshot

__all__ = [
    "ApiKeyGate",
    "AppliedHook",
    "BlackboardAPI",
    "ConsoleAccess",
    "CorsGate",
    "CorsPolicy",
    "DEFAULT_CORS_ORIGINS",
    "DEFAULT_MAX_BODY",
    "DataPlane",
    "EventHub",
    "EventSource",
    "KeyRing",
    "MeshMetrics",
    "NodeGauges",
    "RequestMetering",
    "Rotated",
    "Router",
    "check_local_key",
    "create_openai_app",
    "create_status_app",
    "exposure_warning",
    "key_routes",
    "new_key",
    "openai_error",
    "rotation_routes",
    "status_snapshot",
]
