"""Shutdown and run(): opens resources, recovers a dead predecessor's work, owns the tasks."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import aiohttp
import redis.asyncio as aioredis
import redis.exceptions
import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, wait_fixed

from blastd import admin, campaigns, intake, ledger, video_ledger, video_poller, watchdog
from blastd.batches import BatchWriter
from blastd.config import AccountSettings, Settings, VideoAccountSettings
from blastd.limiter import AccountPacer, Pacer
from blastd.providers import build_provider
from blastd.providers.video import VideoAccount, open_video_account
from blastd.sender import Sender
from blastd.shared_limiter import SharedPacer

log = structlog.get_logger()
P = ParamSpec("P")
T = TypeVar("T")

REDIS_OUTAGE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class DrainTimeoutError(Exception):
    """The drain deadline passed with work still running; that work was cancelled."""


class Shutdown:
    """Signals only change this state; services poll `is_requested` and wait on `wait()`."""

    def __init__(self) -> None:
        self._requested = asyncio.Event()
        self._scope: asyncio.Timeout | None = None
        self._drain_timeout_s = 0.0

    @property
    def is_requested(self) -> bool:
        return self._requested.is_set()

    def request(self) -> None:
        """First call: drain until now + drain timeout. Second call: stop now."""
        loop = asyncio.get_running_loop()
        if self._scope is not None:
            extra_s = 0.0 if self.is_requested else self._drain_timeout_s
            self._scope.reschedule(loop.time() + extra_s)
        self._requested.set()

    @contextlib.asynccontextmanager
    async def deadline(self, drain_timeout_s: float) -> AsyncIterator[None]:
        """Bound the drain: once requested, the block is cancelled after `drain_timeout_s`."""
        self._drain_timeout_s = drain_timeout_s
        async with asyncio.timeout(None) as scope:
            self._scope = scope
            if self.is_requested:
                scope.reschedule(asyncio.get_running_loop().time() + drain_timeout_s)
            try:
                yield
            finally:
                self._scope = None  # a signal after the block must not reschedule a spent timer

    async def unless_requested(self, work: Coroutine[Any, Any, T]) -> T | None:
        """Run `work` to its end, or cancel it and return None once shutdown is requested:
        waiting for Redis or PostgreSQL at start-up must not make SIGTERM wait too."""
        task = asyncio.ensure_future(work)
        requested = asyncio.ensure_future(self._requested.wait())
        try:
            await asyncio.wait([task, requested], return_when=asyncio.FIRST_COMPLETED)
        finally:
            requested.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
        return task.result()

    async def wait(self, event: asyncio.Event | None, timeout_s: float | None) -> None:
        """Sleep until `event` is set, shutdown is requested, or `timeout_s` passes."""
        waiters = [asyncio.ensure_future(self._requested.wait())]
        if event is not None:
            waiters.append(asyncio.ensure_future(event.wait()))
        try:
            await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


@dataclass
class Dependencies:
    """Everything the services share, opened in order and closed in reverse."""

    settings: Settings
    redis: aioredis.Redis
    pool: ledger.Pool
    senders: dict[str, Sender]  # the messaging accounts
    videos: dict[str, VideoAccount]  # the video-generation accounts
    outcomes: BatchWriter[ledger.Outcome]
    receipts: BatchWriter[ledger.Receipt]
    campaigns_changed: asyncio.Event = field(default_factory=asyncio.Event)
    is_draining: bool = False
    unreachable: set[str] = field(default_factory=set)  # what the last health probe missed

    @property
    def processing_key(self) -> str:
        return intake.processing_key(self.settings.redis_prefix, self.settings.instance_id)

    async def redis_call(
        self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run a Redis command, waiting out an outage instead of failing."""
        return await _call_through_outage(
            "redis", REDIS_OUTAGE_ERRORS, self.settings.dependency_retry_s, fn, *args, **kwargs
        )

    async def outage_call(
        self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run work that uses Redis and PostgreSQL both, waiting out an outage of either; the
        work must leave nothing behind when cut short (a transaction), so it can run again."""
        errors = REDIS_OUTAGE_ERRORS + ledger.DB_OUTAGE_ERRORS
        return await _call_through_outage(
            "redis or postgres", errors, self.settings.dependency_retry_s, fn, *args, **kwargs
        )

    async def db_call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a ledger function, waiting out a PostgreSQL outage instead of failing."""
        return await _call_through_outage(
            "postgres",
            ledger.DB_OUTAGE_ERRORS,
            self.settings.dependency_retry_s,
            fn,
            *args,
            **kwargs,
        )


async def _call_through_outage(
    dependency: str,
    errors: tuple[type[BaseException], ...],
    retry_s: float,
    fn: Callable[P, Awaitable[T]],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(errors),
        wait=wait_fixed(retry_s),
        before_sleep=lambda state: log.warning(
            "dependency_unavailable",
            dependency=dependency,
            attempt=state.attempt_number,
            error=type(state.outcome.exception()).__name__ if state.outcome else None,
        ),
    ):
        with attempt:
            return await fn(*args, **kwargs)
    raise AssertionError("unreachable: the retry loop never stops on its own")


async def open_dependencies(
    stack: contextlib.AsyncExitStack, settings: Settings, status: watchdog.StatusLine
) -> Dependencies:
    """Connect to Redis and PostgreSQL (waiting for them), migrate, build the senders."""
    client = aioredis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_socket_timeout_s,
        health_check_interval=10,
    )
    stack.push_async_callback(client.aclose)
    status.set("starting: waiting for redis")
    await _call_through_outage(
        "redis", REDIS_OUTAGE_ERRORS, settings.dependency_retry_s, client.ping
    )
    status.set("starting: waiting for postgres")
    pool = await _call_through_outage(
        "postgres",
        ledger.DB_OUTAGE_ERRORS,
        settings.dependency_retry_s,
        ledger.open_pool,
        settings.database_url,
        command_timeout_s=settings.db_command_timeout_s,
    )
    stack.push_async_callback(pool.close)
    applied = await ledger.migrate(pool)
    if applied:
        log.info("ledger_migrated", files=applied)
    deps = Dependencies(
        settings=settings,
        redis=client,
        pool=pool,
        senders={},
        videos={},
        outcomes=_writer("outcomes", ledger.record_outcomes, pool, settings),
        receipts=_writer("receipts", ledger.apply_receipts, pool, settings),
    )
    for name, account in settings.accounts.items():
        http = await stack.enter_async_context(_http_session(account.concurrency))
        if isinstance(account, VideoAccountSettings):
            deps.videos[name] = open_video_account(name, account, http)
            continue
        provider = build_provider(name, account, http)
        deps.senders[name] = Sender(name, account, provider, _account_pacer(deps, name, account))
    return deps


def _account_pacer(deps: Dependencies, name: str, account: AccountSettings) -> AccountPacer:
    """Shared through Redis by every daemon on this prefix, unless the account opts out; an
    unlimited account stays local, so the throughput path makes no Redis round trip."""
    if not account.rate_per_s or not account.shared_rate:
        return Pacer(account.rate_per_s)
    return SharedPacer(
        deps.redis,
        deps.redis_call,
        prefix=deps.settings.redis_prefix,
        account=name,
        rate_per_s=account.rate_per_s,
    )


def _http_session(concurrency: int) -> aiohttp.ClientSession:
    # One keep-alive pool per account, sized to its concurrency so connections are reused.
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=30)
    return aiohttp.ClientSession(connector=connector)


def _writer(
    name: str,
    write: Callable[[ledger.Pool, Any], Awaitable[object]],
    pool: ledger.Pool,
    settings: Settings,
) -> BatchWriter[Any]:
    return BatchWriter(
        name,
        lambda items: write(pool, items),
        flush_rows=settings.outcome_flush_rows,
        flush_interval_s=settings.outcome_flush_interval_s,
        retry_s=settings.dependency_retry_s,
    )


def instance_key(prefix: str, instance_id: str) -> str:
    return f"{prefix}instance:{instance_id}"


def instances_key(prefix: str) -> str:
    return f"{prefix}instances"


async def claim_instance_id(deps: Dependencies, token: str, shutdown: Shutdown) -> bool:
    """Hold this instance id's lease; a crashed predecessor's lease expires within its TTL."""
    settings = deps.settings
    key = instance_key(settings.redis_prefix, settings.instance_id)
    ttl_ms = int(settings.instance_ttl_s * 1000)
    while not shutdown.is_requested:
        if await deps.redis_call(deps.redis.set, key, token, nx=True, px=ttl_ms):
            await deps.redis_call(
                deps.redis.sadd, instances_key(settings.redis_prefix), settings.instance_id
            )
            return True
        log.warning(
            "instance_id_busy", instance=settings.instance_id, ttl_s=settings.instance_ttl_s
        )
        await shutdown.wait(None, settings.instance_ttl_s / 4)
    return False


async def recover_instance(deps: Dependencies, instance_id: str) -> None:
    """Take back what a dead instance held: its jobs and its claimed recipients."""
    jobs = await intake.recover_processing(deps, instance_id)
    recipients = await deps.db_call(
        ledger.recover_owned,
        deps.pool,
        instance_id,
        resend_uncertain=deps.settings.uncertain_policy == "resend",
    )
    renders = await deps.db_call(video_ledger.recover_renders, deps.pool, instance_id)
    if jobs or renders or any(recipients.values()):
        log.warning(
            "instance_recovered", instance=instance_id, jobs=jobs, renders=renders, **recipients
        )


async def keep_instance_alive(deps: Dependencies, token: str, work_done: asyncio.Event) -> None:
    """Refresh our lease and recover instances whose lease expired, until our work is written.

    The lease outlives the start of a drain on purpose: while in-flight sends finish, another
    daemon must not take our recipients for a dead instance's."""
    ttl_s = deps.settings.instance_ttl_s
    clock = asyncio.get_running_loop().time
    renewed_at = reap_from = clock()
    while not work_done.is_set():
        await deps.redis_call(_renew_lease, deps, token)
        now = clock()
        if now - renewed_at > ttl_s:
            # Our lease lapsed while we were alive. If Redis itself was away, everyone else's
            # did too: give them a whole lease to renew before judging anyone dead.
            reap_from = now + ttl_s
            log.warning("instance_lease_lapsed", gap_s=round(now - renewed_at, 1))
        renewed_at = now
        if now >= reap_from:
            await reap_dead_instances(deps)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(work_done.wait(), deps.settings.heartbeat_interval_s)


async def _renew_lease(deps: Dependencies, token: str) -> None:
    """Lease and membership together (MULTI): after a wipe of Redis both come back at once, so
    no other daemon sees us listed without a lease and takes our work for a dead one's."""
    settings = deps.settings
    pipe = deps.redis.pipeline(transaction=True)
    key = instance_key(settings.redis_prefix, settings.instance_id)
    pipe.set(key, token, px=int(settings.instance_ttl_s * 1000))
    pipe.sadd(instances_key(settings.redis_prefix), settings.instance_id)
    await pipe.execute()


async def reap_dead_instances(deps: Dependencies) -> None:
    prefix = deps.settings.redis_prefix
    for raw_id in await deps.redis_call(deps.redis.smembers, instances_key(prefix)):
        other = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
        if other == deps.settings.instance_id:
            continue
        if not await deps.redis_call(deps.redis.exists, instance_key(prefix, other)):
            await recover_instance(deps, other)
            await deps.redis_call(deps.redis.srem, instances_key(prefix), other)


async def run(settings: Settings, shutdown: Shutdown) -> None:
    """Run the daemon until shutdown; raises DrainTimeoutError if the drain was cut short."""
    token = secrets.token_hex(8)
    status = watchdog.StatusLine()
    ping_interval_s = watchdog.ping_interval_s(os.environ, os.getpid())
    async with watchdog.pinging(ping_interval_s), contextlib.AsyncExitStack() as stack:
        deps = await shutdown.unless_requested(open_dependencies(stack, settings, status))
        if deps is None:
            return
        status.set("starting: waiting for the instance lease")
        if not await claim_instance_id(deps, token, shutdown):
            return
        status.set("starting: recovering")
        await recover_instance(deps, settings.instance_id)
        await admin.start(stack, deps)
        watchdog.notify("READY=1")
        log.info("daemon_ready", instance=settings.instance_id, accounts=sorted(deps.senders))
        try:
            await _serve(deps, token, shutdown, status)
        except TimeoutError:
            log.error("drain_cut_short", timeout_s=settings.drain_timeout_s)
            raise DrainTimeoutError from None
        await deps.redis_call(
            deps.redis.delete, instance_key(settings.redis_prefix, settings.instance_id)
        )
        log.info("drain_finished")


async def _serve(
    deps: Dependencies, token: str, shutdown: Shutdown, status: watchdog.StatusLine
) -> None:
    async with shutdown.deadline(deps.settings.drain_timeout_s), asyncio.TaskGroup() as outer:
        work_done = asyncio.Event()
        writers = [
            outer.create_task(deps.outcomes.run(), name="outcomes"),
            outer.create_task(deps.receipts.run(), name="receipts"),
        ]
        outer.create_task(keep_instance_alive(deps, token, work_done), name="heartbeat")
        outer.create_task(watch_dependencies(deps, status, work_done), name="health")
        async with asyncio.TaskGroup() as producers:
            producers.create_task(intake.run(deps, shutdown), name="intake")
            producers.create_task(campaigns.run(deps, shutdown), name="campaigns")
            if deps.videos:
                producers.create_task(video_poller.run(deps, shutdown), name="video-poller")
            await _watch_for_drain(deps, shutdown, status)
        deps.outcomes.close()  # producers are done: write the last batch, then return
        deps.receipts.close()
        await asyncio.gather(*writers)
        work_done.set()


async def _watch_for_drain(
    deps: Dependencies, shutdown: Shutdown, status: watchdog.StatusLine
) -> None:
    await shutdown.wait(None, None)
    deps.is_draining = True
    watchdog.notify("STOPPING=1")
    status.set("draining")
    log.info("drain_started")


async def watch_dependencies(
    deps: Dependencies, status: watchdog.StatusLine, work_done: asyncio.Event
) -> None:
    """Probe Redis and PostgreSQL every health_check_interval_s until our work is written:
    /readyz and the STATUS= line follow what answers. The services wait out an outage on
    their own; this only reports it."""
    while not work_done.is_set():
        running = await _probe_dependencies(deps)
        status.set(describe_state(deps, running))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(work_done.wait(), deps.settings.health_check_interval_s)


async def _probe_dependencies(deps: Dependencies) -> int | None:
    """Record which dependency does not answer; return the running campaigns (None: unknown)."""
    settings = deps.settings
    unreachable: set[str] = set()
    running: int | None = None
    try:
        async with asyncio.timeout(settings.redis_socket_timeout_s):
            await deps.redis.ping()
    except REDIS_OUTAGE_ERRORS:
        unreachable.add("redis")
    try:
        async with asyncio.timeout(settings.db_command_timeout_s):  # a busy pool's wait too
            running = len(await ledger.running_campaign_ids(deps.pool))
    except ledger.DB_OUTAGE_ERRORS:
        unreachable.add("postgres")
    deps.unreachable = unreachable
    return running


def describe_state(deps: Dependencies, running: int | None) -> str:
    """The STATUS= line: what the daemon is doing, or what it waits for."""
    if deps.is_draining:
        return "draining"
    if deps.unreachable:
        return "waiting for " + " and ".join(sorted(deps.unreachable))
    if not running:
        return "idle: no running campaign"
    return f"sending: {running} campaign{'' if running == 1 else 's'}"


# Every send allocates a handful of short-lived objects (request, response, outcome), so the
# default gen-0 threshold of 700 runs a collection every few sends, each walking the objects
# the imports left behind. Freezing those and collecting less often cut the daemon's CPU per
# message by about a fifth (bench/throughput.py: 272 -> 212 us). Cycles are still collected.
GC_GEN0_THRESHOLD = 50_000


def _tune_garbage_collector() -> None:
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def serve(settings: Settings) -> int:
    """Run the daemon in a new event loop, SIGTERM/SIGINT wired to a drain; return the exit code."""
    try:
        import uvloop

        runner: Callable[[Awaitable[None]], None] = uvloop.run  # type: ignore[assignment]
    except ImportError:
        runner = asyncio.run  # type: ignore[assignment]

    async def main() -> None:
        _tune_garbage_collector()
        shutdown = Shutdown()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, shutdown.request)
        try:
            await run(settings, shutdown)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    try:
        runner(main())
    except DrainTimeoutError:
        return 1
    return 0
