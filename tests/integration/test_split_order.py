"""``--split`` whatever the order nodes start in (issue 19, item 4).

What a user notices: ``meshllm --model M --split`` on a node that starts alone serves M solo at once,
its condition saying it waits for a split; when a second node joins, the model moves to a split with
it (the solo server serving until the split's worker is ready) and answers with the same greedy text.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.nodes import Mesh, wait_for
from tests.integration.test_mesh import greedy
from tests.integration.test_split import MODEL, cap, condition, node_id, solo, split_model, wait_for_all

__all__ = ["solo", "split_model"]  # fixtures used here

pytestmark = pytest.mark.engine


def test_split_asked_of_a_node_alone_serves_solo_then_splits_when_a_node_joins(mesh: Mesh, split_model: Path,
                                                                               solo: str) -> None:
    a = mesh.start("a", "127.0.0.2", "--split", "--max-vram", cap(split_model, 3.0), models=(str(split_model),))
    wait_for(lambda: condition(a).get("phase") == "Ready", timeout=90, what="a to serve the model solo")
    alone = condition(a)
    assert alone["workers"] == [] and "solo until a split can be planned" in alone["message"], alone
    expected = greedy(solo, MODEL)
    assert greedy(a.api, MODEL) == expected

    b = mesh.start("b", "127.0.0.3", "--standby", "--max-vram", cap(split_model, 0.8), "--join", a.token())
    wait_for_all((a, b))
    def split_ready() -> bool:
        now = condition(a)
        return now.get("phase") == "Ready" and now.get("workers") == [node_id(b)]

    wait_for(split_ready, timeout=120, what="the model to move to a split with the node that joined")
    assert condition(a)["nodes"] == [node_id(a)]  # the bigger node hosts: the one that served it solo
    assert greedy(a.api, MODEL) == greedy(b.api, MODEL) == expected
