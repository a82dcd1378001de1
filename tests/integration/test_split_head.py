"""A split's host keeps the output head (issue 19): a decoded token costs the network a hidden state,
not the logits.

What a user notices: a split of a large-vocabulary model decodes without shipping every token's
logits (n_vocab x 4 bytes, 1 MB for a 262k vocabulary) from the last worker to the host; the worker
needs none of the head's tensors (its copy of the file names only its layers), and the split answers
exactly as one llama-server on the whole file does.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from meshllm.engine.ggufinfo import block_count
from meshllm.engine.tensors import file_table, masked_header
from meshllm.engine.tinygguf import write_dense
from meshllm.reconcile.served import DesiredServer, split_args
from meshllm.reconcile.shares import HOST, Share, share_tensors
from meshllm.testing.engines import running
from tests.conftest import free_port
from tests.integration.nodes import wait_for

pytestmark = pytest.mark.engine

N_VOCAB, N_EMBD, TOKENS = 32_000, 64, 32
PROMPT = {"prompt": "Once upon a time", "n_predict": TOKENS, "temperature": 0, "ignore_eos": True,
          "cache_prompt": False}


def complete(engine: Path, model: Path, log: Path, extra: list[str], env: dict[str, str] | None = None) -> str:
    """One llama-server (``extra`` arguments), one greedy completion of ``TOKENS`` tokens."""
    port = free_port()
    cmd = [str(engine / "llama-server"), "--model", str(model), "--port", str(port), "-t", "1", "-c", "512",
           "--no-warmup", "--no-webui", *extra]
    with running(cmd, log, env) as server, httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False,
                                                         timeout=120) as http:
        def healthy() -> bool:
            assert server.poll() is None, f"llama-server exited with {server.returncode}: {log.read_text()[-2000:]}"
            try:
                return http.get("/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout=120, what="llama-server")
        reply = http.post("/completion", json=PROMPT)
        reply.raise_for_status()
        return str(reply.json()["content"])


def read_stats(path: Path) -> dict[str, tuple[int, int, int]]:
    """The worker's per-command counters of one connection (patch 0005's GGML_RPC_STATS): commands,
    bytes in, bytes out."""
    return {name: (int(n), int(i), int(o)) for name, n, i, o in (line.split() for line in path.read_text().splitlines())}


def test_a_cpu_split_host_keeps_the_head_and_the_worker_sends_no_logits(engine_dir: Path, tmp_path: Path) -> None:
    model = write_dense(tmp_path / "head.gguf", n_layer=4, n_embd=N_EMBD, n_vocab=N_VOCAB, seed=7)
    solo = complete(engine_dir, model, tmp_path / "solo.log", ["--n-gpu-layers", "0"])
    assert solo

    # the worker's copy names only the tensors of its share (a sparse worker's header, engine.tensors):
    # if the host offered it the head, the worker would close the connection and llama-server abort
    table = file_table(model)
    share = Share(model="head", source=str(model), size=table.size, fingerprint=table.fingerprint,
                  tensor_split=(0.5, 0.5), worker=0, host_gpu=False)
    mine = {t.name for t in share_tensors(table, share)}
    assert not mine & {"output.weight", "output_norm.weight", "token_embd.weight"}
    assert {t.name for t in share_tensors(table, Share(**{**share.__dict__, "worker": HOST}))} >= {"output.weight"}
    data = bytearray(model.read_bytes())
    data[:table.data_offset] = masked_header(bytes(data[:table.data_offset]), table, mine)
    worker_copy = tmp_path / "worker.gguf"
    worker_copy.write_bytes(bytes(data))

    rpc_port, stats = free_port(), tmp_path / "stats.txt"
    worker = [str(engine_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(rpc_port), "-t", "1",
              "--gguf", str(worker_copy)]
    with running(worker, tmp_path / "rpc.log", {**os.environ, "GGML_RPC_STATS": str(stats)}):
        desired = DesiredServer(model="head", path=model, workers=("w",), tensor_split=(0.5, 0.5),
                                n_layer=block_count(model))
        gpu_layers, extra = split_args(desired, [f"127.0.0.1:{rpc_port}"], gpu=False)
        wait_for(lambda: listening(rpc_port), timeout=30, what="ggml-rpc-server")  # (no probe: one connection)
        split = complete(engine_dir, model, tmp_path / "split.log", ["--n-gpu-layers", str(gpu_layers), *extra],
                         {**os.environ, "GGML_RPC_HASH_THRESHOLD": "1", "GGML_RPC_LOAD_BY_NAME": "1"})
        # the counters are final once the server is done with the connection
        wait_for(lambda: "Client connection closed" in (tmp_path / "rpc.log").read_text(), timeout=30,
                 what="the worker to see the host go")
        counters = read_stats(stats)
    assert split == solo
    back = sum(out for _, _, out in counters.values())
    # 32 decoded tokens and the prompt brought back less than one token's logits (128,000 bytes)
    assert back < N_VOCAB * 4, counters
    assert counters["get_tensor"][0] >= TOKENS  # the worker did compute every token's layers


def listening(port: int) -> bool:
    """A socket listens on 127.0.0.1:``port`` (read from /proc: no connection made)."""
    wanted = f"0100007F:{port:04X}"
    return any(line.split()[1] == wanted and line.split()[3] == "0A"
               for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
