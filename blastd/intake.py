"""Reliable intake: BLMOVE into a per-instance processing list, then ledger or dead-letter."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis
import redis.exceptions
import structlog
from redis.asyncio.client import Pipeline
from structlog.contextvars import bound_contextvars

from blastd import controls, ledger, metrics, status_intake, video_intake
from blastd.errors import InvalidJobError, InvalidNumberError
from blastd.jobs import BlastJob, ControlJob, StatusJob, missing_variables, parse_job
from blastd.recipients import (
    BadEntry,
    RecipientIn,
    normalize_number,
    stream_recipients_key,
    time_zone_of,
)
from blastd.video_jobs import VideoBlastJob, VideoPollJob

if TYPE_CHECKING:
    from blastd.daemon import Dependencies, Shutdown

log = structlog.get_logger()
DELIVERIES_TTL_S = 86_400


def jobs_key(prefix: str) -> str:
    return f"{prefix}jobs"


def processing_key(prefix: str, instance_id: str) -> str:
    return f"{prefix}processing:{instance_id}"


def dead_key(prefix: str) -> str:
    return f"{prefix}dead"


def deliveries_key(prefix: str, raw: bytes) -> str:
    return f"{prefix}deliveries:{hashlib.sha1(raw).hexdigest()}"


async def run(deps: Dependencies, shutdown: Shutdown) -> None:
    """Take jobs until shutdown is requested; each one is in the ledger or dead before it leaves."""
    settings = deps.settings
    source, processing = jobs_key(settings.redis_prefix), deps.processing_key
    while not shutdown.is_requested:
        raw = await deps.redis_call(
            deps.redis.blmove,
            source,
            processing,
            settings.intake_block_s,  # type: ignore[arg-type]  # Redis takes fractional seconds
            "RIGHT",
            "LEFT",
        )
        if isinstance(raw, bytes):
            await handle_job(deps, raw)


async def handle_job(deps: Dependencies, raw: bytes) -> None:
    """Accept one job into the ledger or dead-letter it, then drop it from the processing list."""
    metrics.JOBS_TAKEN.inc()
    prefix = deps.settings.redis_prefix
    deliveries = await deps.redis_call(deps.redis.incr, deliveries_key(prefix, raw))
    await deps.redis_call(deps.redis.expire, deliveries_key(prefix, raw), DELIVERIES_TTL_S)
    try:
        if deliveries > deps.settings.max_job_deliveries:
            raise InvalidJobError(f"job was taken {deliveries - 1} times without finishing")
        # An outage mid-way rolls the campaign's transaction back; the job is accepted again
        # once Redis and PostgreSQL answer, rather than dead-lettered as if it were broken.
        await deps.outage_call(accept_job, deps, raw)
    except InvalidJobError as exc:
        await dead_letter(deps, raw, exc.reason, exc.job_id)
    except Exception as exc:  # a bug must not take the daemon down with every later job
        log.exception("job_crashed", error=type(exc).__name__)
        await dead_letter(deps, raw, f"internal error: {type(exc).__name__}", None)
    pipe = deps.redis.pipeline(transaction=True)
    pipe.lrem(deps.processing_key, 1, raw)  # type: ignore[arg-type]  # bytes are sent as they are
    pipe.delete(deliveries_key(prefix, raw))
    await deps.redis_call(pipe.execute)


async def accept_job(deps: Dependencies, raw: bytes) -> None:
    """Act on one job by its type: a blast or a status becomes a campaign, a control is applied."""
    settings = deps.settings
    job = parse_job(
        raw,
        max_bytes=settings.max_job_bytes,
        accounts=settings.accounts.keys(),
        max_inline_recipients=settings.max_inline_recipients,
        default_region=settings.default_region,
        video_accounts=deps.videos.keys(),
    )
    if isinstance(job, ControlJob):
        await controls.apply_control_job(deps, job)
    elif isinstance(job, StatusJob):
        await status_intake.accept_status(deps, job)
    elif isinstance(job, VideoBlastJob):
        await video_intake.accept_video_blast(deps, job)
    elif isinstance(job, VideoPollJob):
        await video_intake.accept_video_poll(deps, job)
    else:
        await _accept_blast(deps, job)


async def _accept_blast(deps: Dependencies, job: BlastJob) -> None:
    campaign = ledger.NewCampaign(
        id=job.id,
        type="blast",
        account=job.account,
        message=job.message.model_dump(mode="json"),
        options=job.options.model_dump(mode="json", exclude_none=True),
    )
    await accept_campaign(deps, job, campaign)


async def accept_campaign(
    deps: Dependencies, job: BlastJob | VideoBlastJob, campaign: ledger.NewCampaign
) -> None:
    """Insert a campaign with the job's recipients, unless its id was taken before."""
    with bound_contextvars(job_id=job.id, campaign_id=job.id, account=job.account):
        if await deps.db_call(ledger.campaign_exists, deps.pool, job.id):
            log.info("job_duplicate")
            return
        counts = await deps.db_call(_insert_campaign, deps, job, campaign)
        if counts is None:
            log.info("job_duplicate")
            return
        if job.recipients_key:
            await deps.redis_call(deps.redis.delete, job.recipients_key)
        log.info("campaign_created", pending=counts.pending, skipped=counts.skipped)
        metrics.count_recipients(job.account, "skipped", counts.skipped)
        deps.campaigns_changed.set()


async def _insert_campaign(
    deps: Dependencies, job: BlastJob | VideoBlastJob, campaign: ledger.NewCampaign
) -> ledger.CampaignCounts | None:
    async with ledger.transaction(deps.pool) as conn:
        counts = await ledger.insert_campaign(conn, campaign, staged_pages(deps, job))
        if counts is not None and counts.pending == 0:
            raise InvalidJobError("no valid recipient", job.id)  # rolls the campaign back
        return counts


async def staged_pages(
    deps: Dependencies, job: BlastJob | VideoBlastJob
) -> AsyncIterator[Sequence[ledger.StagedRecipient]]:
    settings = deps.settings
    entries: AsyncIterator[Sequence[RecipientIn | BadEntry]]
    if job.recipients is not None:
        entries = _inline_pages(job.recipients, settings.recipients_page_size)
    else:
        assert job.recipients_key is not None  # parse_job guarantees one of the two
        _check_recipients_key(job.recipients_key, settings.redis_prefix, job.id)
        await _check_is_list(deps, job.recipients_key, job.id)
        entries = stream_recipients_key(
            deps.redis, job.recipients_key, settings.recipients_page_size
        )
    seq = 0
    async for page in entries:
        staged = []
        for entry in page:
            staged.append(stage_recipient(job, seq, entry, settings.default_region))
            seq += 1
        if seq > settings.max_recipients:
            raise InvalidJobError(f"more than {settings.max_recipients} recipients", job.id)
        yield staged
    if seq == 0:
        raise InvalidJobError(f"recipients_key {job.recipients_key!r} is empty or missing", job.id)


async def _inline_pages(
    recipients: list[RecipientIn], size: int
) -> AsyncIterator[Sequence[RecipientIn | BadEntry]]:
    for start in range(0, len(recipients), size):
        yield recipients[start : start + size]


def _check_recipients_key(key: str, prefix: str, job_id: str) -> None:
    """The list is deleted once read, so it must not be one of blastd's own keys."""
    if key.startswith(prefix) and not key.startswith(f"{prefix}recipients:"):
        raise InvalidJobError(f"recipients_key {key[:60]!r} names one of blastd's own keys", job_id)


async def _check_is_list(deps: Dependencies, key: str, job_id: str) -> None:
    """A key of another type is the producer's mistake, not a crash: say so in the reason."""
    answer = await deps.redis_call(deps.redis.type, key)
    kind = answer.decode() if isinstance(answer, bytes) else answer
    if kind not in ("list", "none"):
        raise InvalidJobError(f"recipients_key {key[:60]!r} is a {kind}, not a list", job_id)


def stage_recipient(
    job: BlastJob | VideoBlastJob, seq: int, entry: RecipientIn | BadEntry, region: str
) -> ledger.StagedRecipient:
    """Normalise one entry; an unusable one is kept as a skipped row with its reason."""
    if isinstance(entry, BadEntry):
        return ledger.StagedRecipient(seq, entry.raw_preview, None, entry.reason)
    recipient = entry
    try:
        phone = normalize_number(recipient.to, region)
    except InvalidNumberError as exc:
        return ledger.StagedRecipient(seq, recipient.to[:64], None, exc.reason)
    if isinstance(job, BlastJob):
        missing = missing_variables(job.message, recipient.vars)
    else:
        missing = job.missing_variables(recipient.vars)
    if missing:
        reason = "missing variable: " + ", ".join(sorted(missing))
        return ledger.StagedRecipient(seq, phone, recipient.vars or None, reason)
    window = job.options.window if isinstance(job, BlastJob) else None
    time_zone = time_zone_of(phone) if window else None
    return ledger.StagedRecipient(seq, phone, recipient.vars or None, None, time_zone)


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


async def list_dead(redis_client: aioredis.Redis, prefix: str, limit: int) -> list[DeadEntry]:
    """The `limit` most recent dead-letter entries, newest first."""
    pipe = redis_client.pipeline(transaction=True)  # length and entries from one moment
    pipe.llen(dead_key(prefix))
    pipe.lrange(dead_key(prefix), 0, limit - 1)
    length, raws = await pipe.execute()
    return [DeadEntry(length - 1 - position, raw) for position, raw in enumerate(raws)]


async def read_dead(redis_client: aioredis.Redis, prefix: str, index: int) -> DeadEntry | None:
    raw = await redis_client.lindex(dead_key(prefix), -(index + 1))
    return None if raw is None else DeadEntry(index, _as_bytes(raw))


async def requeue_dead(redis_client: aioredis.Redis, prefix: str, index: int) -> DeadEntry | None:
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


async def _move_dead(pipe: Pipeline, prefix: str, index: int) -> DeadEntry | None:
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


async def requeue_all_dead(redis_client: aioredis.Redis, prefix: str) -> int:
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
