"""The fault suite: one mesh (two replicas of a model, a client node in front) under a steady load of
greedy streams, and each fault of ``faults.FAULTS`` in turn (kill -9 of a serving node, of its
llama-server, of its agent alone; SIGTERM during streams; a partition that heals; a node stopped
longer than the failure detector waits; 20% packet loss).

What a user of the mesh must never see, whatever the fault: a stream cut without an error, an answer
whose text differs from the uninterrupted one, a mesh that stops serving, servers duplicated after it
recovered, or state forgotten. The figures of each run (failed, resumed, time to serve again) are
printed as a table; ``bench/faults.py`` runs the same with more load and saves it. A split worker's
kill runs on a mesh of its own, where the model is split over the two server nodes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.faults import BATCH_INVARIANT, FAULTS, FaultMesh, FaultRow, reference_text, run_fault, table
from tests.integration.nodes import Mesh
from tests.integration.test_split import split_model  # noqa: F401  (a fixture)

pytestmark = pytest.mark.engine

WORKERS, MAX_TOKENS = 4, 96
ROWS: list[FaultRow] = []


def test_a_split_worker_killed_mid_stream_is_an_error_then_the_split_serves_again(
        mesh: Mesh, split_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(*BATCH_INVARIANT)
    size = split_model.stat().st_size
    fm = FaultMesh(mesh, split_model, replicas=1, max_vram=f"{int(size * 0.8)}B")  # neither holds it alone
    reference = reference_text(fm, max_tokens=MAX_TOKENS)
    row = run_fault(fm, "kill -9 split worker", workers=2, max_tokens=MAX_TOKENS, reference=reference)
    ROWS.append(row)
    print(table([row]))
    assert row.cut == 0, f"streams cut without an error: {row.notes}"
    assert row.wrong == 0 and row.serve_again_s is not None
    assert row.duplicates == 0 and row.lost == []


@pytest.fixture(scope="module")
def fault_mesh(tmp_path_factory: pytest.TempPathFactory, engine_dir: Path, tiny_dense: Path) -> Iterator[FaultMesh]:
    if shutil.which("iptables") is None or os.geteuid() != 0:
        pytest.fail("the fault suite needs root and iptables (apt-get install iptables; .ci/run does it)")
    mesh = Mesh(tmp_path_factory.mktemp("faults"), engine_dir, allow_models=(tiny_dense.parent,))
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv(*BATCH_INVARIANT)
            yield FaultMesh(mesh, tiny_dense)
    finally:
        mesh.close()
        if ROWS:
            print("\n" + table(ROWS))


@pytest.fixture(scope="module")
def reference(fault_mesh: FaultMesh) -> str:
    return reference_text(fault_mesh, max_tokens=MAX_TOKENS)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_loses_nothing(fault_mesh: FaultMesh, reference: str, fault: str) -> None:
    fault_mesh.settle()
    row = run_fault(fault_mesh, fault, workers=WORKERS, max_tokens=MAX_TOKENS, reference=reference)
    ROWS.append(row)
    print(table([row]))
    assert row.cut == 0, f"streams cut without an error: {row.notes}"
    assert row.wrong == 0, "an answer's text differs from the uninterrupted one"
    assert row.serve_again_s is not None, "nothing was served after the fault"
    assert row.duplicates == 0
    assert row.lost == []

