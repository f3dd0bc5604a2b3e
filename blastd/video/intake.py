"""Video jobs into the ledger: a video_blast becomes a campaign of pending renders, a video_poll
a campaign of one chat whose render is already under way."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from structlog.contextvars import bound_contextvars

from blastd import admission, ledger
from blastd.errors import InvalidJobError
from blastd.job_fields import Limits
from blastd.recipients import normalize_number
from blastd.video import conversations
from blastd.video import ledger as video_ledger
from blastd.video import schedule as video_schedule
from blastd.video.jobs import VideoBlastJob, VideoPollJob, parse_video_poll

if TYPE_CHECKING:
    from blastd.resources import Dependencies

log = structlog.get_logger()


async def accept_video_blast(deps: Dependencies, job: VideoBlastJob) -> None:
    campaign = ledger.NewCampaign(
        id=job.id,
        type="video_blast",
        account=job.account,
        message={
            "video": job.video.model_dump(mode="json"),
            # A timed-out render gets the same notice as a failed one.
            "message": {
                **job.message.model_dump(mode="json"),
                "timeout_notice": job.message.failure_notice,
            },
        },
        options=job.options.model_dump(mode="json", exclude_none=True),
    )
    await admission.accept_campaign(deps, job, campaign)


async def accept_video_poll(deps: Dependencies, job: VideoPollJob) -> int | None:
    """Record the job's campaign and schedule its first poll; the recipient's ledger id, or
    None for a job id seen before."""
    settings = deps.settings
    started_at = job.started_at or datetime.now(UTC)
    notify = job.notify
    campaign = ledger.NewCampaign(
        id=job.id,
        type="video_poll",
        account=notify.account,
        message={
            "video": {"account": job.account, "job_id": job.job_id, "status_url": job.status_url},
            "message": {
                "caption": notify.caption,
                "fallback_text": notify.fallback_text,
                "failure_notice": notify.failure_text,
                "timeout_notice": notify.timeout_text,
            },
        },
        options={},
    )
    phone = normalize_number(notify.to, settings.default_region)  # checked by parse_job
    with bound_contextvars(job_id=job.id, campaign_id=job.id, video_job_id=job.job_id):
        async with ledger.transaction(deps.pool) as conn:
            ledger_id = await video_ledger.insert_poll_campaign(
                conn, campaign, phone, job.job_id, started_at
            )
        if ledger_id is None:
            log.info("job_duplicate")
            return None
        state = _poll_state(job, ledger_id, started_at)
        await video_schedule.schedule(deps, state, settings.video.first_poll_s)
        log.info("campaign_created", pending=1, skipped=0)
        deps.campaigns_changed.set()
        return ledger_id


async def adopt_external_job(
    deps: Dependencies, job_id: str, raw: bytes
) -> video_schedule.PollState:
    """A `video:job:{id}` written by an external producer (docs/video.md) becomes a campaign
    like a video_poll taken from the jobs list. Its JSON is a video_poll job (type and id may
    be left out; job_id defaults to the key's id), or the earlier worker's record
    {"jobId", "conversationId", "startTime" (epoch ms), "metadata"}, whose chat the
    conversation resolver names. Raises InvalidJobError if it is neither. Returns the state to
    poll it with now."""
    data: dict[str, Any] = orjson.loads(raw)
    if not isinstance(data, dict):
        raise InvalidJobError("the record is not a JSON object")
    if "conversationId" in data:
        data = await _from_worker_record(deps, data)
    data = {"type": "video_poll", "id": job_id, "job_id": job_id, **data}
    settings = deps.settings
    limits = Limits(
        settings.accounts.keys(),
        settings.max_inline_recipients,
        settings.default_region,
        deps.video_accounts.keys(),
    )
    job = parse_video_poll(data, limits)
    ledger_id = await accept_video_poll(deps, job)
    if ledger_id is None:  # adopted before, and the daemon stopped before it rewrote the key
        ledger_id = await deps.db(video_ledger.poll_recipient_id, job.id)
    if ledger_id is None:
        raise InvalidJobError(f"campaign {job.id!r} exists and is not a video_poll")
    state = _poll_state(job, ledger_id, job.started_at or datetime.now(UTC))
    keys = video_schedule.video_keys(deps)
    await deps.redis_call(
        deps.redis.set, keys.job(job_id), state.model_dump_json(), ex=settings.video.job_ttl_s
    )
    return state


async def _from_worker_record(deps: Dependencies, record: dict[str, Any]) -> dict[str, Any]:
    """The earlier worker's record as a video_poll job: its conversation resolved to a chat,
    its startTime (epoch ms) the start of the give-up clock and of the caption's elapsed time."""
    conversation_id = record["conversationId"]
    if not isinstance(conversation_id, str) or not conversation_id:
        raise InvalidJobError("conversationId must be a non-empty string")
    chat = await conversations.resolve(deps, conversation_id)
    data: dict[str, Any] = {
        "account": record.get("account") or _external_account(deps),
        "notify": {"account": chat.account, "to": chat.to},
    }
    if isinstance(record.get("jobId"), str):
        data["job_id"] = record["jobId"]
    start_ms = record.get("startTime")
    if isinstance(start_ms, int | float) and not isinstance(start_ms, bool):
        data["started_at"] = datetime.fromtimestamp(start_ms / 1000, UTC)
    elif start_ms is not None:
        raise InvalidJobError("startTime must be epoch milliseconds")
    return data


def _external_account(deps: Dependencies) -> str:
    """The video account of a record that names none: the configured one, or the only one."""
    configured = deps.settings.video.external_account
    if configured is not None:
        return configured
    if len(deps.video_accounts) == 1:
        return next(iter(deps.video_accounts))
    raise InvalidJobError("the record names no video account and video.external_account is not set")


def _poll_state(
    job: VideoPollJob, ledger_id: int, started_at: datetime
) -> video_schedule.PollState:
    return video_schedule.PollState(
        job_id=job.job_id,
        account=job.account,
        ledger_id=ledger_id,
        started_ms=int(started_at.timestamp() * 1000),
        status_url=job.status_url,
    )
