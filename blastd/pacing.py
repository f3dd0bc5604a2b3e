"""Paces one account's sends: one Pacer per account, built inside the running loop.

aiolimiter's token buckets miss our promise (at rate R, at least 0.98 R and no one-second
window above R; bench/rate.py measures it) from both sides. `AsyncLimiter(R, 1)` starts full
and refills while it drains, so one second can hold nearly 2R sends. `AsyncLimiter(1, 1/R)`
sleeps once per send; every wake-up is late, the lateness adds up, and the rate falls short.

The Pacer keeps two independent guarantees:

- Absolute deadlines give the rate. Slot k is due at t0 + k/R, so a late wake-up delays one
  release and not the ones after it: sleep overshoot never accumulates.
- A ring of the last R release times gives the window. Nothing is released before
  ring[oldest] + 1 s (+ CLOCK_GUARD_S), so no one-second window, whatever its start, holds
  more than R; this holds even while the schedule catches up after a stall.

Slots nobody claimed are not saved up, so no burst follows a quiet spell: an acquire that
finds nobody waiting and the schedule more than MAX_RETURN_LAG_S behind restarts it at now. A
caller that comes back only a little late keeps its schedule: the daemon's one sending loop
calls acquire() again only after it has launched a send, and at 1000/s forgetting that delay
every time cost 4 % of the rate (bench/rate.py). A release that a hold or the ring delayed
restarts it at the time it was allowed: made up, that delay would come out as a burst, which
the ring would then repeat every second. Only lateness in waking up is made up, and at most
MAX_LAG_S of it.

Callers wait their turn on an asyncio.Lock, which is FIFO and, when a waiter is cancelled,
hands its turn to the next one. Only the head of the queue sleeps, and a slot counts as used
only when its caller returns, so a cancelled waiter never uses a slot. Each acquire does
O(1) work. Times are loop.time() (monotonic) throughout.

A Pacer knows only its own process. The daemon paces an account with a rate through
shared_pacing.SharedPacer, whose state lives in Redis so that several daemons share the rate;
it keeps a Pacer for an unlimited account (holds only: no Redis round trip on the throughput
path) and for a campaign's own rate_per_s, which therefore applies per daemon.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol

WINDOW_S = 1.0
# A release stamped t reaches the provider later by a delay that varies: uvloop's loop.time()
# counts whole milliseconds, and the request then crosses the event loop, aiohttp and the
# kernel. Two requests R releases apart can so arrive closer than 1 s. bench/rate.py, stamping
# arrivals at the sandbox on a busy 2-core host, saw release-to-arrival delays of 3-6 ms at
# p99 and up to 13 ms, and 1001-1003 arrivals in one second with a 2 ms guard. Widening the
# window by 10 ms covers them; it costs 1 % of the rate.
CLOCK_GUARD_S = 0.01
# A stall (a blocked loop, a slow head of the queue) may be made up, but only this much of
# it: the catch-up burst is at most R * MAX_LAG_S sends, not a whole window's worth.
MAX_LAG_S = 0.05
# A caller that comes back to acquire() this late keeps its slot; later, the slot is forgotten.
# Enough for the sending loop's own work between two releases, too little to let out a burst.
MAX_RETURN_LAG_S = 0.005
# uvloop rounds a delay to whole milliseconds, so a shorter sleep returns at once and the head
# would spin until the clock ticks; the deadlines absorb the overshoot of sleeping longer.
MIN_SLEEP_S = 0.001


class AccountPacer(Protocol):
    """What a Sender needs from its account's pacer, local or shared between daemons."""

    @property
    def rate_per_s(self) -> float: ...

    async def acquire(self) -> None: ...

    async def throttle(self, hold_s: float, factor: float = 0.5) -> bool: ...

    def increase(self, step_per_s: float) -> None: ...


class Pacer:
    """Releases callers in call order, at most rate_per_s in any one-second window."""

    def __init__(self, rate_per_s: float, *, min_rate_per_s: float = 1.0) -> None:
        if rate_per_s < 0 or min_rate_per_s <= 0:
            raise ValueError("rate_per_s must be >= 0 and min_rate_per_s > 0")
        self._loop = asyncio.get_running_loop()
        self._ceiling_per_s = rate_per_s
        # A configured rate below min_rate_per_s is its own floor: decrease never goes lower.
        self._floor_per_s = min(min_rate_per_s, rate_per_s)
        self._rate_per_s = rate_per_s
        self._ring: collections.deque[float] = collections.deque(
            maxlen=_window_capacity(rate_per_s)
        )
        self._anchor_at = self._loop.time()
        self._slots_since_anchor = 0
        self._held_until = self._anchor_at
        self._turn = asyncio.Lock()
        self._waiting = 0

    @property
    def rate_per_s(self) -> float:
        """The current rate, between the floor and the configured rate; 0 means unlimited."""
        return self._rate_per_s

    async def acquire(self) -> None:
        """Return when the caller may send: in call order, within the rate and any hold."""
        if self._waiting == 0:
            now = self._loop.time()
            if self._rate_per_s == 0 and now >= self._held_until:
                return
            self._forget_unclaimed_slots(now)
        self._waiting += 1
        try:
            async with self._turn:
                await self._wait_for_release()
        finally:
            self._waiting -= 1

    def hold_until(self, loop_time: float) -> None:
        """Release nothing before loop_time (in loop.time() terms), as a Retry-After asks."""
        self._held_until = max(self._held_until, loop_time)

    async def throttle(self, hold_s: float, factor: float = 0.5) -> bool:
        """Hold for hold_s from now; the first throttle of an episode (no hold active) also
        multiplies the rate by factor. True when this began a new episode."""
        now = self._loop.time()
        is_new_episode = now >= self._held_until
        self.hold_until(now + hold_s)
        if is_new_episode:
            self.decrease(factor)
        return is_new_episode

    def decrease(self, factor: float = 0.5) -> None:
        """Multiply the rate by factor, not below min_rate_per_s; unlimited stays unlimited."""
        if not 0 < factor < 1:
            raise ValueError("factor must be between 0 and 1")
        if self._ceiling_per_s:
            self._set_rate(max(self._floor_per_s, self._rate_per_s * factor))

    def increase(self, step_per_s: float) -> None:
        """Add step_per_s to the rate, not above the configured rate."""
        if step_per_s < 0:
            raise ValueError("step_per_s must be >= 0")
        if self._ceiling_per_s:
            self._set_rate(min(self._ceiling_per_s, self._rate_per_s + step_per_s))

    async def _wait_for_release(self) -> None:
        # Not an Event: this sleeps to a deadline, and checks again because a hold or a rate
        # change may have moved it, or the loop's timer woke us a little early.
        while (now := self._loop.time()) < (release_at := self._release_at()):  # noqa: ASYNC110
            await asyncio.sleep(max(release_at - now, MIN_SLEEP_S))
        if self._rate_per_s:
            self._record_release(now, release_at)

    def _release_at(self) -> float:
        if self._rate_per_s == 0:
            return self._held_until
        release_at = max(self._next_slot_at(), self._held_until)
        if len(self._ring) == self._ring.maxlen:
            release_at = max(release_at, self._ring[0] + WINDOW_S + CLOCK_GUARD_S)
        return release_at

    def _next_slot_at(self) -> float:
        return self._anchor_at + self._slots_since_anchor / self._rate_per_s

    def _record_release(self, now: float, release_at: float) -> None:
        self._ring.append(now)
        # Delays from a hold, the ring or a long stall restart the schedule (module docstring).
        slot_at = max(release_at, now - MAX_LAG_S)
        if slot_at > self._next_slot_at():
            self._anchor_at, self._slots_since_anchor = slot_at, 1
        else:
            self._slots_since_anchor += 1

    def _forget_unclaimed_slots(self, now: float) -> None:
        if self._rate_per_s and self._next_slot_at() < now - MAX_RETURN_LAG_S:
            self._anchor_at, self._slots_since_anchor = now, 0

    def _set_rate(self, rate_per_s: float) -> None:
        # Re-anchor on the last slot given out, so only the slots after it move.
        if self._slots_since_anchor:
            self._anchor_at += (self._slots_since_anchor - 1) / self._rate_per_s
            self._slots_since_anchor = 1
        self._rate_per_s = rate_per_s
        capacity = _window_capacity(rate_per_s)
        if capacity != self._ring.maxlen:  # keeps the newest releases when it shrinks
            self._ring = collections.deque(self._ring, maxlen=capacity)


def _window_capacity(rate_per_s: float) -> int:
    """How many releases one window may hold: R, rounded down, and at least one."""
    return max(1, int(rate_per_s))
