"""The Redis lists a job passes through: the queue, each processing list, the dead letters.

A job is taken again when the daemon that held it died. Whether that counts against the job
is decided from what Redis holds about its earlier takes, by the sha1 of its bytes:

- {prefix}deliveries:<sha1> counts the takes held against the job, the current one included.
- {prefix}progress:<sha1> holds "pages:furthest": how far into the campaign's recipient pages
  the current take has got (one SET per page, a few thousand rows each; counted from the
  campaign's first page, so a take that carries on an unfinished intake starts where the
  ledger stands), and the furthest any earlier take of the job got before it died.

A take that finds progress left behind knows its predecessor died. If that take staged more
pages than every take before it, the job was moving and something outside it (a kill, an
OOM elsewhere, a deploy) stopped the daemon: the new take is free. Otherwise it died at or
before a point reached already, the way a job that itself kills the daemon does, and the new
take counts. The first take always counts. A job whose counted takes exceed
`max_job_deliveries` is dead-lettered as poison. Progress is bounded by the job's pages, so
free takes are too, and a job killed at the same point every time always ends as poison.
Kills that all land before the first page is staged look like a job that dies at its start,
and count. Both keys go once the job is in the ledger or dead; they expire after a day.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator
from contextvars import ContextVar
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
from blastd.job_fields import id_problem
from blastd.redis_client import RedisClient
from blastd.resources import Dependencies

log = structlog.get_logger()
TAKE_TTL_S = 86_400  # a job not taken again within a day starts its count afresh


def jobs_key(prefix: str) -> str:
    return f"{prefix}jobs"


def processing_key(prefix: str, instance_id: str) -> str:
    return f"{prefix}processing:{instance_id}"


def dead_key(prefix: str) -> str:
    return f"{prefix}dead"


def deliveries_key(prefix: str, raw: bytes) -> str:
    return f"{prefix}deliveries:{hashlib.sha1(raw).hexdigest()}"


def progress_key(prefix: str, raw: bytes) -> str:
    return f"{prefix}progress:{hashlib.sha1(raw).hexdigest()}"


@dataclass(frozen=True, slots=True)
class Take:
    """One take of a job, as the module docstring counts it."""

    progress_key: str
    deliveries: int  # takes counted against the job, this one included
    furthest_pages: int  # the most pages an earlier take staged


_current_take: ContextVar[Take | None] = ContextVar("blastd_current_take", default=None)


async def count_take(redis_client: RedisClient, prefix: str, raw: bytes) -> Take:
    """Record a new take of `raw` and say how many takes count against it (module docstring)."""
    key = progress_key(prefix, raw)
    left = await redis_client.get(key)
    pages, furthest = _decode_progress(left)
    counts = pages <= furthest  # no further than before: this take is the job's fault
    furthest = max(pages, furthest)
    deliveries = deliveries_key(prefix, raw)
    pipe = redis_client.pipeline(transaction=True)
    if counts:
        pipe.incr(deliveries)
    else:
        pipe.get(deliveries)
    pipe.expire(deliveries, TAKE_TTL_S)
    pipe.set(key, _encode_progress(0, furthest), ex=TAKE_TTL_S)
    answer, _, _ = await pipe.execute()
    take = Take(key, int(answer or 0), furthest)
    if left is not None:  # an earlier take died holding the job
        log.warning(
            "job_taken_again",
            deliveries=take.deliveries,
            counted=counts,
            last_take_pages=pages,
            furthest_pages=furthest,
        )
    return take


def _decode_progress(value: bytes | str | None) -> tuple[int, int]:
    """(pages, furthest) of the last take; (0, 0) when there was none or it is unreadable."""
    try:
        pages, furthest = _as_bytes(value or b"0:0").split(b":")
        return int(pages), int(furthest)
    except ValueError:
        return 0, 0


def _encode_progress(pages: int, furthest: int) -> str:
    return f"{pages}:{furthest}"


@contextlib.contextmanager
def taking(take: Take) -> Iterator[None]:
    """Make `take` the one record_progress marks while its job is accepted (this task only)."""
    token = _current_take.set(take)
    try:
        yield
    finally:
        _current_take.reset(token)


async def record_progress(redis_client: RedisClient, pages: int) -> None:
    """Mark that the current take has staged `pages` pages; nothing outside a take."""
    take = _current_take.get()
    if take is not None:
        value = _encode_progress(pages, take.furthest_pages)
        await redis_client.set(take.progress_key, value, ex=TAKE_TTL_S)


async def finish_take(redis_client: RedisClient, prefix: str, instance: str, raw: bytes) -> None:
    """The job is in the ledger or dead: drop it from the processing list and forget its takes."""
    pipe = redis_client.pipeline(transaction=True)
    pipe.lrem(processing_key(prefix, instance), 1, raw)  # type: ignore[arg-type]  # bytes are sent as they are
    pipe.delete(deliveries_key(prefix, raw), progress_key(prefix, raw))
    await pipe.execute()


def readable_job_id(raw: bytes, max_bytes: int) -> str | None:
    """The job's id if its bytes are a JSON object with a valid one, read best-effort (a
    payload over the job size limit is not parsed: it may be what killed the daemon)."""
    if len(raw) > max_bytes:
        return None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    job_id = data.get("id") if isinstance(data, dict) else None
    if isinstance(job_id, str) and id_problem(job_id) is None:
        return job_id
    return None


@dataclass(frozen=True, slots=True)
class Requeue:
    """Where a requeue puts a payload that did not come from {prefix}jobs: SET `key` (for
    `ttl_s`) to the payload, then LPUSH `member` onto `queue`. A video:job record goes back to
    its key and the video poll queue, where the producer put it."""

    key: str
    queue: str
    member: str
    ttl_s: int


async def dead_letter(
    deps: Dependencies, raw: bytes, reason: str, job_id: str | None, requeue: Requeue | None = None
) -> None:
    """Keep the original payload with a one-line reason in {prefix}dead, and the job's id
    whenever the payload has a readable one; `requeue` when it came from elsewhere."""
    if job_id is None:
        job_id = readable_job_id(raw, deps.settings.max_job_bytes)
    entry: dict[str, object] = {
        "reason": reason,
        "job_id": job_id,
        "dead_at": datetime.now(UTC).isoformat(),
        "instance": deps.settings.instance_id,
    }
    if requeue is not None:
        entry["requeue"] = dataclasses.asdict(requeue)
    try:
        entry["payload"] = raw.decode()
    except UnicodeDecodeError:
        entry["payload_base64"] = base64.b64encode(raw).decode()
    await deps.redis_call(
        deps.redis.lpush, dead_key(deps.settings.redis_prefix), orjson.dumps(entry)
    )
    metrics.JOBS_DEAD_LETTERED.inc()
    log.error("job_dead_lettered", reason=reason, job_id=job_id, payload_bytes=len(raw))
    await discard_recipients_key(deps, _recipients_key_of(raw))


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

    def requeue(self) -> Requeue | None:
        """Where the payload goes back to when not {prefix}jobs; None for a job from there."""
        value = self.fields.get("requeue")
        if not isinstance(value, dict):
            return None
        try:
            return Requeue(
                str(value["key"]), str(value["queue"]), str(value["member"]), int(value["ttl_s"])
            )
        except (KeyError, TypeError, ValueError):
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
    requeue = entry.requeue()
    pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
    if requeue is None:
        pipe.lpush(jobs_key(prefix), payload)
    else:
        pipe.set(requeue.key, payload, ex=requeue.ttl_s)
        pipe.lpush(requeue.queue, requeue.member)
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


async def find_dead(redis_client: RedisClient, prefix: str, job_id: str) -> DeadEntry | None:
    """The newest dead-letter entry of the job with this id, if any."""
    raws = await redis_client.lrange(dead_key(prefix), 0, -1)
    for position, raw in enumerate(raws):
        entry = DeadEntry(len(raws) - 1 - position, _as_bytes(raw))
        if entry.fields.get("job_id") == job_id:
            return entry
    return None


async def discard_recipients_key(deps: Dependencies, key: str | None) -> None:
    """Delete the recipients list of a job that will never be admitted: it holds phone
    numbers and has no expiry. Never one of blastd's own keys but the recipients lists."""
    prefix = deps.settings.redis_prefix
    if not key or (key.startswith(prefix) and not key.startswith(f"{prefix}recipients:")):
        return
    answer = await deps.redis_call(deps.redis.type, key)
    if (answer.decode() if isinstance(answer, bytes) else answer) == "list":
        await deps.redis_call(deps.redis.delete, key)
        log.info("recipients_list_discarded", recipients_key=key)


def _recipients_key_of(raw: bytes) -> str | None:
    """The recipients_key a payload names, read leniently: it may be a broken job."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    key = value.get("recipients_key") if isinstance(value, dict) else None
    return key if isinstance(key, str) else None
