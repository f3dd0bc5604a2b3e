"""Dependencies: the Redis client, the ledger pool and the accounts every service shares.

They are opened in dependency order on the daemon's exit stack and closed in reverse. Calls
through `Dependencies` wait out an outage of Redis or PostgreSQL instead of failing: the
services keep their place, and carry on once the server answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

import aiohttp
import asyncpg
import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, wait_fixed

from blastd import ledger, metrics, outages
from blastd.batches import BatchWriter
from blastd.config import AccountSettings, Settings, VideoAccountSettings
from blastd.errors import UnavailableError
from blastd.pacing import AccountPacer, Pacer
from blastd.providers.registry import build_provider
from blastd.providers.video.accounts import VideoAccount, open_video_account
from blastd.redis_client import RedisClient, open_redis
from blastd.sender import Sender
from blastd.shared_pacing import SharedPacer

log = structlog.get_logger()
P = ParamSpec("P")
T = TypeVar("T")


class Db:
    """The ledger pool behind one outage-aware handle: `await deps.db(ledger.fn, *args)` runs
    `ledger.fn(pool, *args)`, waiting out a PostgreSQL outage instead of failing."""

    def __init__(self, pool: ledger.Pool, retry_s: float) -> None:
        self.pool = pool
        self._retry_s = retry_s

    async def __call__(
        self,
        fn: Callable[Concatenate[ledger.Pool, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        translated = on_primary(self.pool, outages.on_postgres)
        return await wait_out_outage(self._retry_s, translated, fn, self.pool, *args, **kwargs)


@dataclass
class Dependencies:
    """Everything the services share, opened in order and closed in reverse."""

    settings: Settings
    redis: RedisClient
    db: Db
    senders: dict[str, Sender]  # the messaging accounts
    video_accounts: dict[str, VideoAccount]  # the video-generation accounts
    outcomes: BatchWriter[ledger.Outcome]
    receipts: BatchWriter[ledger.Receipt]
    campaigns_changed: asyncio.Event = field(default_factory=asyncio.Event)
    is_draining: bool = False
    unreachable: set[str] = field(default_factory=set)  # what the last health probe missed

    @property
    def pool(self) -> ledger.Pool:
        return self.db.pool

    async def redis_call(
        self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run a Redis command, waiting out an outage instead of failing."""
        retry_s = self.settings.dependency_retry_s
        return await wait_out_outage(retry_s, outages.on_redis, fn, *args, **kwargs)

    async def outage_call(
        self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run work that uses Redis and PostgreSQL both, waiting out an outage of either; the
        work must leave nothing behind when cut short (a transaction), so it can run again."""
        retry_s = self.settings.dependency_retry_s
        translated = on_primary(self.pool, outages.on_either)
        return await wait_out_outage(retry_s, translated, fn, *args, **kwargs)


def on_primary(
    pool: ledger.Pool, translated: Callable[..., Awaitable[T]]
) -> Callable[..., Awaitable[T]]:
    """`translated`, which also drops the pool's connections when a write reached a standby:
    the pool makes new ones, and a multi-host DSN with target_session_attrs=read-write (or
    the next try after a promotion) finds the primary. Without this, the retries would reuse
    the same standby connections for ever."""

    async def call(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        try:
            return await translated(fn, *args, **kwargs)
        except UnavailableError as exc:
            if isinstance(exc.__cause__, asyncpg.ReadOnlySQLTransactionError):
                log.warning("postgres_standby_dropped", error=outages.describe(exc.__cause__))
                await pool.expire_connections()
            raise

    return call


async def wait_out_outage(
    retry_s: float,
    translated: Callable[..., Awaitable[T]],
    fn: Callable[..., Awaitable[T]],
    *args: Any,
    **kwargs: Any,
) -> T:
    """Call `translated(fn, *args)` until it does not raise UnavailableError, every `retry_s`.
    The outage is logged at once, then at most every OUTAGE_LOG_INTERVAL_S; its end once."""
    waited_for: set[str] = set()
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(UnavailableError),
            wait=wait_fixed(retry_s),
            before_sleep=lambda state: _log_outage(state, waited_for),
        ):
            with attempt:
                result = await translated(fn, *args, **kwargs)
                for dependency in waited_for:
                    _log_recovery(dependency)
                return result
    finally:
        for dependency in waited_for:
            _stop_waiting(dependency)
    raise AssertionError("unreachable: the retry loop never stops on its own")


# Outage lines: the first at once, then one per interval with the count of failed attempts
# across every caller, not one per caller per retry (a Redis outage used to log twice a second).
OUTAGE_LOG_INTERVAL_S = 30.0


@dataclass
class _Outage:
    since_s: float
    logged_s: float
    attempts: int = 0
    waiters: int = 0  # retry loops waiting it out; the last to stop unrecovered forgets it


_outages: dict[str, _Outage] = {}  # by dependency, while it is away


def _log_outage(state: Any, waited_for: set[str]) -> None:
    """Note a failed attempt; log it when the outage is new or the interval has passed."""
    exc = state.outcome.exception() if state.outcome else None
    dependency = str(getattr(exc, "dependency", "a dependency"))
    now = time.monotonic()
    outage = _outages.get(dependency)
    is_new = outage is None
    if outage is None:
        outage = _outages[dependency] = _Outage(since_s=now, logged_s=now)
    if dependency not in waited_for:
        waited_for.add(dependency)
        outage.waiters += 1
    outage.attempts += 1
    if not is_new and now - outage.logged_s < OUTAGE_LOG_INTERVAL_S:
        return
    outage.logged_s = now
    log.warning(
        "dependency_unavailable",
        dependency=dependency,
        attempts=outage.attempts,
        down_s=round(now - outage.since_s, 1),
        error=str(exc) if exc is not None else None,
    )


def _stop_waiting(dependency: str) -> None:
    """A loop that ends without seeing the recovery (cancelled at shutdown) lets go of it."""
    outage = _outages.get(dependency)
    if outage is not None:
        outage.waiters -= 1
        if outage.waiters <= 0:
            del _outages[dependency]


def _log_recovery(dependency: str) -> None:
    """The first caller through after an outage says how long it lasted."""
    outage = _outages.pop(dependency, None)
    if outage is not None:
        down_s = round(time.monotonic() - outage.since_s, 1)
        log.warning(
            "dependency_recovered", dependency=dependency, down_s=down_s, attempts=outage.attempts
        )


async def open_dependencies(
    stack: contextlib.AsyncExitStack, settings: Settings, report: Callable[[str], None]
) -> Dependencies:
    """Connect to Redis and PostgreSQL (waiting for them), migrate, build the senders;
    `report` hears what start-up waits for."""
    client = await stack.enter_async_context(
        open_redis(
            settings,
            socket_connect_timeout=settings.redis_socket_timeout_s,
            health_check_interval=10,
        )
    )
    retry_s = settings.dependency_retry_s
    report("starting: waiting for redis")
    await wait_out_outage(retry_s, outages.on_redis, client.ping)
    report("starting: waiting for postgres")
    pool = await wait_out_outage(
        retry_s,
        outages.on_postgres,
        ledger.open_pool,
        settings.database_url,
        command_timeout_s=settings.db_command_timeout_s,
        keep_open=True,
    )
    stack.push_async_callback(pool.close)
    applied = await ledger.migrate(pool)
    if applied:
        log.info("ledger_migrated", files=applied)
    deps = Dependencies(
        settings=settings,
        redis=client,
        db=Db(pool, retry_s),
        senders={},
        video_accounts={},
        outcomes=_writer("outcomes", ledger.record_outcomes, pool, settings),
        receipts=_writer("receipts", _apply_receipts, pool, settings),
    )
    for name, account in settings.accounts.items():
        http = await stack.enter_async_context(_http_session(account.concurrency))
        if isinstance(account, VideoAccountSettings):
            deps.video_accounts[name] = open_video_account(name, account, http)
            continue
        provider = build_provider(name, account, http)
        deps.senders[name] = Sender(name, account, provider, _account_pacer(deps, name, account))
    return deps


async def _apply_receipts(pool: ledger.Pool, receipts: Sequence[ledger.Receipt]) -> None:
    """Write a batch of receipts; count (and now and then log) those that matched nobody."""
    applied = await ledger.apply_receipts_reporting(pool, receipts)
    by_account = Counter(receipt.account for receipt in applied.unmatched)
    for account, count in by_account.items():
        metrics.UNMATCHED_RECEIPTS.count(account, "unknown_message", count)


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
        lambda items: on_primary(pool, outages.on_postgres)(write, pool, items),
        flush_rows=settings.outcome_flush_rows,
        flush_interval_s=settings.outcome_flush_interval_s,
        retry_s=settings.dependency_retry_s,
    )
