"""Fuzz a real meshllm node: ten thousand and more cases of what strangers send, and what became of it.

    .venv/bin/python bench/fuzz.py [--cases 10000] [--seed 22] [--json PATH]

It starts a node (``python -m meshllm --model TINY``, a generated tiny model, on free ports, in a
temporary state folder) and sends it, in shares of ``--cases``:

- ``openai``: chat, completion and Anthropic ``/v1/messages`` bodies, valid ones with parts replaced
  (``meshllm.testing.fuzz``), plain noise and JSON nested thousands deep, on ``:9337``;
- ``openapi``: requests schemathesis generates from an OpenAPI description of those routes;
- ``management``: manifests (mutated, noise) to ``/api/apply``, ``diff``, ``delete``, ``drop`` with the admin token;
- ``quic``: after a real QUIC handshake with the mesh's secret (from the node's invite token), streams of
  every kind carrying garbage (framed or not, JSON nested deep);
- ``parsers``: the parsers of outside input in process (manifests, invite tokens, frames, RPC tunnel
  frames, stream headers, JSON): only their documented errors may escape.

Then it reports: cases per target, answers per status class, malformed answers (an error without the
OpenAI error object, a 2xx that is not JSON, a stream event that is not JSON), unexpected exceptions of
the parsers, whether the node process is still alive (a crash), and the tracebacks in its log (unhandled
exceptions). It never asserts; ``tests/unit/test_fuzz.py`` is the seeded run CI does.
"""

from __future__ import annotations

import argparse
from collections import Counter
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import schemathesis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from meshllm.engine.build import find_engine
from meshllm.engine.tinygguf import write_dense
from meshllm.store.identity import NodeIdentity
from meshllm.store.mesh import InviteToken
from meshllm.testing.fuzz import (PARSERS, Tally, answer_problem, chat_bodies, completion_bodies, manifest_values,
                                  message_bodies, raw_bodies, raw_frames)
from meshllm.transport import QuicEndpoint, StreamKind

MODEL = "tiny-dense"
SHARES = {"openai": 0.30, "openapi": 0.10, "management": 0.15, "quic": 0.10, "parsers": 0.35}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cases(strategy: st.SearchStrategy[Any], count: int, check: Any, *, at: int) -> None:
    """Run ``check`` on ``count`` examples of ``strategy``, seeded; a failing check is counted by it, not raised."""
    @seed(at)
    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=("generate",))
    @given(strategy)
    def run(value: Any) -> None:
        check(value)

    run()


# -- HTTP ---------------------------------------------------------------------------------------------
def http_check(tally: Tally, target: str, client: httpx.Client, headers: dict[str, str]) -> Any:
    def check(case: tuple[str, bytes]) -> None:
        path, body = case
        tally.case(target)
        try:
            response = client.post(path, content=body, headers={"content-type": "application/json", **headers})
        except httpx.HTTPError as exc:
            tally.problem(target, f"{path}: no answer: {exc!r}")
            return
        tally.status(response.status_code)
        if response.status_code >= 500:
            tally.server_error(f"{path} {response.status_code}: {response.text[:160]}")
        problem = answer_problem(response.status_code, response.headers.get("content-type", ""), response.content)
        if problem:
            tally.problem(target, f"{path}: {problem}")
    return check


def openai_cases() -> st.SearchStrategy[tuple[str, bytes]]:
    dumped = st.one_of(chat_bodies(MODEL).map(lambda b: ("/v1/chat/completions", b)),
                       completion_bodies(MODEL).map(lambda b: ("/v1/completions", b)),
                       message_bodies(MODEL).map(lambda b: ("/v1/messages", b)))
    return st.one_of(dumped.map(lambda pb: (pb[0], json.dumps(pb[1]).encode())),
                     st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                                "/v1/messages"]), raw_bodies()))


def management_cases() -> st.SearchStrategy[tuple[str, bytes]]:
    bodies = st.one_of(st.lists(manifest_values(), max_size=3).map(lambda v: json.dumps(v).encode()), raw_bodies())
    return st.tuples(st.sampled_from(["/api/apply", "/api/diff", "/api/delete", "/api/drop"]), bodies)


def openapi_schema() -> dict[str, Any]:
    message = {"type": "object", "properties": {"role": {"type": "string", "enum": ["user", "assistant", "system"]},
                                                "content": {"type": "string", "maxLength": 40}},
               "required": ["role", "content"]}
    common = {"model": {"type": "string", "enum": [MODEL]}, "max_tokens": {"type": "integer", "maximum": 8},
              "temperature": {"type": "number"}, "stream": {"type": "boolean"}}
    bodies = {
        "/v1/chat/completions": {"messages": {"type": "array", "items": message, "maxItems": 3}},
        "/v1/completions": {"prompt": {"type": "string", "maxLength": 40}},
        "/v1/messages": {"messages": {"type": "array", "items": message, "maxItems": 3}},
    }
    paths = {path: {"post": {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "properties": {**common, **fields}, "required": ["model", *fields]}}}},
        "responses": {"default": {"description": "an answer"}}}} for path, fields in bodies.items()}
    return {"openapi": "3.0.3", "info": {"title": "meshllm OpenAI API", "version": "1"}, "paths": paths}


def openapi_cases() -> st.SearchStrategy[tuple[str, bytes]]:
    schema = schemathesis.openapi.from_dict(openapi_schema())
    strategies = [result.ok().as_strategy() for result in schema.get_all_operations()]

    def encoded(case: Any) -> tuple[str, bytes]:
        body = case.body
        if isinstance(body, dict) and "max_tokens" not in body:
            body = {**body, "max_tokens": 8}
        return str(case.path), json.dumps(body).encode()
    return st.one_of(*strategies).map(encoded)


# -- QUIC -----------------------------------------------------------------------------------------------
async def quic_garbage(tally: Tally, token: str, count: int, rng: random.Random) -> None:
    invite = InviteToken.decode(token)
    host, _, port = invite.addrs[0].rpartition(":")
    me = QuicEndpoint(NodeIdentity(Ed25519PrivateKey.generate()), invite.credentials.mesh_id,
                      invite.credentials.secret, host="127.0.0.1")
    payloads: list[bytes] = []
    run_cases(raw_frames(), count, payloads.append, at=rng.randrange(1 << 30))
    async with anyio.create_task_group() as tg:
        await tg.start(me.run)
        conn = await me.connect(host, int(port), timeout=30)
        for payload in payloads:
            tally.case("quic")
            kind = rng.choice(list(StreamKind))
            try:
                with anyio.move_on_after(2):
                    stream = await conn.open_stream(kind)
                    await stream.send(payload)
                    await stream.send_eof()
                    while await stream.receive():
                        pass
            except Exception:  # the node reset the stream or refused it: what it should do with garbage
                pass
            if not conn.authenticated or conn.closed:
                tally.problem("quic", "the node closed the connection over garbage on one stream")
                conn = await me.connect(host, int(port), timeout=30)
        tg.cancel_scope.cancel()


# -- parsers -------------------------------------------------------------------------------------------
def fuzz_parsers(tally: Tally, count: int, rng: random.Random) -> None:
    per = max(1, count // len(PARSERS))
    for name, (parse, inputs, allowed) in PARSERS.items():
        def check(value: Any, name: str = name, parse: Any = parse, allowed: Any = allowed) -> None:
            tally.case(f"parser: {name}")
            try:
                parse(value)
            except allowed:
                pass
            except Exception as exc:
                tally.problem(f"parser: {name}", f"{type(exc).__name__}: {exc} on {value!r:.80}")
        run_cases(inputs, per, check, at=rng.randrange(1 << 30))


# -- the node ------------------------------------------------------------------------------------------
def start_node(folder: Path, engine: Path) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    model = write_dense(folder / f"{MODEL}.gguf")
    port, console = free_port(), free_port()
    log = folder / "node.log"
    cmd = [sys.executable, "-m", "meshllm", "--model", str(model), "--port", str(port), "--console", str(console),
           "--state-dir", str(folder / "state"), "--max-tokens-default", "16", "--allow-models", str(folder)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "MESHLLM_ENGINE_DIR": str(engine)})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the node exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port, console, log
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the node did not become ready")


def unhandled(log: Path) -> list[str]:
    lines = log.read_text(errors="replace").splitlines()
    return [lines[i + 1] if i + 1 < len(lines) else line for i, line in enumerate(lines)
            if line.startswith("Traceback") or "Task exception was never retrieved" in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    engine = find_engine()
    if engine is None:
        raise SystemExit("the llama.cpp engine is not built: meshllm engine build")
    rng = random.Random(args.seed)
    tally = Tally()
    share = {name: int(args.cases * part) for name, part in SHARES.items()}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="meshllm-fuzz-") as tmp:
        proc, port, console, log = start_node(Path(tmp), engine)
        try:
            admin = {"Authorization": "Bearer " + (Path(tmp) / "state" / "admin.token").read_text().strip()}
            token = httpx.get(f"http://127.0.0.1:{console}/api/token", headers=admin, timeout=10).json()["token"]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as api, \
                    httpx.Client(base_url=f"http://127.0.0.1:{console}", timeout=60) as mgmt:
                run_cases(openai_cases(), share["openai"], http_check(tally, "openai", api, {}), at=rng.randrange(1 << 30))
                run_cases(openapi_cases(), share["openapi"], http_check(tally, "openapi", api, {}),
                          at=rng.randrange(1 << 30))
                run_cases(management_cases(), share["management"], http_check(tally, "management", mgmt, admin),
                          at=rng.randrange(1 << 30))
            anyio.run(quic_garbage, tally, token, share["quic"], rng)
            fuzz_parsers(tally, share["parsers"], rng)
            time.sleep(1.0)
            alive = proc.poll() is None
            healthy = alive and httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        tracebacks = unhandled(log)
    report = {"cases": tally.total, "by_target": tally.cases, "statuses": tally.statuses,
              "node_crashed": not alive, "node_healthy_after": healthy, "unhandled_exceptions_in_log": len(tracebacks),
              "malformed_or_unexpected": len(tally.problems), "examples": tally.problems[:20] + tracebacks[:10],
              "server_errors": dict(Counter(tally.server_errors).most_common(15)),
              "seconds": round(time.monotonic() - started, 1), "seed": args.seed}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
