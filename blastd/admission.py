"""Admission of a campaign: its recipients staged and committed to the ledger, once per job id."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass

import structlog
from redis.asyncio.cluster import RedisCluster
from structlog.contextvars import bound_contextvars

from blastd import ledger, metrics, queues
from blastd.errors import InvalidJobError, InvalidNumberError
from blastd.job_fields import MAX_CAPTION_CHARS, MAX_TEXT_CHARS
from blastd.jobs import BlastJob, missing_variables, render
from blastd.providers.base import Body, TemplateBody, TextBody, VideoBody
from blastd.recipients import (
    BadEntry,
    RecipientIn,
    map_in_slices,
    normalize_number,
    stream_recipients_key,
    time_zone_of,
)
from blastd.resources import Dependencies
from blastd.video.jobs import VideoBlastJob

log = structlog.get_logger()

# WhatsApp refuses a template parameter holding a newline, a tab or more than four spaces in a row.
_PARAM_SPACING = re.compile(r"[\n\t]| {5,}")


FIRST_PAGE_SIZE = 500  # entries in a campaign's first page: it commits in milliseconds


def snapshot_key(prefix: str, job_id: str) -> str:
    """blastd's own copy of a job's recipients_key, read instead of the producer's list."""
    return f"{prefix}intake:{job_id}"


@dataclass(frozen=True, slots=True)
class _Source:
    """Where a campaign's entries are read from, and how many there are."""

    length: int
    key: str | None = None  # the Redis list read; None for the job's inline recipients


@dataclass(slots=True)
class _Taken:
    """What one take of a job put in the ledger."""

    pending: int = 0
    skipped: int = 0
    next_seq: int = 0

    def add(self, counts: ledger.CampaignCounts, next_seq: int) -> None:
        self.pending += counts.pending
        self.skipped += counts.skipped
        self.next_seq = next_seq


async def accept_campaign(
    deps: Dependencies, job: BlastJob | VideoBlastJob, campaign: ledger.NewCampaign
) -> None:
    """Take a campaign in, unless its id was taken in before. It is committed with its first
    page of recipients, so sending starts at once, and the rest follows page by page; a take
    that finds the campaign's intake unfinished (its daemon died) carries it on."""
    with bound_contextvars(job_id=job.id, campaign_id=job.id, account=job.account):
        intake = await deps.db(ledger.load_intake, job.id)
        if intake is not None and intake.complete:
            log.info("job_duplicate")
            return await queues.discard_recipients_key(deps, job.recipients_key)
        source = await _open_source(deps, job)
        try:
            taken = await deps.outage_call(_take_in, deps, job, campaign, source)
        except InvalidJobError:
            await _drop_snapshot(deps, job, source)
            raise
        await _drop_snapshot(deps, job, source)
        if taken is None:  # another take finished it
            log.info("job_duplicate")
            return await queues.discard_recipients_key(deps, job.recipients_key)
        if job.recipients_key:
            await deps.redis_call(deps.redis.delete, job.recipients_key)
        log.info("campaign_created", pending=taken.pending, skipped=taken.skipped)
        metrics.count_recipients(job.account, "skipped", taken.skipped)
        deps.campaigns_changed.set()


async def _open_source(deps: Dependencies, job: BlastJob | VideoBlastJob) -> _Source:
    """The entries to read. A recipients_key is first copied (COPY, atomic) to a key of
    blastd's own, so a producer changing its list meanwhile cannot make the campaign short.
    On a Redis Cluster the copy would cross hash slots: there the list is read where it is,
    and a change is detected instead."""
    if job.recipients is not None:
        return _Source(len(job.recipients))
    key = job.recipients_key
    assert key is not None  # parse_job guarantees one of the two
    _check_recipients_key(key, deps.settings.redis_prefix, job.id)
    await _check_is_list(deps, key, job.id)
    if isinstance(deps.redis, RedisCluster):
        return _Source(await deps.redis_call(deps.redis.llen, key), key)
    snapshot = snapshot_key(deps.settings.redis_prefix, job.id)
    # 0 when the copy exists already: an earlier take of this job made it.
    await deps.redis_call(deps.redis.copy, key, snapshot)
    return _Source(await deps.redis_call(deps.redis.llen, snapshot), snapshot)


async def _drop_snapshot(
    deps: Dependencies, job: BlastJob | VideoBlastJob, source: _Source
) -> None:
    if source.key is not None and source.key != job.recipients_key:
        await deps.redis_call(deps.redis.delete, source.key)


async def _take_in(
    deps: Dependencies,
    job: BlastJob | VideoBlastJob,
    campaign: ledger.NewCampaign,
    source: _Source,
) -> _Taken | None:
    """Commit the campaign's recipients from where the ledger's intake stands; None when
    another take completed it."""
    intake = await ledger.load_intake(deps.pool, job.id)
    if intake is None:
        _check_length(deps, job, source)
        taken = await _first_commit(deps, job, campaign, source)
        if taken is not None:
            log.info("campaign_opened", pending=taken.pending, skipped=taken.skipped)
            deps.campaigns_changed.set()  # sending starts while the rest is taken in
            return await _later_pages(deps, job, source, taken)
        intake = await ledger.load_intake(deps.pool, job.id)  # another take committed it
        assert intake is not None
    if intake.complete:
        return None
    if source.length != intake.length:
        reason = (
            f"recipients list holds {source.length} entries, not the {intake.length} "
            f"its intake began with"
        )
        await _stop(deps, job, reason)
        return None
    return await _later_pages(deps, job, source, _Taken(next_seq=intake.next_seq))


async def stop_unfinished_intake(deps: Dependencies, job_id: str | None, reason: str) -> None:
    """A job given up on leaves its campaign, if one was committed before its intake could
    finish, stopped with the reason (it would otherwise wait for pages that never come)."""
    if job_id is not None and await deps.db(ledger.stop_intake, job_id, reason):
        log.error("campaign_intake_stopped", campaign_id=job_id, reason=reason)
        snapshot = snapshot_key(deps.settings.redis_prefix, job_id)
        await deps.redis_call(deps.redis.delete, snapshot)
        deps.campaigns_changed.set()


def _check_length(deps: Dependencies, job: BlastJob | VideoBlastJob, source: _Source) -> None:
    """Reject the whole job before anything is committed."""
    if source.length == 0:
        raise InvalidJobError(f"recipients_key {job.recipients_key!r} is empty or missing", job.id)
    if source.length > deps.settings.max_recipients:
        raise InvalidJobError(f"more than {deps.settings.max_recipients} recipients", job.id)


async def _first_commit(
    deps: Dependencies,
    job: BlastJob | VideoBlastJob,
    campaign: ledger.NewCampaign,
    source: _Source,
) -> _Taken | None:
    """The campaign row with its first pages, up to the first that has a recipient to send
    to; None when the id was taken meanwhile. Nothing is committed without such a page, so a
    job with no valid recipient is rejected whole and nothing of it was ever sent."""
    skip = skips_opted_out(job, deps.settings.optout_applies_to)
    taken = _Taken()
    async with ledger.transaction(deps.pool) as conn:
        if not await ledger.insert_campaign_head(conn, campaign, source.length):
            return None
        pages = staged_pages(deps, job, source, 0)
        async for page in pages:
            last = page[-1].seq + 1 == source.length
            counts = await ledger.insert_recipient_page(
                conn, job.id, page, skip_opted_out=skip, last=last
            )
            assert counts is not None  # this transaction holds the row since it inserted it
            taken.add(counts, page[-1].seq + 1)
            await queues.record_progress(deps.redis, _pages_up_to(deps, taken.next_seq))
            if taken.pending > 0:
                await pages.aclose()  # the rest is read by _later_pages, after the commit
                return taken
        raise InvalidJobError("no valid recipient", job.id)  # rolls the campaign back


async def _later_pages(
    deps: Dependencies, job: BlastJob | VideoBlastJob, source: _Source, taken: _Taken
) -> _Taken | None:
    """Commit the pages after `taken.next_seq`, each in its own transaction. A list that
    vanishes or changes meanwhile stops the campaign with what it has."""
    skip = skips_opted_out(job, deps.settings.optout_applies_to)
    staged = staged_pages(deps, job, source, taken.next_seq)
    try:
        async with contextlib.aclosing(_read_ahead(staged)) as pages:
            async for page in pages:
                await _commit_page(deps, job, page, taken, skip=skip, length=source.length)
    except InvalidJobError as exc:
        await _stop(deps, job, f"{exc.reason}; stopped with {taken.next_seq} taken in")
        return None
    intake = await ledger.load_intake(deps.pool, job.id)
    return taken if intake is not None and intake.complete else None


async def _commit_page(
    deps: Dependencies,
    job: BlastJob | VideoBlastJob,
    page: list[ledger.StagedRecipient],
    taken: _Taken,
    *,
    skip: bool,
    length: int,
) -> None:
    end = page[-1].seq + 1
    async with ledger.transaction(deps.pool) as conn:
        counts = await ledger.insert_recipient_page(
            conn, job.id, page, skip_opted_out=skip, last=end == length
        )
    if counts is not None:
        taken.add(counts, end)
        await queues.record_progress(deps.redis, _pages_up_to(deps, end))
        deps.campaigns_changed.set()  # a run that found nothing pending starts again


async def _read_ahead(
    pages: AsyncGenerator[list[ledger.StagedRecipient]],
) -> AsyncGenerator[list[ledger.StagedRecipient]]:
    """`pages`, the next one read and normalised while PostgreSQL commits the one before: the
    two take about as long, and run on different cores."""
    upcoming = asyncio.ensure_future(_next_page(pages))
    try:
        while (page := await upcoming) is not None:
            upcoming = asyncio.ensure_future(_next_page(pages))
            yield page
    finally:
        upcoming.cancel()
        # What a page read ahead of a failure raised would say nothing the failure does not.
        await asyncio.gather(upcoming, return_exceptions=True)
        await pages.aclose()


async def _next_page(
    pages: AsyncGenerator[list[ledger.StagedRecipient]],
) -> list[ledger.StagedRecipient] | None:
    return await anext(pages, None)


async def _stop(deps: Dependencies, job: BlastJob | VideoBlastJob, reason: str) -> None:
    """Stop a campaign whose intake cannot finish, and reject its job with the reason; nothing
    to do when another take completed the intake meanwhile."""
    if await ledger.stop_intake(deps.pool, job.id, reason):
        log.error("campaign_intake_stopped", reason=reason)
        deps.campaigns_changed.set()
        raise InvalidJobError(reason, job.id)


def _pages_up_to(deps: Dependencies, next_seq: int) -> int:
    """The pages of the campaign up to `next_seq`, counted from its start whichever take
    committed them: a take that gets further than the one before it is making progress."""
    later = max(0, next_seq - FIRST_PAGE_SIZE)
    return 1 + -(-later // deps.settings.recipients_page_size)


def skips_opted_out(job: BlastJob | VideoBlastJob, applies_to: Sequence[str]) -> bool:
    """Whether this job's sends leave out numbers on the opt-out list: by its category."""
    category = job.message.category if isinstance(job, BlastJob) else "marketing"
    return category in applies_to


async def staged_pages(
    deps: Dependencies, job: BlastJob | VideoBlastJob, source: _Source, start: int
) -> AsyncGenerator[list[ledger.StagedRecipient]]:
    """The entries from seq `start` on, normalised, in pages: the campaign's first page small."""
    settings = deps.settings
    size = settings.recipients_page_size
    first = min(FIRST_PAGE_SIZE, size) if start == 0 else size
    entries: AsyncIterator[Sequence[RecipientIn | BadEntry]]
    if job.recipients is not None:
        entries = _inline_pages(job.recipients, start, first, size)
    else:
        assert source.key is not None  # a recipients_key job reads a list
        entries = stream_recipients_key(
            deps.redis, source.key, size, start=start, expected=source.length, first_page_size=first
        )
    region = settings.default_region

    def stage(numbered: tuple[int, RecipientIn | BadEntry]) -> ledger.StagedRecipient:
        return stage_recipient(job, numbered[0], numbered[1], region)

    seq = start
    async for page in entries:
        yield await map_in_slices(stage, list(enumerate(page, seq)))
        seq += len(page)


async def _inline_pages(
    recipients: list[RecipientIn], start: int, first: int, size: int
) -> AsyncIterator[Sequence[RecipientIn | BadEntry]]:
    end = start + first
    while start < len(recipients):
        yield recipients[start:end]
        start, end = end, end + size


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
