"""Reliable intake: BLMOVE into a per-instance processing list, then ledger or dead-letter."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from blastd import admission, controls, ledger, metrics, queues
from blastd.errors import InvalidJobError
from blastd.jobs import BlastJob, ControlJob, StatusJob, parse_job
from blastd.status import intake as status_intake
from blastd.video import intake as video_intake
from blastd.video.jobs import VideoBlastJob, VideoPollJob

if TYPE_CHECKING:
    from blastd.resources import Dependencies
    from blastd.shutdown import Shutdown

log = structlog.get_logger()


async def run(deps: Dependencies, shutdown: Shutdown) -> None:
    """Take jobs until shutdown is requested; each one is in the ledger or dead before it leaves."""
    settings = deps.settings
    source = queues.jobs_key(settings.redis_prefix)
    processing = queues.processing_key(settings.redis_prefix, settings.instance_id)
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
    """Accept one job into the ledger or dead-letter it, then drop it from the processing list.

    Takes that count against the job are told from takes after an outside kill by the pages
    of recipients each take staged (blastd/queues.py says how)."""
    metrics.JOBS_TAKEN.inc()
    settings = deps.settings
    prefix = settings.redis_prefix
    take = await deps.redis_call(queues.count_take, deps.redis, prefix, raw)
    try:
        if take.deliveries > settings.max_job_deliveries:
            reason = (
                f"job was taken {take.deliveries - 1} times without finishing, none of them "
                f"getting past {take.furthest_pages} pages of recipients"
            )
            job_id = queues.readable_job_id(raw, settings.max_job_bytes)
            await admission.stop_unfinished_intake(deps, job_id, reason)
            raise InvalidJobError(reason, job_id)
        # An outage mid-way rolls the campaign's transaction back; the job is accepted again
        # once Redis and PostgreSQL answer, rather than dead-lettered as if it were broken.
        with queues.taking(take):
            await deps.outage_call(accept_job, deps, raw)
    except InvalidJobError as exc:
        await queues.dead_letter(deps, raw, exc.reason, exc.job_id)
    except Exception as exc:  # a bug must not take the daemon down with every later job
        log.exception("job_crashed", error=type(exc).__name__)
        await queues.dead_letter(deps, raw, f"internal error: {type(exc).__name__}", None)
    await deps.redis_call(queues.finish_take, deps.redis, prefix, settings.instance_id, raw)


async def accept_job(deps: Dependencies, raw: bytes) -> None:
    """Act on one job by its type: a blast or a status becomes a campaign, a control is applied."""
    settings = deps.settings
    job = parse_job(
        raw,
        max_bytes=settings.max_job_bytes,
        accounts=settings.accounts.keys(),
        max_inline_recipients=settings.max_inline_recipients,
        default_region=settings.default_region,
        video_accounts=deps.video_accounts.keys(),
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
    await admission.accept_campaign(deps, job, campaign)
