"""Local health and the handshake budget: a late loop widens timeouts, boundedly; dials take turns.

What a user would notice: a node on a punctual loop detects a death exactly as before; a node whose
own loop ran late does not blame its peers for that, yet still declares a real death within
``max_multiplier`` times the normal timeout; a burst of dials runs a few at a time, confirmations
of suspected deaths first.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import pytest

from meshllm.gossip.membership import CONFIRM_CAP, confirm_limit
from meshllm.transport.budget import DialPriority, HandshakeBudget
from meshllm.transport.health import HealthSettings, LoopHealth


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def health_at(*samples: tuple[float, float], now: float, settings: HealthSettings | None = None) -> LoopHealth:
    clock = FakeClock()
    health = LoopHealth(settings, clock=clock)
    for woke_at, late in samples:
        health.record(woke_at, late)
    clock.now = now
    return health


@pytest.mark.parametrize(("samples", "expected"), [
    ((), 1.0),                                     # never late
    (((999.9, 0.002), (1000.0, 0.03)), 1.0),       # scheduling noise, under the floor
    (((1000.0, 0.3),), 1.5),                       # 0.25 s beyond the floor, lag_scale 0.5
    (((1000.0, 0.55),), 2.0),                      # a full lag_scale beyond the floor: doubled
    (((1000.0, 5.0),), 2.0),                       # a long stall: capped at max_multiplier
])
def test_the_multiplier_grows_with_recent_lateness_and_is_capped(samples: tuple[tuple[float, float], ...],
                                                                 expected: float) -> None:
    assert health_at(*samples, now=1000.0).multiplier == pytest.approx(expected)


def test_lateness_is_forgotten_with_a_half_life() -> None:
    settings = HealthSettings()
    late = 0.55  # doubles the timeouts when fresh
    fresh = health_at((1000.0, late), now=1000.0)
    later = health_at((1000.0, late), now=1000.0 + settings.memory)
    much_later = health_at((1000.0, late), now=1000.0 + 10 * settings.memory)
    assert fresh.multiplier == pytest.approx(2.0)
    assert later.multiplier == pytest.approx(1.0 + (late / 2 - settings.floor) / settings.lag_scale)
    assert much_later.multiplier == 1.0


def test_stalled_since_counts_only_lateness_after_the_moment_asked_about() -> None:
    health = health_at((10.0, 0.5), (20.0, 2.0), (21.0, 0.01), now=25.0)
    assert health.stalled_since(5.0) == pytest.approx(2.5)
    assert health.stalled_since(15.0) == pytest.approx(2.0)
    assert health.stalled_since(19.5) == pytest.approx(0.5)  # a stall that began before: only its tail
    assert health.stalled_since(20.0) == 0.0
    # under the floor: noise, not a stall
    assert health.stalled_since(20.5) == 0.0


def test_samples_older_than_the_history_are_dropped() -> None:
    settings = HealthSettings(history=30.0)
    health = health_at((10.0, 1.0), (100.0, 0.06), now=100.0, settings=settings)
    assert health.stalled_since(0.0) == pytest.approx(0.06)


def test_a_punctual_loop_allows_exactly_the_base_timeout() -> None:
    health = health_at((999.0, 0.01), now=1000.0)
    assert health.allowance(2.5, since=997.5) == 2.5


def test_silence_gathered_while_the_loop_stalled_is_excused_up_to_the_cap() -> None:
    settings = HealthSettings()
    # stalled 1 s, an hour ago as far as the multiplier is concerned: only the stall is excused
    health = health_at((1000.0, 1.0), now=1000.0 + 20 * settings.memory, settings=settings)
    assert health.multiplier == 1.0
    assert health.allowance(2.5, since=998.0) == pytest.approx(3.5)
    assert health.allowance(2.5, since=1000.5) == 2.5  # silence that began after the stall: no excuse
    # a loop that stalled for 10 s of the last 10 s is still bounded
    stalled = health_at(*((999.0 + i, 1.0) for i in range(1, 11)), now=1010.0)
    assert stalled.allowance(2.5, since=1000.0) == 2.5 * settings.max_multiplier


async def test_run_records_a_blocked_loop() -> None:
    health = LoopHealth(HealthSettings(period=0.02))
    async with anyio.create_task_group() as tg:
        await tg.start(health.run)
        await anyio.sleep(0.05)
        time.sleep(0.3)  # block the loop, as a long handshake burst does
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert health.worst >= 0.25
    assert health.multiplier > 1.0


@pytest.mark.parametrize(("multiplier", "handshake_s", "expected"), [
    (1.0, 0.0, 0.75),    # unloaded, no handshake yet: the plain limit
    (1.0, 0.02, 0.75),   # unloaded, loopback handshakes take milliseconds
    (1.6, 0.02, 1.2),    # a late loop widens it
    (1.0, 0.9, 1.8),     # slow handshakes lately: room for two
    (2.0, 5.0, 0.75 * CONFIRM_CAP),  # both, capped
])
def test_the_confirmation_dial_limit(multiplier: float, handshake_s: float, expected: float) -> None:
    assert confirm_limit(0.75, multiplier=multiplier, handshake_s=handshake_s) == pytest.approx(expected)


# -- the handshake budget -------------------------------------------------------------------------
U, N, B = DialPriority.URGENT, DialPriority.NORMAL, DialPriority.BACKGROUND


async def until(condition: Callable[[], bool], *, timeout: float = 2.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.001)


async def run_dials(budget: HandshakeBudget,
                    dials: list[tuple[str, DialPriority]]) -> tuple[list[str], list[str], int]:
    """Start ``dials`` (name, priority) one after another, each holding its slot until all started;
    returns which got a slot at once, the order all got one, and the most in flight at once."""
    order: list[str] = []
    release = anyio.Event()
    most = 0

    async def dial(name: str, priority: DialPriority) -> None:
        nonlocal most
        async with budget.slot(priority=priority):
            order.append(name)
            most = max(most, budget.in_flight)
            await release.wait()

    async with anyio.create_task_group() as tg:
        for started, (name, priority) in enumerate(dials, 1):
            tg.start_soon(dial, name, priority)
            await until(lambda: len(order) + budget.waiting == started)  # it has a slot or waits in line
        at_once = order[:]
        release.set()
    assert budget.in_flight == 0 and budget.waiting == 0
    return at_once, order, most


async def test_dials_beyond_the_budget_wait_in_order() -> None:
    budget = HandshakeBudget(2)
    at_once, order, most = await run_dials(budget, [(n, N) for n in "abcd"])
    assert at_once == ["a", "b"] and order == ["a", "b", "c", "d"] and most == 2
    assert budget.stats.queued == 2 and budget.stats.granted == 4


async def test_a_confirmation_takes_the_reserve_and_then_goes_first_in_line() -> None:
    budget = HandshakeBudget(2, reserve=1)
    dials = [("a", N), ("b", N), ("c", N), ("confirm", U), ("confirm2", U), ("d", N)]
    at_once, order, most = await run_dials(budget, dials)
    assert at_once == ["a", "b", "confirm"]  # the reserve: never behind ordinary dials
    assert order == ["a", "b", "confirm", "confirm2", "c", "d"]  # then the front of the line
    assert most == 3


async def test_without_a_reserve_a_confirmation_still_jumps_the_line() -> None:
    at_once, order, most = await run_dials(HandshakeBudget(1, reserve=0), [("a", N), ("b", N), ("confirm", U)])
    assert at_once == ["a"] and order == ["a", "confirm", "b"] and most == 1


async def test_redials_of_dead_nodes_take_at_most_half_the_budget_and_go_last() -> None:
    budget = HandshakeBudget(4, reserve=0)
    dials = [("dead1", B), ("dead2", B), ("dead3", B), ("link1", N), ("link2", N), ("link3", N)]
    at_once, order, most = await run_dials(budget, dials)
    assert at_once == ["dead1", "dead2", "link1", "link2"]  # dead3 waits: half the budget is theirs at most
    assert order == ["dead1", "dead2", "link1", "link2", "link3", "dead3"]


async def test_a_cancelled_waiter_gives_up_its_place_and_leaks_no_slot() -> None:
    budget = HandshakeBudget(1)
    got: list[str] = []
    async with anyio.create_task_group() as tg:
        hold = anyio.Event()

        async def holder() -> None:
            async with budget.slot():
                await hold.wait()

        async def waiter(name: str) -> None:
            async with budget.slot():
                got.append(name)

        tg.start_soon(holder)
        await until(lambda: budget.in_flight == 1)
        with anyio.move_on_after(0.05):
            await waiter("gave up")  # waits in line, then its timeout fires
        assert budget.waiting == 0
        tg.start_soon(waiter, "patient")
        await until(lambda: budget.waiting == 1)
        hold.set()
    assert got == ["patient"]
    assert budget.in_flight == 0 and budget.waiting == 0


def test_a_budget_needs_room() -> None:
    with pytest.raises(ValueError):
        HandshakeBudget(0)
