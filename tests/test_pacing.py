"""Pacer tests on a virtual clock: seconds of pacing run in milliseconds, at exact times."""

from __future__ import annotations

import asyncio
import bisect
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from blastd.pacing import MAX_LAG_S, Pacer
from tests.harness import max_in_any_window

T = TypeVar("T")
CONSUMERS = 50


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock stands still while callbacks run and, when every task is
    blocked, jumps straight to the next timer."""

    def __init__(self) -> None:
        self.virtual_now = 0.0
        self.clock_jumps = 0  # how often every task was asleep and a timer woke one
        super().__init__(_ClockJumpingSelector(self))

    def time(self) -> float:
        return self.virtual_now

    def stall(self, seconds: float) -> None:
        """Let time pass without running anything, as a blocked loop does."""
        self.virtual_now += seconds


class _ClockJumpingSelector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise AssertionError("every task is blocked and no timer is set")
        self._loop.virtual_now += timeout
        self._loop.clock_jumps += 1
        return ready


def run_on_virtual_clock(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        return runner.run(main)


def virtual_loop() -> VirtualClockLoop:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualClockLoop)
    return loop


async def run_consumers(pacer: Pacer, until_s: float, releases: list[float]) -> None:
    """Loop CONSUMERS tasks on acquire() until loop time until_s, stamping each release."""
    loop = asyncio.get_running_loop()

    async def consume() -> None:
        while True:
            await pacer.acquire()
            releases.append(loop.time())

    async with asyncio.TaskGroup() as consumers:
        tasks = [consumers.create_task(consume()) for _ in range(CONSUMERS)]
        await asyncio.sleep(until_s - loop.time())
        for task in tasks:
            task.cancel()


async def call_at(loop_time: float, action: Callable[[], object]) -> None:
    """Run action at loop time loop_time."""
    await asyncio.sleep(loop_time - asyncio.get_running_loop().time())
    action()


def count_between(times: list[float], start_s: float, end_s: float) -> int:
    return bisect.bisect_left(times, end_s) - bisect.bisect_left(times, start_s)


@pytest.mark.parametrize("rate_per_s", [80, 1000])
def test_no_second_holds_more_than_the_rate_and_the_rate_is_met(rate_per_s: int) -> None:
    async def main() -> list[float]:
        releases: list[float] = []
        await run_consumers(Pacer(rate_per_s), 10.0, releases)
        return releases

    releases = run_on_virtual_clock(main())

    assert max_in_any_window(releases, 1.0) <= rate_per_s
    assert count_between(releases, 0.0, 10.0) >= 0.98 * rate_per_s * 10


@pytest.mark.parametrize("rate_per_s", [80, 1000])
def test_catching_up_after_a_stall_keeps_every_window_within_the_rate(rate_per_s: int) -> None:
    """A blocked loop leaves slots overdue; the catch-up burst is bounded by MAX_LAG_S."""

    async def main() -> list[float]:
        releases: list[float] = []
        async with asyncio.TaskGroup() as group:
            group.create_task(call_at(3.0, lambda: virtual_loop().stall(0.5)))
            await run_consumers(Pacer(rate_per_s), 6.0, releases)
        return releases

    releases = run_on_virtual_clock(main())

    assert max_in_any_window(releases, 1.0) <= rate_per_s
    assert count_between(releases, 3.0, 3.5) == 0
    assert releases.count(3.5) <= rate_per_s * MAX_LAG_S + 1


def test_hold_until_releases_nothing_before_the_deadline() -> None:
    async def main() -> tuple[list[float], int]:
        pacer = Pacer(80)
        releases: list[float] = []
        held_after: list[int] = []

        def hold() -> None:
            held_after.append(len(releases))
            pacer.hold_until(3.5)

        async with asyncio.TaskGroup() as group:
            group.create_task(call_at(2.0, hold))
            await run_consumers(pacer, 6.0, releases)
        return releases, held_after[0]

    releases, held_after = run_on_virtual_clock(main())

    assert min(releases[held_after:]) >= 3.5
    assert count_between(releases, 3.5, 3.6) <= 80 * 0.1 + 1  # resumes at the rate, no burst
    assert count_between(releases, 4.0, 6.0) >= 0.98 * 80 * 2


def test_hold_until_applies_to_an_unlimited_pacer() -> None:
    async def main() -> list[tuple[int, float]]:
        loop = asyncio.get_running_loop()
        pacer = Pacer(0)
        pacer.hold_until(2.0)
        releases: list[tuple[int, float]] = []

        async def send(index: int) -> None:
            await pacer.acquire()
            releases.append((index, loop.time()))

        async with asyncio.TaskGroup() as group:
            for index in range(20):
                group.create_task(send(index))
        return releases

    releases = run_on_virtual_clock(main())

    assert releases == [(index, 2.0) for index in range(20)]


@pytest.mark.parametrize("rate_per_s", [80, 1000])
def test_an_idle_gap_saves_up_no_slots(rate_per_s: int) -> None:
    async def main() -> list[float]:
        pacer = Pacer(rate_per_s)
        releases: list[float] = []
        await run_consumers(pacer, 2.0, releases)
        await asyncio.sleep(5.0)
        await run_consumers(pacer, 9.0, releases)
        return releases

    releases = run_on_virtual_clock(main())

    assert max_in_any_window(releases, 1.0) <= rate_per_s
    assert count_between(releases, 7.0, 7.1) <= rate_per_s * 0.1 + 1


def test_decrease_slows_the_pacing_and_increase_restores_it() -> None:
    async def main() -> list[float]:
        pacer = Pacer(80)
        releases: list[float] = []
        async with asyncio.TaskGroup() as group:
            group.create_task(call_at(3.0, pacer.decrease))
            group.create_task(call_at(6.0, lambda: pacer.increase(40)))
            await run_consumers(pacer, 9.0, releases)
        return releases

    releases = run_on_virtual_clock(main())

    slowed = [release for release in releases if 3.0 <= release < 6.0]
    assert max_in_any_window(slowed, 1.0) <= 40
    assert count_between(releases, 4.0, 6.0) >= 0.98 * 40 * 2
    assert count_between(releases, 6.0, 6.1) <= 80 * 0.1 + 1  # speeds up without a burst
    assert count_between(releases, 7.0, 9.0) >= 0.98 * 80 * 2
    assert max_in_any_window(releases, 1.0) <= 80


async def test_decrease_and_increase_stay_between_the_floor_and_the_ceiling() -> None:
    pacer = Pacer(80, min_rate_per_s=5)

    for _ in range(10):
        pacer.decrease(0.5)
    assert pacer.rate_per_s == 5
    pacer.increase(30)
    assert pacer.rate_per_s == 35
    pacer.increase(1000)
    assert pacer.rate_per_s == 80


async def test_an_unlimited_pacer_stays_unlimited() -> None:
    pacer = Pacer(0)

    pacer.decrease(0.5)
    pacer.increase(10)

    assert pacer.rate_per_s == 0


async def test_decrease_rejects_a_factor_that_does_not_decrease() -> None:
    pacer = Pacer(80)

    with pytest.raises(ValueError, match="factor"):
        pacer.decrease(1.5)


def test_callers_are_released_in_call_order() -> None:
    async def main() -> list[int]:
        pacer = Pacer(80)
        order: list[int] = []

        async def send(index: int) -> None:
            await asyncio.sleep(index * 0.005)  # arrivals outpace the rate: a queue builds
            await pacer.acquire()
            order.append(index)

        async with asyncio.TaskGroup() as group:
            for index in range(200):
                group.create_task(send(index))
        return order

    assert run_on_virtual_clock(main()) == list(range(200))


@pytest.mark.parametrize(
    ("victim", "cancelled_when"),
    [
        ("a", "sleeping at the head"),
        ("b", "queued behind the head"),
        ("b", "woken but not yet run"),
    ],
)
def test_a_cancelled_waiter_does_not_use_a_slot(victim: str, cancelled_when: str) -> None:
    """a, b and c queue for the slots at 0.1, 0.2 and 0.3 s; one is cancelled while waiting.
    The other two must take 0.1 and 0.2, and the next caller 0.3: no slot lost or shared."""

    async def main() -> tuple[dict[str, float], float]:
        loop = asyncio.get_running_loop()
        pacer = Pacer(10)
        released: dict[str, float] = {}

        async def send(name: str) -> None:
            await pacer.acquire()
            released[name] = loop.time()
            if name == "a" and cancelled_when == "woken but not yet run":
                tasks[victim].cancel()

        await pacer.acquire()
        tasks = {name: asyncio.create_task(send(name)) for name in "abc"}
        if cancelled_when != "woken but not yet run":
            await call_at(0.05, tasks[victim].cancel)
        await asyncio.wait(tasks.values())
        assert tasks[victim].cancelled()
        await pacer.acquire()
        return released, loop.time()

    released, next_release_at = run_on_virtual_clock(main())

    assert victim not in released
    assert sorted(released.values()) == pytest.approx([0.1, 0.2])
    assert next_release_at == pytest.approx(0.3)


def test_an_unlimited_pacer_releases_at_once() -> None:
    async def main() -> float:
        pacer = Pacer(0)
        for _ in range(10_000):
            await pacer.acquire()
        return asyncio.get_running_loop().time()

    assert run_on_virtual_clock(main()) == 0.0


def test_a_pacer_is_built_inside_the_running_loop() -> None:
    with pytest.raises(RuntimeError, match="no running event loop"):
        Pacer(80)


def test_throttle_holds_and_cuts_the_rate_once_per_episode() -> None:
    """Requests in flight all answer 429: only the first throttle of an episode cuts the rate;
    one after the hold has ended begins a new episode."""

    async def main() -> list[tuple[bool, float]]:
        pacer = Pacer(80)
        seen = [(await pacer.throttle(1.0), pacer.rate_per_s)]
        seen.append((await pacer.throttle(1.0), pacer.rate_per_s))
        await pacer.acquire()  # waits out the hold
        seen.append((await pacer.throttle(1.0), pacer.rate_per_s))
        return seen

    assert run_on_virtual_clock(main()) == [(True, 40), (False, 40), (True, 20)]


def test_throttle_holds_the_releases_for_hold_s() -> None:
    async def main() -> float:
        pacer = Pacer(80)
        await call_at(2.0, lambda: None)
        await pacer.throttle(1.5)
        await pacer.acquire()
        return asyncio.get_running_loop().time()

    assert run_on_virtual_clock(main()) == 3.5
