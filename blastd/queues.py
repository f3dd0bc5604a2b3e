"""The Redis lists a job passes through: the queue, each processing list, the dead letters."""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.exceptions
import structlog
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline

from blastd import metrics
from blastd.errors import InvalidJobError
from blastd.redis_client import RedisClient
from blastd.resources import Dependencies

log = structlog.get_logger()


def jobs_key(prefix: str) -> str:
    return f"{prefix}jobs"


def processing_key(prefix: str, instance_id: str) -> str:
    return f"{prefix}processing:{instance_id}"


def dead_key(prefix: str) -> str:
    return f"{prefix}dead"


def deliveries_key(prefix: str, raw: bytes) -> str:
    return f"{prefix}deliveries:{hashlib.sha1(raw).hexdigest()}"


async def dead_letter(deps: Dependencies, raw: bytes, reason: str, job_id: str | None) -> None:
    """Keep the original payload with a one-line reason in {prefix}dead."""
    entry: dict[str, object] = {
        "reason": reason,
        "job_id": job_id,
        "dead_at": datetime.now(UTC).isoformat(),
        "instance": deps.settings.instance_id,
    }
    try:
        entry["payload"] = raw.decode()
    except UnicodeDecodeError:
        entry["payload_base64"] = base64.b64encode(raw).decode()
    await deps.redis_call(
        deps.redis.lpush, dead_key(deps.settings.redis_prefix), orjson.dumps(entry)
    )
    metrics.JOBS_DEAD_LETTERED.inc()
    log.error("job_dead_lettered", reason=reason, job_id=job_id, payload_bytes=len(raw))


@dataclass(frozen=True, slots=True)
class DeadEntry:
    """One dead-letter entry as stored. `index` counts from the oldest entry (0), so entries
    that die later do not renumber it; a requeue renumbers the entries after it."""

    index: int
    raw: bytes

    @property
    def fields(self) -> dict[str, Any]:
        try:
            value = orjson.loads(self.raw)
        except orjson.JSONDecodeError:
            value = None
        return value if isinstance(value, dict) else {}

    def payload(self) -> bytes | None:
        """The original job bytes, base64 entries decoded; None if the entry holds none."""
        fields = self.fields
        if isinstance(fields.get("payload"), str):
            return str(fields["payload"]).encode()
        try:
            return base64.b64decode(str(fields["payload_base64"]), validate=True)
        except (KeyError, binascii.Error):
            return None


async def list_dead(redis_client: RedisClient, prefix: str, limit: int) -> list[DeadEntry]:
    """The `limit` most recent dead-letter entries, newest first."""
    pipe = redis_client.pipeline(transaction=True)  # length and entries from one moment
    pipe.llen(dead_key(prefix))
    pipe.lrange(dead_key(prefix), 0, limit - 1)
    length, raws = await pipe.execute()
    return [DeadEntry(length - 1 - position, raw) for position, raw in enumerate(raws)]


async def read_dead(redis_client: RedisClient, prefix: str, index: int) -> DeadEntry | None:
    raw = await redis_client.lindex(dead_key(prefix), -(index + 1))
    return None if raw is None else DeadEntry(index, _as_bytes(raw))


async def requeue_dead(redis_client: RedisClient, prefix: str, index: int) -> DeadEntry | None:
    """Move entry `index`'s original payload back onto {prefix}jobs and drop the entry, both or
    neither (WATCH/MULTI); None when there is no such entry."""
    async with redis_client.pipeline(transaction=True) as pipe:
        while True:
            try:
                entry = await _move_dead(pipe, prefix, index)
            except redis.exceptions.WatchError:
                continue  # the list changed between the read and the move: read again
            if entry is not None:
                log.info("dead_job_requeued", index=index, job_id=entry.fields.get("job_id"))
            return entry


async def _move_dead(pipe: Pipeline | ClusterPipeline, prefix: str, index: int) -> DeadEntry | None:
    key = dead_key(prefix)
    await pipe.watch(key)
    raw = await pipe.lindex(key, -(index + 1))
    if raw is None:
        return None
    entry = DeadEntry(index, _as_bytes(raw))
    payload = entry.payload()
    if payload is None:
        raise InvalidJobError(f"dead-letter entry {index} holds no payload")
    pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
    pipe.lpush(jobs_key(prefix), payload)
    pipe.lrem(key, -1, entry.raw)  # type: ignore[arg-type]  # sent as they are; -1: oldest end
    await pipe.execute()
    return entry


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


async def requeue_all_dead(redis_client: RedisClient, prefix: str) -> int:
    """Requeue the entries present now, oldest first; ones that die again are left for later."""
    count = 0
    for _ in range(await redis_client.llen(dead_key(prefix))):
        if await requeue_dead(redis_client, prefix, 0) is None:
            break
        count += 1
    return count


async def recover_processing(deps: Dependencies, instance_id: str) -> int:
    """Put jobs a dead instance had taken back at the consuming end of the jobs list, in order."""
    prefix = deps.settings.redis_prefix
    moved = 0
    while await deps.redis_call(
        deps.redis.lmove, processing_key(prefix, instance_id), jobs_key(prefix), "LEFT", "RIGHT"
    ):
        moved += 1
    return moved
