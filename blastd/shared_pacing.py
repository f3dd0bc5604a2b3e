"""Paces one account across every daemon that sends through it, with its state in Redis.

Several `blastd run` processes may share an account, and the rate promise (at rate R, at least
0.98 R and no one-second window above R) holds for their sum (bench/multi_rate.py). Each
process's SharedPacer asks one Lua script, run atomically by Redis, for the account's next
release times. The script keeps what the local Pacer keeps, once for everyone:

- the schedule (`next`): each slot is at least 1/R after the previous one; a schedule more
  than MAX_RETURN_LAG_S behind now restarts at now, so an idle spell saves up no burst. A
  daemon that still holds slots, or gives some up, was busy and stalled: for it the
  schedule may lag MAX_LAG_S, as the local Pacer makes up that much of a stall;
- a ring of the last R slots' stamps (a slot's time, or now if that is later): no slot is
  given out before ring[oldest] + 1 s + CLOCK_GUARD_S + MAX_WAKE_LATE_S, so no one-second
  window of releases holds more than R;
- the hold (Retry-After) and the current AIMD rate, so a throttling answer seen by one daemon
  holds and slows all of them, and cuts the rate once per episode, not once per daemon. The
  rate is kept with the configured rate it was cut from: a daemon configured with another
  scales it by the change, so raising an account's rate_per_s takes effect on the first lease
  and not after the climb back that follows a cut, and a cut to half stays half of the new
  rate.

Times in Redis are microseconds of Redis `TIME`: one clock for all daemons. Redis `TIME` is
the server's wall clock: a step backwards (not NTP's slewing) would stall the account for the
step. A daemon maps it to its own monotonic clock by the fastest answer it has seen (`now` in
an answer is late by that answer's round trip), the mapping drifting later by CLOCK_DRIFT
until the next answer confirms it, so it errs late by about the fastest round trip, and no
more. Mapping each lease by its own answer made a slow answer (38 ms in a busy daemon) late
for all its slots: they bunched with slots on time a second later, 81 in one second at 80/s.
After a failover to a server whose clock is behind the old one's, the mapping runs early by
the difference and catches up at CLOCK_DRIFT (a few seconds for the milliseconds between
NTP-synced servers); the windows meanwhile have that much less margin.

A daemon takes LEASE_S worth of slots per call (a lease), at least MIN_LEASE_SLOTS, and the
next lease when half of it is left, in a background task: the head of the queue sleeps to
its slot meanwhile, so the round trip overlaps the sending instead of making the slot late.
The script reads the ring once and pushes a lease's stamps in one command, so its Redis
commands are counted per lease, not per slot. A daemon's slots are used in time order,
replacements included. Leased slots are stamped when given out, so a longer lease cannot put
more than R in a window; the ones never used (the daemon stopped, or ran out of work) still
count for a second after their stamps, and cost the other daemons that much rate.

Slots are stamped into the ring when they are given out, before the caller sleeps, so the
window includes MAX_WAKE_LATE_S of lateness, counted against the slot's Redis time; a caller
later than that gives its slot up unused: the script takes its stamp out of the ring and
gives a replacement at once, so lateness costs a round trip, not a slot. A slot is due at its
stamp, so one made up from a stall is due when it was given out. "At once" is ANSWER_LEAD_S
after the script ran, the time its answer takes to come back; a lease that brings a slot due
before the one the head of the queue sleeps to wakes it.

Replacements follow each other at least half an interval apart (twice the rate), within a
lease and across leases. A head that woke 50 ms late at 1,000/s gave up 50 slots; replaced at
the same moment, they left as one burst, reached the sandbox spread over tens of ms, and the
second from there held more than R: the ring counts releases, not arrivals.

A caller that comes to acquire() with nobody waiting and finds slots already more than
MAX_RETURN_LAG_S past did not wake late: nobody wanted those slots (the sending loop had
nothing to send, its claim was late). Their stamps leave the ring with the next lease, but
they are not replaced, as the local Pacer forgets unclaimed slots. Replaced, a lease's worth
went out together when a campaign's first claims were slow: 75 requests in 10 ms at 1,000/s.

Slots leased after a hold was set come after it; the slots a daemon leased before need it to
learn of the hold. It comes with every lease, and a daemon sends on what it knows of it if that
is at most HOLD_FRESH_S (100 ms) old at the slot; older, it reads the hold again shortly
before the slot (one HGET). A daemon that sends 80/s or more on its own leases at least every
50 ms and never reads it; one that sends less (a slower account, or its share of one) reads it
before some of its slots. A hold another daemon set is therefore honoured within 100 ms;
requests released in those 100 ms meet the throttle like the requests that were already in
flight when the throttling answer came, and get the same treatment: a 429, which holds and is
sent again. Redis pub/sub could carry the notice sooner, but its messages are lost across a
reconnect, so the bound would still be needed; it would cost each daemon another connection
and a listener per account.

Local callers take turns on an asyncio.Lock (FIFO); a slot is used only when its caller
returns, so a cancelled waiter leaves it to the next. Slots cleared by a hold stay in the
ring: that is conservative. Every Redis command goes through the daemon's outage policy
(`redis_call`): during an outage acquire() waits; it never lets a request out unpaced.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import ParamSpec, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from blastd.pacing import CLOCK_GUARD_S, MAX_LAG_S, MAX_RETURN_LAG_S, MIN_SLEEP_S, WINDOW_S

P = ParamSpec("P")
T = TypeVar("T")

US_PER_S = 1_000_000
# Keys outlive the last reservation and the hold by this much, then an idle account leaves
# nothing behind; its rate starts again at the configured one.
IDLE_TTL_MS = 60_000
# See the module docstring: how late past its slot (in Redis time) a caller may still send.
MAX_WAKE_LATE_S = 0.005
# A hold set by another daemon is honoured within this (module docstring): a slot is released
# on what this daemon knew of the hold at most this long before it, else the hold is read again
# HOLD_READ_LEAD_S before the slot, so that round trip does not make the release late.
HOLD_FRESH_S = 0.1
HOLD_READ_LEAD_S = 0.0025
# One script call reserves this much sending time, and the next lease is taken when half of
# the last one is left, so the round trip (a few ms in a busy daemon) overlaps the sending
# instead of delaying it. 50 ms: at 1000/s 50 slots; at 80/s 4 slots, one call per four
# requests, and a lease every 50 ms, so what the daemon knows of the hold stays younger than
# HOLD_FRESH_S with no read of its own. At least two slots: with one, each lease was taken only
# once its slot was used, the round trip came between every two sends, and at 80/s a loaded
# host lost 8 % of the rate to it. Slots leased and never used still count in the ring for a
# second: a daemon that stops or runs out of work costs the others at most 1.5 leases.
LEASE_S = 0.05
MIN_LEASE_SLOTS = 2
MAX_LEASE_SLOTS = 100  # bounds the script's work at very high rates
# A slot due at once is due this long after Redis gave it out: its answer has to come back
# first, and a slot more than MAX_WAKE_LATE_S late is given up. With none (and a head that
# slept on to its own slot instead of taking a replacement that came back), replacements were
# late on arrival and given up in turn: at 80/s on a busy host, one leased slot in two.
ANSWER_LEAD_S = 0.005
# Redis TIME is mapped to this daemon's monotonic clock by the fastest answer seen: an answer
# carries Redis `now` at least its round trip late. The mapping must not drift early, so it
# moves later by this fraction of the time since it was last confirmed: two hosts' clocks,
# each slewed by NTP at most 500 ppm. Every lease confirms it again.
CLOCK_DRIFT = 0.001

# KEYS: state hash, ring list. ARGV: ceiling_per_s, step_per_s, window_us (guard included),
# return_lag_us, idle_ttl_ms, scheduled, now_us ('' for Redis TIME), lead_us, replaced, then
# the ring stamps of slots given up unused. Those leave the ring, and the first `replaced` of
# them each get a replacement at once (lead_us after now, and half an interval after the
# account's last replacement), off the schedule; then `scheduled` slots follow on the schedule,
# none due before lead_us after now. Returns {now_us, rate, hold_us, at_us...}, replacements
# first.
RESERVE_LUA = """
local now = tonumber(ARGV[7])
if not now then
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end
local ceiling = tonumber(ARGV[1])
local state = redis.call('HMGET', KEYS[1], 'rate', 'next', 'hold', 'ceiling', 'replaced')
local rate = tonumber(state[1]) or ceiling
local was = tonumber(state[4]) or ceiling
rate = math.min(ceiling, rate * ceiling / was + tonumber(ARGV[2]))
local next_at = tonumber(state[2]) or now
local hold = tonumber(state[3]) or 0
local replaced = tonumber(state[5]) or 0
local capacity = math.max(1, math.floor(rate))
local interval = math.ceil(1000000 / rate)
local due = now + tonumber(ARGV[8])
local replacements = tonumber(ARGV[9])
local count = replacements + tonumber(ARGV[6])
for given_up = 10, #ARGV do
  redis.call('LREM', KEYS[2], 1, ARGV[given_up])
end
-- Slot j is checked against the entry at capacity - 1 once j - 1 stamps are pushed: the old
-- entry at capacity - j, or this call's stamp j - capacity. One LRANGE reads every old one.
local first_old = math.max(0, capacity - count)
local old = {}
if count > 0 then
  old = redis.call('LRANGE', KEYS[2], first_old, capacity - 1)
end
local reply = {now, tostring(rate), hold}
local stamps = {}
local stamp = due
for slot = 1, count do
  local at
  if slot <= replacements then
    at = math.max(due, replaced + math.floor(interval / 2), hold)
    replaced = at
  else
    if next_at < now - tonumber(ARGV[4]) then
      next_at = now
    end
    at = math.max(next_at, hold)
  end
  local oldest
  if slot > capacity then
    oldest = stamps[slot - capacity]
  else
    oldest = old[capacity - slot - first_old + 1]
  end
  if oldest then
    at = math.max(at, tonumber(oldest) + tonumber(ARGV[3]))
  end
  if slot > replacements or at > next_at then
    next_at = at + interval
  end
  stamp = math.max(at, due)
  stamps[slot] = stamp
  reply[#reply + 1] = at
end
if count > 0 then
  redis.call('LPUSH', KEYS[2], unpack(stamps))
  redis.call('LTRIM', KEYS[2], 0, capacity - 1)
end
redis.call('HSET', KEYS[1], 'rate', rate, 'ceiling', ceiling, 'next', next_at, 'replaced', replaced)
local ttl_ms = math.ceil((math.max(stamp, hold) - now) / 1000) + tonumber(ARGV[5])
redis.call('PEXPIRE', KEYS[1], ttl_ms)
redis.call('PEXPIRE', KEYS[2], ttl_ms)
return reply
"""

# KEYS: state hash, ring list. ARGV: ceiling_per_s, floor_per_s, hold_us, factor,
# idle_ttl_ms, now_us ('' for Redis TIME). Returns {is_new_episode, rate, hold_us}.
THROTTLE_LUA = """
local now = tonumber(ARGV[6])
if not now then
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end
local ceiling = tonumber(ARGV[1])
local state = redis.call('HMGET', KEYS[1], 'rate', 'hold', 'ceiling')
local rate = tonumber(state[1]) or ceiling
local was = tonumber(state[3]) or ceiling
rate = math.min(ceiling, rate * ceiling / was)
local hold = tonumber(state[2]) or 0
local is_new_episode = hold <= now
hold = math.max(hold, now + tonumber(ARGV[3]))
if is_new_episode then
  rate = math.max(tonumber(ARGV[2]), rate * tonumber(ARGV[4]))
end
redis.call('HSET', KEYS[1], 'rate', rate, 'ceiling', ceiling, 'hold', hold)
local ttl_ms = math.ceil((hold - now) / 1000) + tonumber(ARGV[5])
redis.call('PEXPIRE', KEYS[1], ttl_ms)
redis.call('PEXPIRE', KEYS[2], ttl_ms)
return {is_new_episode and 1 or 0, tostring(rate), hold}
"""


class RedisCall(Protocol):
    """Runs one Redis command, waiting out an outage: the daemon's `Dependencies.redis_call`."""

    async def __call__(
        self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T: ...


@dataclass(frozen=True, slots=True)
class Reservation:
    """Release times given out by the script at once, in Redis microseconds."""

    slots_us: tuple[int, ...]  # replacements first, then the scheduled slots
    now_us: int  # Redis TIME when the script ran
    rate_per_s: float  # the account's rate after this reservation
    held_until_us: int
    lead_us: int = 0  # no slot was due before now_us + lead_us

    def stamp_us(self, at_us: int) -> int:
        """What the ring holds for the slot at at_us: no release happens before it."""
        return max(at_us, self.now_us + self.lead_us)


@dataclass(frozen=True, slots=True)
class _Slot:
    at_us: int
    stamp_us: int  # due then, in Redis time: the daemon's clock is mapped to it when it sleeps


def rate_state_key(prefix: str, account: str) -> str:
    return f"{_account_tag(prefix, account)}:state"


def rate_ring_key(prefix: str, account: str) -> str:
    return f"{_account_tag(prefix, account)}:ring"


def _account_tag(prefix: str, account: str) -> str:
    """`blastd:rate:{main}`: the script's two keys share the account's hash slot on a Redis
    Cluster, and accounts spread over the slots. The prefix's own hash tag (a Cluster needs
    one for the queues) is unbraced here, or it would put every account on its slot."""
    bare = prefix.replace("{", "").replace("}", "")
    return f"{bare}rate:{{{account}}}"


class SharedPacer:
    """Releases this daemon's callers in call order; all daemons together at most rate_per_s
    in any one-second window."""

    def __init__(
        self,
        redis: aioredis.Redis | RedisCluster,
        redis_call: RedisCall,
        *,
        prefix: str,
        account: str,
        rate_per_s: float,
        min_rate_per_s: float = 1.0,
    ) -> None:
        if rate_per_s <= 0 or min_rate_per_s <= 0:
            raise ValueError("rate_per_s and min_rate_per_s must be > 0: unlimited is local")
        self._redis = redis
        self._call = redis_call
        self._keys = [rate_state_key(prefix, account), rate_ring_key(prefix, account)]
        self._reserve_script = redis.register_script(RESERVE_LUA)
        self._throttle_script = redis.register_script(THROTTLE_LUA)
        self._ceiling_per_s = rate_per_s
        # A configured rate below min_rate_per_s is its own floor: decrease never goes lower.
        self._floor_per_s = min(min_rate_per_s, rate_per_s)
        self._rate_per_s = rate_per_s
        self._step_per_s = 0.0  # increases not yet sent: they ride on the next reservation
        self._held_until_us = 0
        self._hold_known_at = 0.0  # monotonic time at which _held_until_us was read
        # Redis TIME in seconds plus this is time.monotonic(), never early (CLOCK_DRIFT).
        self._clock_offset_s = math.inf
        self._clock_mapped_at = 0.0
        self._nap: asyncio.Future[None] | None = None  # the head's sleep, which a lease may end
        self._slots: collections.deque[_Slot] = collections.deque()  # reserved, not yet used
        self._given_up_us: list[int] = []  # stamps of slots woken too late for, to replace
        self._unused_us: list[int] = []  # stamps of slots nobody came for, to leave the ring
        self._leasing: asyncio.Task[None] | None = None
        self._turn = asyncio.Lock()

    @property
    def rate_per_s(self) -> float:
        """The account's current rate as last seen in Redis, never above the configured one."""
        return self._rate_per_s

    async def acquire(self) -> None:
        """Return when the caller may send: in call order, within the shared rate and hold."""
        if not self._turn.locked():  # nobody waited: the slots past were nobody's
            self._drop_slots_past(MAX_RETURN_LAG_S, self._unused_us)
        async with self._turn:
            while True:
                self._drop_slots_past(MAX_WAKE_LATE_S, self._given_up_us)  # woken too late
                if not self._slots:
                    await asyncio.shield(self._refill())  # a cancelled caller leaves it running
                    continue
                if self._given_up_us or len(self._slots) <= self._lease_size() // 2:
                    self._refill()  # in the background: the round trip overlaps the sleep
                slot = self._slots[0]
                if await self._wait_for(slot):
                    self._slots.popleft()
                    return

    async def reserve(
        self,
        scheduled: int = 1,
        given_up_us: Sequence[int] = (),
        now_us: int | None = None,
        lag_s: float = MAX_RETURN_LAG_S,
        lead_s: float = 0.0,
        unused_us: Sequence[int] = (),
    ) -> Reservation:
        """Take the account's next `scheduled` release times, after one at once for each slot
        given up unused (by its ring stamp); the `unused_us` stamps only leave the ring.
        `now_us` replaces Redis TIME (tests only). A schedule at most lag_s behind is kept, its
        past slots due at once; one further behind restarts at now. "At once" is lead_s after
        now: no slot is due before."""
        step_per_s, self._step_per_s = self._step_per_s, 0.0
        # A slot may go out up to MAX_WAKE_LATE_S after its stamp: the window covers that too.
        window_us = _us(WINDOW_S + CLOCK_GUARD_S + MAX_WAKE_LATE_S)
        args: list[float | str] = [self._ceiling_per_s, step_per_s, window_us]
        args += [_us(lag_s), IDLE_TTL_MS, scheduled, "" if now_us is None else now_us]
        args += [_us(lead_s), len(given_up_us), *given_up_us, *unused_us]
        try:
            script_now_us, rate, held_until_us, *slots_us = await self._reserve_script(
                keys=self._keys, args=args
            )
        except BaseException:
            self._step_per_s += step_per_s  # not applied: send it with the next reservation
            raise
        self._rate_per_s = float(rate)
        slots = tuple(int(at_us) for at_us in slots_us)
        return Reservation(
            slots, int(script_now_us), self._rate_per_s, int(held_until_us), _us(lead_s)
        )

    async def throttle(self, hold_s: float, factor: float = 0.5, now_us: int | None = None) -> bool:
        """Hold every daemon's sends for hold_s; the first throttle of an episode (no hold
        active) also multiplies the rate by factor. True when this began a new episode."""
        if not 0 < factor < 1:
            raise ValueError("factor must be between 0 and 1")
        args: list[float | str] = [self._ceiling_per_s, self._floor_per_s, _us(hold_s), factor]
        args += [IDLE_TTL_MS, "" if now_us is None else now_us]
        asked_at = time.monotonic()
        is_new, rate, held_until_us = await self._call(
            self._throttle_script, keys=self._keys, args=args
        )
        self._rate_per_s = float(rate)
        self._learn_hold(int(held_until_us), asked_at)
        return bool(is_new)

    def increase(self, step_per_s: float) -> None:
        """Add step_per_s to the shared rate with the next reservation, not above the
        configured rate: one round trip per request, not two."""
        if step_per_s < 0:
            raise ValueError("step_per_s must be >= 0")
        self._step_per_s += step_per_s

    def _lease_size(self) -> int:
        return lease_slots(self._rate_per_s)

    def _release_at(self, slot: _Slot) -> float:
        """The slot's time on this daemon's monotonic clock."""
        return slot.stamp_us / US_PER_S + self._clock_offset_s

    async def _wait_for(self, slot: _Slot) -> bool:
        """Sleep to the slot; True if it may be used now. False if a hold cleared it, if a
        replacement came back meanwhile and is due before it, or if this caller woke too late."""
        await self._read_hold_if_stale(slot)
        late_s = await self._sleep_to(slot)
        if slot.at_us < self._held_until_us:
            self._slots.clear()  # a throttling answer came while this caller slept
            return False
        return bool(self._slots) and self._slots[0] is slot and late_s <= MAX_WAKE_LATE_S

    async def _sleep_to(self, slot: _Slot) -> float:
        """Sleep to the slot, or until a lease puts an earlier one (a replacement, due at once)
        ahead of it; how late this caller woke (below zero when it was woken early)."""
        loop = asyncio.get_running_loop()
        # On time.monotonic(), not on loop.time(): uvloop's loop.time() is the start of the
        # loop's iteration and may be behind, which would release early. The deadline moves
        # if a lease meanwhile maps the clock better.
        while (late_s := time.monotonic() - self._release_at(slot)) < 0 and self._slots[0] is slot:
            self._nap = loop.create_future()
            timer = loop.call_later(max(-late_s, MIN_SLEEP_S), _wake, self._nap)
            try:
                await self._nap
            finally:
                timer.cancel()
                self._nap = None
        return late_s

    async def _read_hold_if_stale(self, slot: _Slot) -> None:
        """Read the hold again shortly before a slot that what this daemon knows of it would
        not cover (HOLD_FRESH_S): another daemon may have been throttled meanwhile. The read
        goes before the slot, not after it, so its round trip does not make the release late."""
        if self._release_at(slot) - self._hold_known_at <= HOLD_FRESH_S:
            return
        await _sleep_until(self._release_at(slot) - HOLD_READ_LEAD_S)
        if self._release_at(slot) - self._hold_known_at > HOLD_FRESH_S:  # no lease brought it
            asked_at = time.monotonic()
            held_until = await self._call(self._redis.hget, self._keys[0], "hold")
            self._learn_hold(int(held_until or 0), asked_at)

    def _drop_slots_past(self, allowance_s: float, stamps_us: list[int]) -> None:
        """Drop the slots more than allowance_s past; their ring stamps go to stamps_us, which
        the next lease takes back: _given_up_us to be replaced, _unused_us only to leave the
        ring (module docstring)."""
        now = time.monotonic()
        while self._slots and now - self._release_at(self._slots[0]) > allowance_s:
            stamps_us.append(self._slots.popleft().stamp_us)

    def _refill(self) -> asyncio.Task[None]:
        """The lease in flight, or a new one: one at a time, so each sees the last one's
        slots; one that failed raises here, in the caller that next needs a lease."""
        if self._leasing is None or self._leasing.done():
            if self._leasing is not None:
                self._leasing.result()
            scheduled = self._lease_size() if len(self._slots) <= self._lease_size() // 2 else 0
            given_up_us, self._given_up_us = self._given_up_us, []
            unused_us, self._unused_us = self._unused_us, []
            # A daemon still holding slots is busy, and a stall made it late: make up as much
            # as the local Pacer does. One that ran out may have been idle: save up nothing.
            lag_s = MAX_LAG_S if self._slots or given_up_us else MAX_RETURN_LAG_S
            self._leasing = asyncio.create_task(
                self._lease(scheduled, given_up_us, unused_us, lag_s)
            )
        return self._leasing

    async def _lease(
        self, scheduled: int, given_up_us: list[int], unused_us: list[int], lag_s: float
    ) -> None:
        """Reserve more slots; replacements are due at once, so they may go first in line."""
        asked_at = time.monotonic()
        try:
            reservation = await self._call(
                self.reserve,
                scheduled,
                given_up_us,
                lag_s=lag_s,
                lead_s=ANSWER_LEAD_S,
                unused_us=unused_us,
            )
        except BaseException:
            self._given_up_us += given_up_us  # not replaced: send them with the next lease
            self._unused_us += unused_us
            raise
        self._map_clock(reservation.now_us, time.monotonic())
        self._learn_hold(reservation.held_until_us, asked_at)
        # Due at its stamp: a slot made up from a stall (its time already past) is due when it
        # was given out, and only lateness after that is lateness. In time order: a
        # replacement later than a slot still held would make that slot late.
        head = self._slots[0] if self._slots else None
        slots = [_Slot(at_us, reservation.stamp_us(at_us)) for at_us in reservation.slots_us]
        self._slots = collections.deque(
            sorted([*self._slots, *slots], key=lambda slot: slot.stamp_us)
        )
        if self._slots and self._slots[0] is not head and self._nap and not self._nap.done():
            self._nap.set_result(None)  # the head sleeps to a later slot: it takes this one

    def _map_clock(self, redis_now_us: int, received_at: float) -> None:
        """Redis TIME to time.monotonic(): the answer carried `now` late by its round trip, so
        the fastest answer maps best. A slow answer (a busy loop, a slow Redis) mapped on its
        own would make all its slots late, and a late slot bunches with one on time a second
        later. The mapping drifts later (CLOCK_DRIFT) until an answer confirms it."""
        drifted_s = self._clock_offset_s + (received_at - self._clock_mapped_at) * CLOCK_DRIFT
        self._clock_offset_s = min(drifted_s, received_at - redis_now_us / US_PER_S)
        self._clock_mapped_at = received_at

    def _learn_hold(self, held_until_us: int, known_at: float) -> None:
        self._held_until_us = max(self._held_until_us, held_until_us)
        self._hold_known_at = max(self._hold_known_at, known_at)


def lease_slots(rate_per_s: float) -> int:
    """How many slots one lease takes at this rate (LEASE_S)."""
    return max(MIN_LEASE_SLOTS, min(MAX_LEASE_SLOTS, int(rate_per_s * LEASE_S)))


async def _sleep_until(monotonic_at: float) -> None:
    # Not an Event: this sleeps to a deadline, on time.monotonic() because uvloop's loop.time()
    # is the start of the loop's iteration and may be behind, which would release early.
    while (remaining_s := monotonic_at - time.monotonic()) > 0:  # noqa: ASYNC110
        await asyncio.sleep(max(remaining_s, MIN_SLEEP_S))


def _wake(nap: asyncio.Future[None]) -> None:
    if not nap.done():
        nap.set_result(None)


def _us(seconds: float) -> int:
    return math.ceil(seconds * US_PER_S)
