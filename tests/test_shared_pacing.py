"""SharedPacer tests against real Redis: several pacers, each on its own connection as if in its
own daemon, reserve release times from the same account.

Reservations run on a virtual Redis clock (`now_us`), so the reserved times are a pure function
of the Redis state and the assertions are exact. Only the last tests run on the real clock, and
they assert an order of events, never a duration.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from blastd import ledger
from blastd.batches import BatchWriter
from blastd.embedded import EmbeddedRedis, free_port
from blastd.pacing import MAX_LAG_S
from blastd.resources import Dependencies
from blastd.shared_pacing import (
    HOLD_FRESH_S,
    IDLE_TTL_MS,
    MAX_WAKE_LATE_S,
    Reservation,
    SharedPacer,
    lease_slots,
    rate_ring_key,
    rate_state_key,
)
from tests.harness import Servers, make_settings, max_in_any_window, wait_until

P = ParamSpec("P")
T = TypeVar("T")

PREFIX = "blastd:"
ACCOUNT = "shared"
T0_US = 1_700_000_000_000_000  # a virtual Redis TIME, in microseconds
US = 1_000_000
DAEMONS = 3
# The sending loop's own work between a release and its next acquire(), per daemon, in µs:
# unequal, so the daemons do not simply take turns.
LOOP_WORK_US = (150, 400, 900)


async def call_directly(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """No outage in these tests: run the command as it is."""
    return await fn(*args, **kwargs)


@pytest.fixture
async def clients(servers: Servers, redis: aioredis.Redis) -> AsyncIterator[list[aioredis.Redis]]:
    """One connection pool per daemon (the `redis` fixture has flushed the database)."""
    opened = [aioredis.Redis.from_url(servers.redis_url) for _ in range(DAEMONS)]
    yield opened
    for client in opened:
        await client.aclose()


def pacers(clients: list[aioredis.Redis], rate_per_s: float, **kwargs: float) -> list[SharedPacer]:
    return [
        SharedPacer(
            client,
            call_directly,
            prefix=PREFIX,
            account=ACCOUNT,
            rate_per_s=rate_per_s,
            **kwargs,
        )
        for client in clients
    ]


async def run_daemons(
    daemons: list[SharedPacer], start_us: int, until_us: int
) -> list[tuple[float, int]]:
    """Each daemon reserves a lease of slots as acquire() does, sleeps to each slot in turn and
    works LOOP_WORK_US after it, in the order of the virtual clock, until until_us. Returns
    (release time in s from T0, daemon) for every release."""
    releases: list[tuple[float, int]] = []
    leases: list[list[int]] = [[] for _ in daemons]
    due = [(start_us, index) for index in range(len(daemons))]
    while (now_us := due[0][0]) < until_us:
        index = due[0][1]
        if not leases[index]:
            count = lease_slots(daemons[index].rate_per_s)
            reservation = await daemons[index].reserve(count, now_us=now_us)
            leases[index] = list(reservation.slots_us)
        released_us = max(leases[index].pop(0), now_us)
        releases.append(((released_us - T0_US) / US, index))
        heapq.heapreplace(due, (released_us + LOOP_WORK_US[index], index))
    return releases


def times(
    releases: list[tuple[float, int]], start_s: float = 0.0, end_s: float = 1e9
) -> list[float]:
    return sorted(t for t, _ in releases if start_s <= t < end_s)


@pytest.mark.parametrize("rate_per_s", [80, 1000])
async def test_daemons_together_keep_every_second_within_the_rate_and_reach_it(
    clients: list[aioredis.Redis], rate_per_s: int
) -> None:
    releases = await run_daemons(pacers(clients, rate_per_s), T0_US, T0_US + 10 * US)

    released = times(releases)
    assert max_in_any_window(released, 1.0) <= rate_per_s
    assert len(times(releases, 0.0, 10.0)) >= 0.98 * rate_per_s * 10
    per_daemon = [sum(1 for _, index in releases if index == d) for d in range(DAEMONS)]
    assert min(per_daemon) >= len(releases) / DAEMONS * 0.9, per_daemon


async def test_a_hold_from_one_daemon_holds_every_daemon(clients: list[aioredis.Redis]) -> None:
    first, *others = pacers(clients, 80)
    await run_daemons([first, *others], T0_US, T0_US + 2 * US)

    await first.throttle(1.5, now_us=T0_US + 2 * US)
    releases = await run_daemons(others, T0_US + 2 * US, T0_US + 6 * US)

    assert min(times(releases)) >= 3.5
    assert len(times(releases, 3.5, 3.6)) <= 40 * 0.1 + 1  # resumes at the cut rate: no burst


async def test_throttling_cuts_the_rate_once_per_episode_across_daemons(
    clients: list[aioredis.Redis],
) -> None:
    first, second, third = pacers(clients, 80)

    assert await first.throttle(1.0, now_us=T0_US) is True
    assert await second.throttle(1.0, now_us=T0_US + 10_000) is False  # same episode
    assert (first.rate_per_s, second.rate_per_s) == (40, 40)
    assert await third.throttle(1.0, now_us=T0_US + 2 * US) is True  # the hold had ended
    assert third.rate_per_s == 20


async def test_the_cut_rate_paces_every_daemon(clients: list[aioredis.Redis]) -> None:
    daemons = pacers(clients, 80)
    await daemons[0].throttle(0.5, now_us=T0_US)

    releases = await run_daemons(daemons, T0_US, T0_US + 5 * US)

    assert max_in_any_window(times(releases), 1.0) <= 40
    assert len(times(releases, 1.0, 5.0)) >= 0.98 * 40 * 4


async def test_a_slot_given_up_late_is_replaced_at_once_and_leaves_the_ring(
    clients: list[aioredis.Redis], redis: aioredis.Redis
) -> None:
    """A caller that woke 6 ms after its slot did not send: its replacement goes out at once
    instead of a slot later, the slots after it stay where they were, and the unused slot no
    longer counts against the window."""
    daemon = pacers(clients, 80)[0]
    await daemon.reserve(now_us=T0_US)
    late = await daemon.reserve(now_us=T0_US + 1_000)
    assert late.slots_us == (T0_US + 12_500,)

    replacement = await daemon.reserve(0, [late.stamp_us(T0_US + 12_500)], now_us=T0_US + 18_500)
    following = await daemon.reserve(now_us=T0_US + 19_000)

    assert replacement.slots_us == (T0_US + 18_500,)
    assert following.slots_us == (T0_US + 25_000,)
    ring = [int(stamp) for stamp in await redis.lrange(rate_ring_key(PREFIX, ACCOUNT), 0, -1)]
    assert ring == [T0_US + 25_000, T0_US + 18_500, T0_US]


async def test_replacements_go_out_at_twice_the_rate_not_together(
    clients: list[aioredis.Redis],
) -> None:
    """A head that woke 50 ms late at 1,000/s gave up 50 slots, and their replacements all due
    at once left as one burst, which reached the provider spread out and crowded a later
    second. Replacements are spaced half an interval apart, within a call and across calls."""
    daemon = pacers(clients, 80)[0]
    first = await daemon.reserve(4, now_us=T0_US)
    stamps = [first.stamp_us(at_us) for at_us in first.slots_us]

    replaced = await daemon.reserve(0, stamps[:3], now_us=T0_US + 60_000)
    one_more = await daemon.reserve(0, stamps[3:], now_us=T0_US + 61_000)

    assert replaced.slots_us == (T0_US + 60_000, T0_US + 66_250, T0_US + 72_500)
    assert one_more.slots_us == (T0_US + 78_750,)


async def test_slots_that_passed_while_nobody_waited_are_not_made_up_in_a_burst(
    clients: list[aioredis.Redis],
) -> None:
    """The sending loop had nothing to send for 60 ms (a slow claim), so the lease's slots
    passed unused. The next callers are paced from then on, not sent together to make up."""
    daemon = pacers(clients, 1000)[0]
    await daemon.acquire()
    await asyncio.sleep(0.06)

    released = []
    for _ in range(30):
        await daemon.acquire()
        released.append(time.monotonic())

    # On the schedule, 29 intervals; replacements at twice the rate would be 14.5 ms.
    assert released[-1] - released[0] >= 0.012


async def test_slots_due_at_once_are_due_lead_s_after_the_script_ran(
    clients: list[aioredis.Redis],
) -> None:
    """A replacement, and a slot made up from a stall, cannot be used before the answer is
    back: with lead_s they are due that long after Redis gave them out, and so stamped."""
    daemon = pacers(clients, 80)[0]
    first = await daemon.reserve(now_us=T0_US)
    now_us = T0_US + 12_500 + 20_000  # 20 ms behind the schedule

    made_up = await daemon.reserve(2, now_us=now_us, lag_s=MAX_LAG_S, lead_s=0.005)
    replaced = await daemon.reserve(0, [first.stamp_us(T0_US)], now_us=now_us, lead_s=0.005)

    assert made_up.slots_us == (T0_US + 12_500, T0_US + 25_000)  # their places on the schedule
    assert [made_up.stamp_us(at_us) for at_us in made_up.slots_us] == [now_us + 5_000] * 2
    assert replaced.slots_us == (now_us + 5_000,)
    assert replaced.stamp_us(now_us + 5_000) == now_us + 5_000


@pytest.mark.parametrize("rate_per_s", [2, 80])
async def test_one_call_for_many_slots_gives_what_one_call_per_slot_gives(
    clients: list[aioredis.Redis], redis: aioredis.Redis, rate_per_s: int
) -> None:
    """The script checks a whole lease against the ring with one read: the times and the ring
    are those of reserving the slots one by one, also for a lease longer than the ring and for
    replacements that go first."""
    batched, single = (
        SharedPacer(client, call_directly, prefix=PREFIX, account=account, rate_per_s=rate_per_s)
        for client, account in zip(clients, ("batched", "single"), strict=False)
    )
    leases = [(T0_US, 3, 0), (T0_US + 400_000, 5, 1), (T0_US + 900_000, 7, 2)]
    for now_us, scheduled, given_up in leases:
        given_up_us = [T0_US] * given_up  # the first slot's stamp, given up and then gone
        whole = await batched.reserve(scheduled, given_up_us, now_us=now_us)
        parts = [await single.reserve(0, [stamp], now_us=now_us) for stamp in given_up_us]
        parts += [await single.reserve(now_us=now_us) for _ in range(scheduled)]

        assert whole.slots_us == tuple(at for part in parts for at in part.slots_us)
        assert await redis.lrange(rate_ring_key(PREFIX, "batched"), 0, -1) == await redis.lrange(
            rate_ring_key(PREFIX, "single"), 0, -1
        )


async def test_a_stalled_daemon_makes_up_its_lag_and_an_idle_one_nothing(
    clients: list[aioredis.Redis],
) -> None:
    """40 ms behind the schedule at 80/s: a daemon that stalled (lag_s = MAX_LAG_S) keeps it,
    its past slots due at once; one back from an idle spell starts again at now."""
    stalled, idle = (
        SharedPacer(client, call_directly, prefix=PREFIX, account=account, rate_per_s=80)
        for client, account in zip(clients, ("stalled", "idle"), strict=False)
    )
    for daemon in (stalled, idle):
        await daemon.reserve(now_us=T0_US)
    now_us = T0_US + 12_500 + 40_000

    made_up = await stalled.reserve(4, now_us=now_us, lag_s=MAX_LAG_S)
    restarted = await idle.reserve(4, now_us=now_us)

    assert made_up.slots_us == tuple(T0_US + 12_500 * k for k in range(1, 5))
    assert [made_up.stamp_us(at) for at in made_up.slots_us] == [now_us] * 4
    assert restarted.slots_us == tuple(now_us + 12_500 * k for k in range(4))


async def test_increase_recovers_the_shared_rate_but_never_above_the_configured_rate(
    clients: list[aioredis.Redis],
) -> None:
    first, second, _ = pacers(clients, 80, min_rate_per_s=5)
    for episode in range(10):
        await first.throttle(0.001, now_us=T0_US + episode * US)
    assert first.rate_per_s == 5

    first.increase(30)
    await first.reserve(now_us=T0_US + 20 * US)
    assert first.rate_per_s == 35
    second.increase(1000)
    await second.reserve(now_us=T0_US + 21 * US)
    assert second.rate_per_s == 80
    await first.reserve(now_us=T0_US + 22 * US)
    assert first.rate_per_s == 80


async def test_a_new_configured_rate_applies_on_the_first_lease_and_a_cut_keeps_its_share(
    clients: list[aioredis.Redis],
) -> None:
    """An operator raises the account from 80/s to 1,000/s and restarts: the daemon sends at
    1,000/s from its first lease, not at 80/s climbing back. A rate cut to half by a throttle
    is half of whichever rate a daemon is configured with."""
    old = pacers(clients[:1], 80)[0]
    await run_daemons([old], T0_US, T0_US + 2 * US)
    assert old.rate_per_s == 80

    [new] = pacers(clients[1:2], 1000)
    await new.reserve(now_us=T0_US + 2 * US)
    assert new.rate_per_s == 1000
    releases = await run_daemons([new], T0_US + 2 * US, T0_US + 3 * US)
    assert len(releases) >= 0.98 * 1000

    await new.throttle(0.001, now_us=T0_US + 4 * US)
    assert new.rate_per_s == 500
    await old.reserve(now_us=T0_US + 5 * US)
    assert old.rate_per_s == 40  # half of its own 80, not 500
    await new.reserve(now_us=T0_US + 6 * US)
    assert new.rate_per_s == 500


@pytest.mark.parametrize("rate_per_s", [80, 1000])
async def test_an_idle_gap_saves_up_no_slots(
    clients: list[aioredis.Redis], rate_per_s: int
) -> None:
    daemons = pacers(clients, rate_per_s)
    releases = await run_daemons(daemons, T0_US, T0_US + 2 * US)
    releases += await run_daemons(daemons, T0_US + 7 * US, T0_US + 9 * US)

    assert max_in_any_window(times(releases), 1.0) <= rate_per_s
    assert len(times(releases, 7.0, 7.1)) <= rate_per_s * 0.1 + 1


async def test_an_idle_account_leaves_nothing_behind(
    clients: list[aioredis.Redis], redis: aioredis.Redis
) -> None:
    """Every key the pacers write expires once the account is idle (and its hold is over)."""
    daemons = pacers(clients, 80)
    await daemons[0].throttle(30.0)
    await daemons[1].reserve()

    keys = sorted(await redis.keys(f"{PREFIX}rate:*"))
    assert keys == sorted(
        [rate_state_key(PREFIX, ACCOUNT).encode(), rate_ring_key(PREFIX, ACCOUNT).encode()]
    )
    for key in keys:
        assert 30_000 < await redis.pttl(key) <= 30_000 + IDLE_TTL_MS + 1_000


async def test_acquire_does_not_release_inside_a_hold_set_while_it_slept(
    clients: list[aioredis.Redis], redis: aioredis.Redis
) -> None:
    """Real clock: the waiting daemon's slot is about a second away when another daemon is
    told to hold for 1.5 s; it must read the hold again and wait for it to end."""
    other, waiting, throttled = pacers(clients, 2)
    for _ in range(2):
        taken = await other.reserve()
    acquiring = asyncio.create_task(waiting.acquire())
    last_us = taken.slots_us[-1]
    await wait_until(lambda: _newest_reservation_is_after(redis, last_us), interval_s=0.01)

    await throttled.throttle(1.5)
    held_until_us = int(await redis.hget(rate_state_key(PREFIX, ACCOUNT), "hold") or 0)
    await acquiring

    seconds, micros = await redis.time()
    assert seconds * US + micros >= held_until_us


@pytest.mark.parametrize("rate_per_s", [10, 80])
async def test_a_hold_set_by_another_daemon_stops_releases_within_the_freshness_bound(
    clients: list[aioredis.Redis], rate_per_s: int
) -> None:
    """Real clock: the sending daemon learns the hold from its leases, or reads it when they
    are too far apart (at 10/s it holds slots for 300 ms), so nothing leaves it later than
    HOLD_FRESH_S after another daemon was told to hold, plus the lateness a release is
    allowed."""
    sending, throttled, _ = pacers(clients, rate_per_s)
    released: list[float] = []

    async def send_forever() -> None:
        while True:
            await sending.acquire()
            released.append(time.monotonic())

    task = asyncio.create_task(send_forever())
    try:
        await wait_until(lambda: len(released) >= 5, interval_s=0.01)
        await throttled.throttle(30.0)
        throttled_at = time.monotonic()
        await asyncio.sleep(HOLD_FRESH_S * 3)
    finally:
        task.cancel()

    assert [t for t in released if t > throttled_at + HOLD_FRESH_S + MAX_WAKE_LATE_S] == []


async def test_slots_of_a_slow_answer_that_fell_due_meanwhile_are_given_up_not_sent_late(
    clients: list[aioredis.Redis],
) -> None:
    """Real clock, 80/s: the third lease's answer comes back 80 ms after Redis gave out its
    slots. Those due in the first 70 ms are late on Redis's clock, which the ring counts in:
    they go back with later leases for replacements, instead of leaving late and bunching
    with the slots a second later."""
    reservations: list[Reservation] = []
    given_up_us: list[int] = []

    async def slow_third_answer(
        fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        result = await fn(*args, **kwargs)
        if isinstance(result, Reservation):
            reservations.append(result)
            given_up_us.extend(args[1])  # type: ignore[call-overload]
            if len(reservations) == 3:
                await asyncio.sleep(0.08)
        return result

    pacer = SharedPacer(
        clients[0], slow_third_answer, prefix=PREFIX, account=ACCOUNT, rate_per_s=80
    )
    for _ in range(12):
        await pacer.acquire()

    slow = reservations[2]
    stamps_us = [slow.stamp_us(at_us) for at_us in slow.slots_us]
    fell_due_us = {stamp_us for stamp_us in stamps_us if stamp_us < slow.now_us + 70_000}
    assert fell_due_us  # the slow lease had slots due while its answer was on the way
    assert fell_due_us <= set(given_up_us)


async def _newest_reservation_is_after(redis: aioredis.Redis, at_us: int) -> bool:
    newest = await redis.lindex(rate_ring_key(PREFIX, ACCOUNT), 0)
    return newest is not None and int(newest) > at_us


async def test_acquire_waits_out_a_redis_outage_and_never_releases_unpaced(
    servers: Servers, migrated_pool: ledger.Pool, tmp_path: Path
) -> None:
    """Redis is down when acquire() is called: it retries through the daemon's outage policy
    and returns only once a reservation is in Redis."""
    port = free_port()
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1)
    deps = _dependencies(servers, client, migrated_pool)
    pacer = SharedPacer(client, deps.redis_call, prefix=PREFIX, account=ACCOUNT, rate_per_s=80)
    server = EmbeddedRedis(tmp_path / "redis", port)
    try:
        with capture_logs() as logs:
            acquiring = asyncio.create_task(pacer.acquire())
            await wait_until(lambda: _outage_logged(logs, times=1), interval_s=0.01)
            assert not acquiring.done()
            await asyncio.to_thread(server.start)
            await asyncio.wait_for(acquiring, 30)
        # One line per outage (then one per 30 s): the recovery line counts the retries.
        [recovered] = [e for e in logs if e["event"] == "dependency_recovered"]
        assert recovered["dependency"] == "redis"
        assert isinstance(recovered["attempts"], int)
        assert recovered["attempts"] >= 1
        lease = lease_slots(80)  # one lease, taken once Redis was back
        assert await client.llen(rate_ring_key(PREFIX, ACCOUNT)) == lease
    finally:
        await client.aclose()
        server.stop()


def _dependencies(servers: Servers, client: aioredis.Redis, pool: ledger.Pool) -> Dependencies:
    """The daemon's own Dependencies, for its redis_call (outage policy); nothing is written."""
    settings = make_settings(servers, "http://127.0.0.1:9", dependency_retry_s=0.05)

    def writer(name: str) -> BatchWriter[object]:
        return BatchWriter(name, _write_nothing, flush_rows=1, flush_interval_s=1, retry_s=1)

    return Dependencies(settings, client, pool, {}, {}, writer("outcomes"), writer("receipts"))


async def _write_nothing(items: object) -> None:
    raise AssertionError("nothing is written in this test")


def _outage_logged(logs: list[dict[str, object]], times: int) -> bool:
    outages = [e for e in logs if e["event"] == "dependency_unavailable"]
    return len(outages) >= times and all(e["dependency"] == "redis" for e in outages)
