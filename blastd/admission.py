"""Admission of a campaign: its recipients staged and committed to the ledger, once per job id."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence

import structlog
from structlog.contextvars import bound_contextvars

from blastd import ledger, metrics, queues
from blastd.errors import InvalidJobError, InvalidNumberError
from blastd.job_fields import MAX_CAPTION_CHARS, MAX_TEXT_CHARS
from blastd.jobs import BlastJob, missing_variables, render
from blastd.providers.base import Body, TemplateBody, TextBody, VideoBody
from blastd.recipients import (
    BadEntry,
    RecipientIn,
    normalize_number,
    stream_recipients_key,
    time_zone_of,
)
from blastd.resources import Dependencies
from blastd.video.jobs import VideoBlastJob

log = structlog.get_logger()

# WhatsApp refuses a template parameter holding a newline, a tab or more than four spaces in a row.
_PARAM_SPACING = re.compile(r"[\n\t]| {5,}")


async def accept_campaign(
    deps: Dependencies, job: BlastJob | VideoBlastJob, campaign: ledger.NewCampaign
) -> None:
    """Insert a campaign with the job's recipients, unless its id was taken before."""
    with bound_contextvars(job_id=job.id, campaign_id=job.id, account=job.account):
        if await deps.db(ledger.campaign_exists, job.id):
            log.info("job_duplicate")
            return await queues.discard_recipients_key(deps, job.recipients_key)
        counts = await deps.outage_call(_insert_campaign, deps, job, campaign)
        if counts is None:
            log.info("job_duplicate")
            return await queues.discard_recipients_key(deps, job.recipients_key)
        if job.recipients_key:
            await deps.redis_call(deps.redis.delete, job.recipients_key)
        log.info("campaign_created", pending=counts.pending, skipped=counts.skipped)
        metrics.count_recipients(job.account, "skipped", counts.skipped)
        deps.campaigns_changed.set()


async def _insert_campaign(
    deps: Dependencies, job: BlastJob | VideoBlastJob, campaign: ledger.NewCampaign
) -> ledger.CampaignCounts | None:
    async with ledger.transaction(deps.pool) as conn:
        skip = skips_opted_out(job, deps.settings.optout_applies_to)
        counts = await ledger.insert_campaign(conn, campaign, staged_pages(deps, job), skip)
        if counts is not None and counts.pending == 0:
            raise InvalidJobError("no valid recipient", job.id)  # rolls the campaign back
        return counts


def skips_opted_out(job: BlastJob | VideoBlastJob, applies_to: Sequence[str]) -> bool:
    """Whether this job's sends leave out numbers on the opt-out list: by its category."""
    category = job.message.category if isinstance(job, BlastJob) else "marketing"
    return category in applies_to


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
    seq = pages = 0
    async for page in entries:
        staged = []
        for entry in page:
            staged.append(stage_recipient(job, seq, entry, settings.default_region))
            seq += 1
        if seq > settings.max_recipients:
            raise InvalidJobError(f"more than {settings.max_recipients} recipients", job.id)
        yield staged
        pages += 1  # the caller has staged the page by the time it asks for the next one
        await queues.record_progress(deps.redis, pages)
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
    if isinstance(job, BlastJob):
        problem = rendered_problem(render(job.message, recipient.vars))
        if problem:
            return ledger.StagedRecipient(seq, phone, recipient.vars or None, problem)
    window = job.options.window if isinstance(job, BlastJob) else None
    time_zone = time_zone_of(phone) if window else None
    return ledger.StagedRecipient(seq, phone, recipient.vars or None, None, time_zone)


def rendered_problem(body: Body) -> str | None:
    """Why WhatsApp would refuse the message once this recipient's values are filled in."""
    if isinstance(body, TextBody):
        return _length_problem("text", body.text, MAX_TEXT_CHARS, blank_allowed=False)
    if isinstance(body, VideoBody):
        caption = body.caption or ""
        return _length_problem("caption", caption, MAX_CAPTION_CHARS, blank_allowed=True)
    return _params_problem(body)


def _length_problem(what: str, text: str, limit: int, *, blank_allowed: bool) -> str | None:
    if len(text) > limit:
        return f"rendered {what} is {len(text)} characters, over {limit}"
    if not blank_allowed and not text.strip():
        return f"rendered {what} is blank"
    return None


def _params_problem(body: TemplateBody) -> str | None:
    for number, param in enumerate(body.body_params, start=1):
        if not param.strip():
            return f"rendered template parameter {number} is empty"
        if _PARAM_SPACING.search(param):
            return (
                f"rendered template parameter {number} has a newline, a tab "
                "or more than four spaces in a row"
            )
    return None
