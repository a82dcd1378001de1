"""Prometheus metrics of one node (``/metrics`` on the console port) and the console's throughput figures.

``RequestMetering`` is an ASGI middleware in front of the OpenAI app (inside the API-key gate): it
sees each request's body as the app reads it and each response chunk as the client gets it, so it
measures what clients see, whichever way the app routes the request (this node's llama-server or a
peer's, through the HTTP tunnel). Per model it counts requests, errors (an HTTP status of 400 or more,
or an error event inside a stream), tokens in and out (``usage`` of a plain answer, the ``usage`` or
llama-server ``timings`` of a stream's last chunks), time to first token (first body chunk of a
stream) and decode rate (``timings.predicted_per_second``, else tokens out over the time from the
first to the last chunk), requests in flight, and of those the queue: requests that have had no byte
of their answer yet (waiting for a slot of the engine, or for its prompt to be read).

Per node, read when scraped: capacity and use (bytes of the models it serves or loads), peers
alive, gossip bytes and QUIC bytes (the endpoint's UDP bytes: gossip, tunnels and QUIC overhead).
Failovers (``api.failover``) are counted per model and stage, and so are failures it could not move.

Everything lives in a ``CollectorRegistry`` of the node's own (none at module level), and the
console's figures (``summary``) are read back from the same counters, so both always agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meshllm.jsonsafe import loads
from meshllm.state.document import MeshState
from meshllm.state.schema import ModelName, NodeId, ServerPhase

__all__ = ["MeshMetrics", "NodeGauges", "RequestMetering"]

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_RATE_BUCKETS = (1, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
_BODY_LIMIT = 1 << 20  # a plain answer's body kept to read its usage (longer ones go uncounted)
_METERED = ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses", "/v1/embeddings")


@dataclass(frozen=True, kw_only=True)
class NodeGauges:
    """Where the per-node figures come from (read at each scrape)."""

    gossip_bytes: Callable[[], tuple[int, int]] = lambda: (0, 0)  # sent, received
    quic_bytes: Callable[[], tuple[int, int]] = lambda: (0, 0)


class _NodeCollector(Collector):
    def __init__(self, state: MeshState, node_id: NodeId, gauges: NodeGauges) -> None:
        self.state, self.node_id, self.gauges = state, node_id, gauges

    def collect(self) -> Any:
        nodes, alive, models = self.state.nodes(), self.state.alive_nodes(), self.state.models()
        me = nodes.get(self.node_id)
        used = sum(models[s.model].size_bytes for s in self.state.servers().values()
                   if s.node == self.node_id and s.model in models and s.phase != ServerPhase.FAILED)
        yield GaugeMetricFamily("meshllm_node_capacity_bytes", "VRAM (RAM on CPU nodes) this node offers",
                                value=me.capacity_bytes if me else 0)
        yield GaugeMetricFamily("meshllm_node_used_bytes", "bytes of the models this node serves or loads",
                                value=used)
        yield GaugeMetricFamily("meshllm_peers", "other nodes of the mesh alive", value=max(0, len(alive) - 1))
        for name, (sent, received) in (("gossip", self.gauges.gossip_bytes()), ("quic", self.gauges.quic_bytes())):
            family = GaugeMetricFamily(f"meshllm_{name}_bytes", f"{name} bytes since start", labels=["direction"])
            family.add_metric(["sent"], sent)
            family.add_metric(["received"], received)
            yield family


class MeshMetrics:
    """The node's metrics: per-model request figures, fed by ``RequestMetering``, and node gauges."""

    def __init__(self, state: MeshState, *, node_id: NodeId, gauges: NodeGauges | None = None) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("meshllm_requests", "requests per model", ["model"], registry=registry)
        self.errors = Counter("meshllm_request_errors", "requests that ended in an error", ["model"],
                              registry=registry)
        self.tokens_in = Counter("meshllm_prompt_tokens", "prompt tokens", ["model"], registry=registry)
        self.tokens_out = Counter("meshllm_completion_tokens", "generated tokens", ["model"], registry=registry)
        self.ttft = Histogram("meshllm_time_to_first_token_seconds", "time to the first streamed chunk",
                              ["model"], buckets=_TTFT_BUCKETS, registry=registry)
        self.decode = Histogram("meshllm_decode_tokens_per_second", "decode rate of each answer", ["model"],
                                buckets=_RATE_BUCKETS, registry=registry)
        self.in_flight = Gauge("meshllm_requests_in_flight", "requests being answered", ["model"],
                               registry=registry)
        self.failovers = Counter("meshllm_failovers", "requests moved to another server of their model, by stage "
                                 "(before_start: not yet answered; mid_stream: carried on)", ["model", "stage"],
                                 registry=registry)
        self.unrecovered = Counter("meshllm_unrecovered_server_failures", "requests whose server failed where "
                                   "no other could take them over", ["model", "stage"], registry=registry)
        self.waiting = Gauge("meshllm_requests_waiting", "requests in flight with no byte of their answer yet "
                             "(the queue)", ["model"], registry=registry)
        registry.register(_NodeCollector(state, node_id, gauges or NodeGauges()))
        self.state = state
        self._models: set[ModelName] = set()

    def summary(self) -> dict[ModelName, dict[str, float]]:
        """Per model, the counters' values (the console turns them into rates)."""
        get = self.registry.get_sample_value
        out = {}
        for model in sorted(self._models):
            label: dict[str, str] = {"model": model}
            ttft_n = get("meshllm_time_to_first_token_seconds_count", label) or 0.0
            rate_n = get("meshllm_decode_tokens_per_second_count", label) or 0.0
            out[model] = {
                "requests": get("meshllm_requests_total", label) or 0.0,
                "errors": get("meshllm_request_errors_total", label) or 0.0,
                "tokens_in": get("meshllm_prompt_tokens_total", label) or 0.0,
                "tokens_out": get("meshllm_completion_tokens_total", label) or 0.0,
                "in_flight": get("meshllm_requests_in_flight", label) or 0.0,
                "waiting": get("meshllm_requests_waiting", label) or 0.0,
                "ttft_avg_s": (get("meshllm_time_to_first_token_seconds_sum", label) or 0.0) / ttft_n if ttft_n else 0.0,
                "decode_avg_tps": (get("meshllm_decode_tokens_per_second_sum", label) or 0.0) / rate_n if rate_n else 0.0,
            }
        return out

    def started(self, asked: str) -> ModelName | None:
        """Count a request for the model a client ``asked`` for, and return it; None (not counted) for a
        name the mesh does not know, so a client cannot grow the label set without bound."""
        if asked not in self._models and asked not in self.state.models():
            return None
        model = ModelName(asked)  # a known model's name from here on
        self._models.add(model)
        self.requests.labels(model).inc()
        self.in_flight.labels(model).inc()
        self.waiting.labels(model).inc()
        return model

    def answering(self, model: ModelName) -> None:
        """The first byte of a started request's answer went out: it leaves the queue."""
        self.waiting.labels(model).dec()

    def finished(self, model: ModelName, *, error: bool, tokens_in: int, tokens_out: int, ttft: float | None,
                 rate: float | None) -> None:
        self.in_flight.labels(model).dec()
        if error:
            self.errors.labels(model).inc()
        self.tokens_in.labels(model).inc(tokens_in)
        self.tokens_out.labels(model).inc(tokens_out)
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
        if rate:
            self.decode.labels(model).observe(rate)

    def failed_over(self, model: ModelName, *, stage: str) -> None:
        """A request was moved to another server (``api.failover``)."""
        self.failovers.labels(model, stage).inc()

    def gave_up(self, model: ModelName, *, stage: str) -> None:
        """A request's server failed and it could not be moved."""
        self.unrecovered.labels(model, stage).inc()

    def routes(self) -> list[Route]:
        async def metrics(request: Request) -> Response:
            return Response(generate_latest(self.registry), media_type="text/plain; version=0.0.4; charset=utf-8")

        return [Route("/metrics", metrics, methods=["GET"])]


class _Meter:
    """One request's figures, from the request body and the response chunks that pass by."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.start = clock()
        self.body = bytearray()
        self.read = False  # the whole request body was seen
        self.status = 0
        self.streaming = False
        self.first: float | None = None
        self.last = 0.0
        self.kept = bytearray()  # a plain answer's body, or a stream's unfinished line
        self.error = False
        self.tokens_in = self.tokens_out = 0
        self.rate: float | None = None

    def model(self) -> str | None:
        try:
            payload = loads(self.body)
        except ValueError:
            return None
        model = payload.get("model") if isinstance(payload, dict) else None
        return model if isinstance(model, str) and model else None

    def response_start(self, message: Message) -> None:
        self.status = message["status"]
        headers = dict(message.get("headers", []))
        self.streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
        self.error = self.status >= 400

    def chunk(self, data: bytes) -> None:
        if not data:
            return
        now = self.clock()
        self.first = now if self.first is None else self.first
        self.last = now
        if not self.streaming:
            if len(self.kept) + len(data) <= _BODY_LIMIT:
                self.kept += data
            return
        self.kept += data
        *lines, rest = self.kept.split(b"\n")
        self.kept = bytearray(rest)
        for line in lines:
            if line.startswith(b"data:") and (b'"usage"' in line or b'"timings"' in line or b'"error"' in line):
                self._read(bytes(line[5:]))
            elif line.startswith(b"event: error"):
                self.error = True

    def _read(self, raw: bytes) -> None:
        try:
            payload = loads(raw)
        except ValueError:
            return
        if not isinstance(payload, dict):
            return
        if "error" in payload:
            self.error = True
        usage, timings = payload.get("usage"), payload.get("timings")
        if isinstance(usage, dict):
            self.tokens_in = int(usage.get("prompt_tokens") or usage.get("input_tokens") or self.tokens_in)
            self.tokens_out = int(usage.get("completion_tokens") or usage.get("output_tokens") or self.tokens_out)
        if isinstance(timings, dict):
            self.tokens_in = self.tokens_in or int(timings.get("prompt_n") or 0)
            self.tokens_out = self.tokens_out or int(timings.get("predicted_n") or 0)
            self.rate = float(timings.get("predicted_per_second") or 0.0) or None

    def figures(self) -> dict[str, Any]:
        if not self.streaming and self.kept and not self.error:
            self._read(bytes(self.kept))
        ttft = self.first - self.start if self.streaming and self.first is not None else None
        rate = self.rate
        if rate is None and self.streaming and self.first is not None and self.last > self.first:
            rate = self.tokens_out / (self.last - self.first) if self.tokens_out else None
        return {"error": self.error, "tokens_in": self.tokens_in, "tokens_out": self.tokens_out, "ttft": ttft,
                "rate": rate}


class RequestMetering:
    """ASGI middleware feeding ``MeshMetrics`` from the OpenAI app's requests (see the module docstring)."""

    def __init__(self, app: ASGIApp, metrics: MeshMetrics, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.app, self.metrics, self.clock = app, metrics, clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in _METERED:
            await self.app(scope, receive, send)
            return
        meter = _Meter(self.clock)
        model: ModelName | None = None

        async def metered_receive() -> Message:
            nonlocal model
            message = await receive()
            if message["type"] == "http.request" and model is None and not meter.read:
                if len(meter.body) < _BODY_LIMIT:
                    meter.body += message.get("body", b"")
                if not message.get("more_body", False):
                    meter.read = True
                    name = meter.model()
                    if name is not None:
                        model = self.metrics.started(name)
            return message

        done = queued = False

        def answering() -> None:
            nonlocal queued
            if model is not None and not queued:
                queued = True  # counted out of the queue once
                self.metrics.answering(model)

        def finish() -> None:
            nonlocal done
            if model is not None and not done:
                done = True
                answering()
                self.metrics.finished(model, **meter.figures())

        async def metered_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                meter.response_start(message)
            elif message["type"] == "http.response.body":
                meter.chunk(message.get("body", b""))
                if meter.first is not None:
                    answering()
                if not message.get("more_body", False):
                    finish()  # counted before the client can see the end of the answer
            await send(message)

        try:
            await self.app(scope, metered_receive, metered_send)
        except BaseException:
            meter.error = not done
            raise
        finally:
            finish()
