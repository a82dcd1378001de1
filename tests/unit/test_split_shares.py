"""Split shares: the tensors a participant holds, fetched into a sparse copy and checked tensor by tensor."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any
from pathlib import Path

import gguf
import pytest

from meshllm.engine.models import file_fingerprint
from meshllm.engine.sparse import RangeSourceError, SparseCopy, allocated_bytes, read_table
from meshllm.engine.tensors import (
    CPU, check_hashes, file_table, hash_tensors, layer_devices, masked_header, parse_table,
)
from meshllm.engine.tinygguf import write_dense
from meshllm.errors import ModelError
from meshllm.reconcile.shares import HOST, Share, ShareState, share_tensors
from meshllm.reconcile.workers import RPC_RECORD_PREFIX, WorkerController
from meshllm.state.schema import ModelSpec, NodeStatus, ServerPhase
from tests.unit.controllers import ME, World
from meshllm.reconcile.split import HEAD_PATTERN, split_layout
from meshllm.testing.hubserver import HubServer
from meshllm.engine.download import HubFile
from meshllm.engine.ranges import HubRanges


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dense(tmp_path_factory.mktemp("shares") / "m.gguf", n_layer=8, n_embd=256, n_ff=512, n_vocab=512,
                       seed=5)


class BytesSource:
    """A ``RangeSource`` over a file's bytes, ``flip``: one byte served flipped; ``broken``: refuses."""

    def __init__(self, data: bytes, *, flip: int = -1, broken: bool = False, name: str = "memory") -> None:
        self.data, self.flip, self.broken, self.name = data, flip, broken, name
        self.sent = 0

    async def stream(self, offset: int, length: int) -> AsyncIterator[bytes]:
        if self.broken:
            raise RangeSourceError("unreachable")
        for at in range(offset, offset + length, 100_000):
            chunk = bytearray(self.data[at:min(offset + length, at + 100_000)])
            if at <= self.flip < at + len(chunk):
                chunk[self.flip - at] ^= 0xFF
            self.sent += len(chunk)
            yield bytes(chunk)


def share(model: Path, worker: int, *, gpu: bool = False, split: tuple[float, ...] = (0.3, 0.3, 0.4)) -> Share:
    return Share(model="m", source=str(model), size=model.stat().st_size, fingerprint=file_fingerprint(model),
                 tensor_split=split, worker=worker, host_gpu=gpu)


def test_the_table_is_read_from_the_header_alone_and_agrees_with_gguf(model: Path) -> None:
    table = file_table(model)
    reader = gguf.GGUFReader(model)
    assert {t.name: (t.offset, t.nbytes) for t in table.tensors} == {
        t.name: (int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
    assert table.n_layer == 8 and table.fingerprint == file_fingerprint(model)


def test_layers_go_to_devices_as_llama_cpp_assigns_them() -> None:
    # CPU host, 8 layers, shares (0.25, 0.25 | host 0.5): -ngl 5 -ts 0.25,0.25: the host keeps layers 0-3,
    # the five offloaded (4-7 and the head) split at 0.5: the first worker 4-6, the second 7 and the head
    ngl, splits = split_layout(8, (0.25, 0.25, 0.5), gpu=False)
    assert layer_devices(8, ngl, splits) == [CPU] * 4 + [0, 0, 0, 1, 1]
    # GPU host: every layer offloaded, the host's GPU last, and it has the head
    ngl, splits = split_layout(8, (0.25, 0.25, 0.5), gpu=True)
    assert layer_devices(8, ngl, splits) == [0, 0, 0, 1, 1, 2, 2, 2, 2]


@pytest.mark.parametrize("gpu", [False, True])
def test_the_shares_cover_every_tensor_and_each_layer_once(model: Path, gpu: bool) -> None:
    table = file_table(model)
    held = [share_tensors(table, share(model, w, gpu=gpu)) for w in (HOST, 0, 1)]
    assert {t.name for part in held for t in part} == {t.name for t in table.tensors}
    blocks = [t.name for part in held for t in part if t.block is not None]
    assert len(blocks) == len(set(blocks))
    assert any(t.name == "token_embd.weight" for t in held[0])  # the host reads the input itself
    assert not any(t.name == "token_embd.weight" for part in held[1:] for t in part)


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_the_output_head_stays_with_the_host(model: Path, gpu: bool, tied: bool) -> None:
    # a CPU host keeps the head (--override-tensor, split.head_args), a GPU host holds it anyway (it is
    # the last device): no worker is offered the head, so none sends back a token's logits
    table = file_table(model)
    if tied:  # the head reads the token embeddings
        table = replace(table, tensors=tuple(t for t in table.tensors if t.name != "output.weight"))
    held = [{t.name for t in share_tensors(table, share(model, w, gpu=gpu))} for w in (HOST, 0, 1)]
    head = {"output_norm.weight", "token_embd.weight"} | (set() if tied else {"output.weight"})
    assert head <= held[0]
    assert not head & (held[1] | held[2])
    assert any(t.startswith("blk.7.") for t in held[2 if not gpu else 0])  # the last layer: a CPU host's last worker


def test_a_gpu_worker_keeps_the_head_of_a_cpu_host(model: Path) -> None:
    table = file_table(model)
    gpu_last = [{t.name for t in share_tensors(table, replace(share(model, w), workers_gpu=(False, True)))}
                for w in (HOST, 0, 1)]
    assert "output.weight" in gpu_last[2] and "output.weight" not in gpu_last[0] | gpu_last[1]
    assert "token_embd.weight" in gpu_last[0]  # the input stays with the host


def test_the_head_pattern_names_the_head_tensors_and_no_layer_tensor(model: Path) -> None:
    names = {t.name for t in file_table(model).tensors}
    assert {n for n in names if re.search(HEAD_PATTERN, n)} == {"output.weight", "output_norm.weight",
                                                                 "token_embd.weight"}
    assert "blk.0.attn_output.weight" in names


async def test_a_sparse_copy_holds_its_share_and_takes_little_disk(model: Path, tmp_path: Path) -> None:
    data = model.read_bytes()
    table = file_table(model)
    mine = share_tensors(table, share(model, 0))
    source = BytesSource(data)
    read, header = await read_table([source], len(data))
    assert read == table
    copy = SparseCopy(tmp_path / "m.gguf", table)
    await copy.fill(header, mine, [BytesSource(b"", broken=True, name="dead"), source],
                    hashes=hash_tensors(model, table.tensors))
    copied = (tmp_path / "m.gguf").read_bytes()
    assert len(copied) == len(data) and copied[:table.data_offset] == data[:table.data_offset]
    for t in mine:
        assert copied[t.offset:t.end] == data[t.offset:t.end]
    share_bytes = sum(t.nbytes for t in mine)
    assert share_bytes < len(data) / 2
    assert allocated_bytes(tmp_path / "m.gguf") <= 1.05 * share_bytes + table.data_offset + 64 * 1024
    assert copy.held() == {t.name for t in mine}
    before = source.sent
    await SparseCopy(tmp_path / "m.gguf", table).fill(header, mine, [source], hashes={})
    assert source.sent == before  # resumed: nothing fetched again


async def test_a_piece_differing_in_the_middle_of_one_tensor_is_refused_by_name(model: Path, tmp_path: Path) -> None:
    data = model.read_bytes()
    table = file_table(model)
    mine = share_tensors(table, share(model, 1))
    victim = max(mine, key=lambda t: t.nbytes)
    copy = SparseCopy(tmp_path / "m.gguf", table)
    with pytest.raises(ModelError, match=f"tensor {victim.name} from memory differs from the mesh's copy"):
        await copy.fill(data[:table.data_offset], mine, [BytesSource(data, flip=victim.offset + victim.nbytes // 2)],
                        hashes=hash_tensors(model, table.tensors))
    assert victim.name not in copy.held()


def test_a_whole_copy_differing_in_the_middle_of_one_tensor_fails_the_check(model: Path, tmp_path: Path) -> None:
    table = file_table(model)
    victim = table.tensors[len(table.tensors) // 2]
    bad = bytearray(model.read_bytes())
    bad[victim.offset + victim.nbytes // 2] ^= 0x01
    (tmp_path / "bad.gguf").write_bytes(bad)
    assert file_fingerprint(tmp_path / "bad.gguf") == file_fingerprint(model)  # the header is the same
    with pytest.raises(ModelError, match=f"tensor {victim.name} differs"):
        check_hashes(hash_tensors(tmp_path / "bad.gguf", table.tensors), hash_tensors(model, table.tensors),
                     where="bad.gguf")


async def test_hub_ranges_pin_the_file_and_resume_a_cut_transfer(model: Path, tmp_path: Path) -> None:
    with HubServer() as hub:
        entry = hub.add("org/r", "m.gguf", model, drop_after=300_000)
        source = HubRanges(HubFile("org/r", "m.gguf", endpoint=hub.url), backoff=0.01)
        try:
            got = b"".join([c async for c in source.stream(1000, 1_000_000)])
            assert got == model.read_bytes()[1000:1_001_000]
            assert len(entry.ranges) == 2  # cut after 300 kB, asked again for the rest
            entry.sha256 = "0" * 64  # another version of the file now
            with pytest.raises(RangeSourceError, match="changed on the hub"):
                b"".join([c async for c in source.stream(0, 10)])
        finally:
            await source.aclose()


def test_a_workers_header_names_only_the_tensors_it_holds_at_the_same_offsets(model: Path) -> None:
    table = file_table(model)
    header = model.read_bytes()[:table.data_offset]
    mine = {t.name for t in share_tensors(table, share(model, 0))}
    masked = parse_table(masked_header(header, table, mine), table.size)
    assert masked.data_offset == table.data_offset
    assert [(t.offset, t.nbytes) for t in masked.tensors] == [(t.offset, t.nbytes) for t in table.tensors]
    assert {t.name for t in masked.tensors} & {t.name for t in table.tensors} == mine
    assert all(t.name.startswith("~") for t in masked.tensors if t.name not in mine)


# -- the worker controller (fake supervisor, fake clock) -------------------------------------------
class FakeShares:
    """Fetches that finish when the test says so."""

    def __init__(self, path: Path) -> None:
        self.path, self.done, self.asked = path, False, list[Share]()

    def want(self, share: Share) -> ShareState:
        self.asked.append(share)
        if self.done:
            return ShareState(done=100, total=100, path=self.path)
        return ShareState(done=40, total=100)


def worker_world(tmp_path: Path, model: Path) -> World:
    world = World(tmp_path)
    world.state.put_node(NodeStatus(id="n2", capacity_bytes=10**9, incarnation=1.0))
    table = file_table(model)
    world.state.put_model(ModelSpec(name="m", source=str(model), node="n2", size_bytes=table.size,
                                    fingerprint=table.fingerprint, tensor_hashes=hash_tensors(model, table.tensors),
                                    copy_on="n2"))
    world.lease("m", node="n2", workers=[ME], shares=[0.4, 0.6])
    return world


async def test_a_worker_whose_copy_differs_in_one_tensor_it_holds_refuses_it(model: Path, tmp_path: Path) -> None:
    world = worker_world(tmp_path, model)
    table = file_table(model)
    victim = next(t for t in table.tensors if t.name == "blk.7.ffn_down.weight")  # the worker's (the last layers)
    bad = bytearray(model.read_bytes())
    bad[victim.offset + victim.nbytes // 2] ^= 0x01
    (tmp_path / "bad.gguf").write_bytes(bad)
    world.state.put_model(world.state.models()["m"].model_copy(update={"source": str(tmp_path / "bad.gguf")}))
    async with world.running(world.workers()):
        status = world.worker()
        assert status is not None and status.phase is ServerPhase.FAILED, status
        assert "tensor blk.7.ffn_down.weight differs" in status.message and not world.pids()


async def test_a_worker_without_the_file_shows_its_fetch_then_serves_the_sparse_copy(model: Path,
                                                                                    tmp_path: Path) -> None:
    world = worker_world(tmp_path, model)
    world.state.put_model(world.state.models()["m"].model_copy(update={"source": str(tmp_path / "absent.gguf")}))
    shares = FakeShares(tmp_path / "sparse.gguf")
    workers = WorkerController(world.state, node_id=ME, supervisor=world.supervisor, engine_dir=Path("/engine"),
                               log_dir=tmp_path / "logs", key="k", threads=1, backoff=world.backoff, shares=shares)
    async with world.running(workers):
        status = world.worker()
        assert status is not None and status.phase is ServerPhase.DOWNLOADING and "(40%)" in status.message
        assert not world.pids() and shares.asked[-1].worker == 0 and shares.asked[-1].copy_on == "n2"
        shares.done = True
        await world.advance(1.01)
        assert list(world.pids()) == [RPC_RECORD_PREFIX + "m"]
        argv = world.process(RPC_RECORD_PREFIX + "m").argv
        assert argv[argv.index("--gguf") + 1] == str(tmp_path / "sparse.gguf")
        status = world.worker()
        assert status is not None and status.phase is ServerPhase.LOADING and not status.message


async def test_a_worker_on_a_sparse_copy_restarts_when_its_share_changes(model: Path, tmp_path: Path) -> None:
    world = worker_world(tmp_path, model)
    world.state.put_model(world.state.models()["m"].model_copy(update={"source": str(tmp_path / "absent.gguf")}))
    shares = FakeShares(tmp_path / "sparse.gguf")
    shares.done = True
    workers = WorkerController(world.state, node_id=ME, supervisor=world.supervisor, engine_dir=Path("/engine"),
                               log_dir=tmp_path / "logs", key="k", threads=1, backoff=world.backoff, shares=shares)
    key = RPC_RECORD_PREFIX + "m"
    async with world.running(workers):
        world.supervisor.ready(key)
        await world.settle()
        first = world.process(key).pid
        world.lease("m", node="n2", workers=[ME], shares=[0.6, 0.4])  # re-planned: a larger share here
        await world.settle()
        await world.advance(1.01)
        assert shares.asked[-1].tensor_split == (0.6, 0.4)
        assert list(world.pids()) == [key] and world.process(key).pid != first  # its rpc-server knew the old share


async def test_a_peer_serves_ranges_of_its_own_copy_only_for_the_mesh_s_fingerprint(model: Path) -> None:
    from meshllm.state.document import MeshState
    from meshllm.tunnels.http import TunnelRequest
    from meshllm.tunnels.models import GGUF_PREFIX, ModelFileServer, local_copies

    state = MeshState()
    state.put_model(ModelSpec(name="m", source=str(model)))
    forwarded: list[str] = []

    async def forward(request: TunnelRequest) -> Any:
        forwarded.append(request.path)
        raise AssertionError("not a model-file request")

    server = ModelFileServer(local_copies(state.models), forward)

    async def get(model_name: str, fingerprint: str, ranged: str) -> tuple[int, bytes]:
        answer = await server(TunnelRequest("GET", GGUF_PREFIX + model_name, f"fingerprint={fingerprint}",
                                            [("range", ranged)], b""))
        return answer.status_code, b"".join([chunk async for chunk in answer])

    fingerprint = file_fingerprint(model)
    assert await get("m", fingerprint, "bytes=100-2099999") == (206, model.read_bytes()[100:2_100_000])
    status, body = await get("m", "1:other", "bytes=0-9")
    assert status == 404 and b"no copy of m" in body
    assert (await get("other", fingerprint, "bytes=0-9"))[0] == 404
    assert (await get("m", fingerprint, f"bytes=0-{model.stat().st_size}"))[0] == 416
    assert not forwarded
