"""The llama-server arguments of a split host: which layers stay, which go to the workers."""

from __future__ import annotations

from pathlib import Path

from meshllm.reconcile.served import DesiredServer, split_args, workers_meet
from meshllm.reconcile.split import HEAD_PATTERN
from meshllm.state.schema import NodeId, NodeStatus


def desired(shares: tuple[float, ...], n_layer: int = 8) -> DesiredServer:
    return DesiredServer(model="m", path=Path("/m.gguf"), workers=tuple(f"w{i}" for i in range(len(shares) - 1)),
                         tensor_split=shares, n_layer=n_layer)


def test_a_gpu_host_offloads_everything_and_lists_itself_last() -> None:
    ngl, extra = split_args(desired((0.25, 0.25, 0.5)), ["127.0.0.1:5001", "127.0.0.1:5002"], gpu=True)
    assert ngl == 999
    assert extra == ("--rpc", "127.0.0.1:5001,127.0.0.1:5002", "--tensor-split", "0.25,0.25,0.5")  # and the head


def test_a_cpu_host_keeps_its_share_of_the_first_layers() -> None:
    # 8 layers, host share 3/4: the host keeps 6; -ngl 3 sends the output head and the last 2 layers
    ngl, extra = split_args(desired((0.25, 0.75)), ["127.0.0.1:5001"], gpu=False)
    assert ngl == 3
    assert extra == ("--rpc", "127.0.0.1:5001", "--tensor-split", "0.25",
                     "--override-tensor", f"{HEAD_PATTERN}=CPU")  # the output head stays on the host


def test_a_cpu_host_always_leaves_the_workers_a_layer() -> None:
    ngl, _ = split_args(desired((0.01, 0.99)), ["127.0.0.1:5001"], gpu=False)
    assert ngl == 2  # one layer and the head


def test_a_cpu_host_leaves_the_head_to_a_gpu_worker() -> None:
    # 8 layers, host share 1/2: the second worker holds layer 7 and the head; a GPU reads it faster
    shares = (0.25, 0.25, 0.5)
    base = desired(shares)
    for gpus, head in [((False, False), True), ((True, False), True), ((False, True), False), ((True, True), False)]:
        _, extra = split_args(DesiredServer(**{**base.__dict__, "workers_gpu": gpus}), ["w0:1", "w1:1"], gpu=False)
        assert ("--override-tensor" in extra) is head, gpus
    _, extra = split_args(DesiredServer(**{**base.__dict__, "workers_gpu": (True, True)}), ["w0:1", "w1:1"], gpu=True)
    assert "--override-tensor" not in extra  # a GPU host holds the head anyway


def test_a_host_pinned_to_a_device_still_offloads_to_its_workers() -> None:
    # llama-server offloads only to the devices --device names: without the workers' (registered by
    # --rpc, so named after it) a split host would load the whole model on its own GPU
    ngl, extra = split_args(desired((0.25, 0.25, 0.5)), ["127.0.0.1:5001", "127.0.0.1:5002"], gpu=True,
                            device="CUDA1")
    assert extra[:2] == ("--rpc", "127.0.0.1:5001,127.0.0.1:5002")
    assert extra[extra.index("--device") + 1] == "RPC0,RPC1,CUDA1"
    assert extra.index("--device") > extra.index("--rpc")
    _, unpinned = split_args(desired((0.25, 0.25, 0.5)), ["127.0.0.1:5001", "127.0.0.1:5002"], gpu=True)
    assert "--device" not in unpinned


def test_workers_push_to_each_other_only_once_they_have_met_in_the_mesh() -> None:
    a, b, c = NodeId("a"), NodeId("b"), NodeId("c")
    nodes = {a: NodeStatus(id=a, rtt_ms={b: 0.4}), b: NodeStatus(id=b), c: NodeStatus(id=c, rtt_ms={a: 0.3})}
    assert workers_meet(nodes, [a, b])  # a measured b: either side's measurement will do
    assert workers_meet(nodes, [b, a])
    assert not workers_meet(nodes, [a, b, c])  # b and c never measured each other
    nodes[b] = NodeStatus(id=b, rtt_ms={c: 1.0})
    assert workers_meet(nodes, [a, b, c])
    assert workers_meet(nodes, [a])  # one worker pushes to no one
