"""The health probe: which dependency answers, shown on /readyz and in systemd's STATUS= line."""

from __future__ import annotations

import asyncio
import contextlib

from blastd import ledger, outages, watchdog
from blastd.errors import PostgresUnavailableError, RedisUnavailableError
from blastd.resources import Dependencies


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
            await outages.on_redis(deps.redis.ping)
    except (RedisUnavailableError, TimeoutError):
        unreachable.add("redis")
    try:
        async with asyncio.timeout(settings.db_command_timeout_s):  # a busy pool's wait too
            running = len(await outages.on_postgres(ledger.running_campaign_ids, deps.pool))
    except (PostgresUnavailableError, TimeoutError):
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
