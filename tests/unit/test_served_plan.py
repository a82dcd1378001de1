"""The served-model planner, table-tested: what one model needs given what is wanted and what runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshllm.reconcile.served import (
    ActualServer, DesiredServer, Forget, Phase, Probe, Start, Stop, Wait, backoff, plan,
)

WANT = DesiredServer(model="m", path=Path("/models/m.gguf"))
OTHER = DesiredServer(model="m", path=Path("/models/m.gguf"), ctx_size=4096)


def running(phase: Phase, *, desired: DesiredServer = WANT, started_at: float = 100.0, restarts: int = 0,
            retry_at: float = 0.0) -> ActualServer:
    return ActualServer(model="m", port=41000, pid=123, phase=phase, desired=desired, started_at=started_at,
                        restarts=restarts, retry_at=retry_at)


@pytest.mark.parametrize(("desired", "actual", "now", "expected"), [
    pytest.param(None, None, 100.0, [], id="nothing wanted, nothing running"),
    pytest.param(WANT, None, 100.0, [Start("m")], id="wanted and not running: start"),
    pytest.param(None, running(Phase.READY), 100.0, [Stop("m", "no longer desired"), Forget("m")],
                 id="running but no longer wanted: stop then forget"),
    pytest.param(None, running(Phase.EXITED), 100.0, [Forget("m")], id="dead and unwanted: forget"),
    pytest.param(WANT, running(Phase.READY), 100.0, [], id="ready and unchanged: nothing"),
    pytest.param(WANT, running(Phase.LOADING), 101.0, [Probe("m")], id="loading: probe health"),
    pytest.param(WANT, running(Phase.LOADING, started_at=0.0), 1000.0, [Stop("m", "not ready after 900s")],
                 id="loading too long: stop"),
    pytest.param(OTHER, running(Phase.READY), 100.0, [Stop("m", "spec changed"), Start("m")],
                 id="spec changed: stop before start"),
    pytest.param(WANT, running(Phase.EXITED, restarts=2, retry_at=105.0), 100.0, [Wait("m", 105.0)],
                 id="crashed, backoff pending: wait"),
    pytest.param(WANT, running(Phase.EXITED, restarts=2, retry_at=105.0), 105.0, [Start("m", restarts=3)],
                 id="crashed, backoff over: restart and count it"),
    pytest.param(OTHER, running(Phase.EXITED, restarts=4, retry_at=500.0), 100.0, [Start("m", restarts=0)],
                 id="crashed but spec changed since: start fresh now"),
])
def test_plan(desired: DesiredServer | None, actual: ActualServer | None, now: float, expected: list[object]) -> None:
    assert plan(desired, actual, now) == expected


def test_backoff_grows_and_is_capped() -> None:
    assert 0.4 <= backoff(0) <= 0.6
    assert 3.2 <= backoff(3) <= 4.8
    assert backoff(20) <= 36.0
