"""The instance lease: hold this daemon's id in Redis, and take back the work of an expired one."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from blastd import ledger, queues
from blastd.resources import Dependencies
from blastd.shutdown import Shutdown
from blastd.video import ledger as video_ledger

log = structlog.get_logger()


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
    jobs = await queues.recover_processing(deps, instance_id)
    # In doubt, never resent here: reconciliation waits for their receipts first.
    uncertain = await deps.db(ledger.recover_owned, instance_id)
    renders = await deps.db(video_ledger.recover_renders, instance_id)
    if jobs or renders or uncertain:
        log.warning(
            "instance_recovered",
            instance=instance_id,
            jobs=jobs,
            renders=renders,
            uncertain=uncertain,
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
