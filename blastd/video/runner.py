"""Runs a video campaign: submit its renders in progress batches, keep the polling loop fed,
deliver what is rendered, and finish once nothing is left to do.

Renders are submitted with 10 calls in flight and progress saved every 50 items
(docs/video.md), in the ledger: the batch's recipients are 'rendering' (owned, no job id)
before any submission leaves, and get their job ids in one statement when the batch is done.
A crash in between leaves them owned by a dead instance; the recovery looks each one up at the
provider by its reference (the ledger id, D-ID's user_data) and submits again only those the
provider does not know. A provider that cannot be searched leaves them 'video_failed' as
uncertain, for an operator's `retry --scope videos`, rather than risk a second render.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from blastd import ledger
from blastd.errors import (
    CampaignFatalError,
    ProviderError,
    ThrottledError,
    TransientError,
    UncertainOutcomeError,
)
from blastd.metrics import VIDEO_SUBMITS
from blastd.providers.video.accounts import RENDER_SAMPLES, VideoAccount
from blastd.providers.video.base import VideoRequest
from blastd.runner import CampaignRun, NotConfigured
from blastd.video import delivery as video_delivery
from blastd.video import ledger as video_ledger
from blastd.video import schedule as video_schedule
from blastd.video.jobs import VideoBlastOptions, fill

if TYPE_CHECKING:
    from blastd.resources import Dependencies
    from blastd.shutdown import Shutdown

log = structlog.get_logger()

BATCHES_IN_FLIGHT = 2  # the next batch is claimed while one finishes: no idle slots between
DELIVERY_SWEEP = 500  # rendered videos delivered per pass of the campaign loop
UNCERTAIN_SUBMIT = (
    "the daemon stopped while submitting this render and the provider cannot be searched: "
    "it may exist; retry --scope videos submits it again"
)


@dataclass
class VideoRun(CampaignRun):
    """One video_blast or video_poll campaign worked on by this instance: each pass of the
    polling run recovers, submits and delivers."""

    account: VideoAccount
    options: VideoBlastOptions
    script: str
    render_options: dict[str, str]
    progress_batch: int
    counts: dict[str, int] = field(default_factory=dict)
    synced_at: float = 0.0  # monotonic time of the last resync of the polls
    keeps_polling: ClassVar[bool] = True

    @property
    def not_before(self) -> datetime | None:
        return self.options.not_before

    async def send(self) -> None:
        await _recover_orphans(self)
        if time.monotonic() - self.synced_at >= self.deps.settings.video.recovery_interval_s:
            await _resync_polls(self)
            self.synced_at = time.monotonic()
        await _submit_pending(self)
        await _deliver_rendered(self)


async def prepare(
    deps: Dependencies, campaign: ledger.Campaign, shutdown: Shutdown, halted: asyncio.Event
) -> VideoRun | NotConfigured:
    """The run of a video_blast or video_poll campaign."""
    render: dict[str, Any] = campaign.message.get("video", {})
    account = deps.video_accounts.get(render.get("account", ""))
    if account is None or campaign.account not in deps.senders:
        return NotConfigured(
            f"account {render.get('account')!r} or {campaign.account!r} is not configured"
        )
    if not account.render_times:  # a restart: the adaptive schedule starts from the ledger
        times = await deps.db(video_ledger.recent_render_times, account.name, RENDER_SAMPLES)
        account.render_times.extend(reversed(times))
    options = VideoBlastOptions.model_validate(campaign.options)
    batch = options.progress_batch or deps.settings.video.progress_batch
    script, render_options = render.get("script", ""), render.get("options", {})
    return VideoRun(
        deps, campaign, shutdown, halted, account, options, script, render_options, batch
    )


# --- submission ------------------------------------------------------------------------------


async def _submit_pending(run: VideoRun) -> None:
    """Claim and submit progress batches until no pending render is left or the run stops."""
    deps = run.deps
    in_flight = asyncio.Semaphore(BATCHES_IN_FLIGHT)
    async with asyncio.TaskGroup() as batches:
        while not run.should_stop():
            await in_flight.acquire()
            claims = await deps.db(
                video_ledger.claim_renders,
                run.campaign.id,
                deps.settings.instance_id,
                run.progress_batch,
            )
            if not claims:
                in_flight.release()
                return
            batches.create_task(_submit_batch(run, claims, in_flight))


async def _submit_batch(
    run: VideoRun, claims: list[video_ledger.RenderClaim], in_flight: asyncio.Semaphore
) -> None:
    try:
        results = await asyncio.gather(*(_submit_one(run, claim) for claim in claims))
    finally:
        in_flight.release()
    await _save_batch(run, claims, results)


async def _save_batch(
    run: VideoRun,
    claims: list[video_ledger.RenderClaim],
    results: list[str | ProviderError | None],
) -> None:
    """One statement per kind of result: the batch's progress is saved at once."""
    deps = run.deps
    submitted = [
        video_ledger.Submission(claim.id, result)
        for claim, result in zip(claims, results, strict=True)
        if isinstance(result, str)
    ]
    failures = [
        video_ledger.RenderFailure(claim.id, result.error_class, result.code, result.text)
        for claim, result in zip(claims, results, strict=True)
        if isinstance(result, ProviderError)
    ]
    unsent = [claim.id for claim, result in zip(claims, results, strict=True) if result is None]
    if submitted:
        await deps.db(video_ledger.save_submissions, submitted)
        await _schedule_polls(run, submitted)
    if failures:
        await deps.db(video_ledger.fail_renders, failures)
    if unsent:
        await deps.db(video_ledger.release_renders, unsent)
    for name, count in (("submitted", len(submitted)), ("failed", len(failures))):
        run.counts[name] = run.counts.get(name, 0) + count
    log.info(
        "video_batch_saved",
        submitted=len(submitted),
        failed=len(failures),
        released=len(unsent),
        total_submitted=run.counts.get("submitted", 0),
    )


async def _schedule_polls(run: VideoRun, submitted: list[video_ledger.Submission]) -> None:
    started_ms = video_schedule.now_ms()
    first_poll_s = video_schedule.first_poll_s(run.deps, run.account)
    for submission in submitted:
        state = video_schedule.PollState(
            job_id=submission.video_job_id,
            account=run.account.name,
            ledger_id=submission.id,
            started_ms=started_ms,
        )
        await video_schedule.schedule(run.deps, state, first_poll_s)


async def _submit_one(run: VideoRun, claim: video_ledger.RenderClaim) -> str | ProviderError | None:
    """The job id, the error that ended the submission, or None when the run stopped first."""
    account = run.account
    request = VideoRequest(
        reference=str(claim.id),
        script=fill(run.script, claim.vars or {}),
        webhook_url=account.webhook_url,
        options=run.render_options,
    )
    async with account.slots:
        if run.should_stop():
            return None
        try:
            job_id = await _submit_with_retries(account, request)
        except CampaignFatalError as exc:
            # Unlike a send's, this pauses: out of credits, a resume after a top-up goes on.
            run.stop(
                "paused", f"{exc.code}: {exc.text}", error_class=exc.error_class, code=exc.code
            )
            VIDEO_SUBMITS.labels(account.name, exc.error_class).inc()
            return None  # not this recipient's fault: it is submitted after a resume
        except ProviderError as exc:
            VIDEO_SUBMITS.labels(account.name, exc.error_class).inc()
            return exc
    VIDEO_SUBMITS.labels(account.name, "ok").inc()
    return job_id


def _throttle_aware(
    backoff: Callable[[RetryCallState], float],
) -> Callable[[RetryCallState], float]:
    """The backoff, or the provider's Retry-After when that is longer."""

    def wait(state: RetryCallState) -> float:
        delay_s = backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ThrottledError) and exc.retry_after_s is not None:
            return max(delay_s, exc.retry_after_s)
        return delay_s

    return wait


async def _submit_with_retries(account: VideoAccount, request: VideoRequest) -> str:
    """Submit, retrying transient failures and throttling; before a retry, look the render
    up by its reference where the provider allows it, since a 5xx or an unreadable answer
    may come after the job was created (docs/providers.md, D-ID)."""
    retry = account.settings.retry
    retrying = AsyncRetrying(
        retry=retry_if_exception_type((TransientError, ThrottledError, UncertainOutcomeError)),
        stop=stop_after_attempt(retry.attempts),
        wait=_throttle_aware(
            wait_exponential_jitter(
                multiplier=retry.initial_s, max=retry.max_s, jitter=retry.jitter_s
            )
        ),
        reraise=True,
    )
    failed_before = False
    async for attempt in retrying:
        with attempt:
            if failed_before and account.provider.can_find:
                found = await account.provider.find(request.reference)
                if found is not None:
                    return found
            failed_before = True
            if account.pacer is not None:
                await account.pacer.acquire()
            return await account.provider.submit(request)
    raise AssertionError("unreachable: tenacity reraises the last error")


# --- recovery --------------------------------------------------------------------------------


async def _recover_orphans(run: VideoRun) -> None:
    """Submissions a crashed instance left unrecorded: found, submitted again, or uncertain."""
    deps, provider = run.deps, run.account.provider
    orphans = await deps.db(video_ledger.orphaned_renders, run.campaign.id)
    for recipient_id in orphans:
        if not provider.can_find:
            failure = video_ledger.RenderFailure(
                recipient_id, "uncertain", "uncertain", UNCERTAIN_SUBMIT
            )
            await deps.db(video_ledger.fail_renders, [failure])
            continue
        try:
            job_id = await provider.find(str(recipient_id))
        except ProviderError as exc:
            log.warning("video_lookup_failed", recipient=recipient_id, error=str(exc))
            return  # the next pass tries again
        if job_id is None:
            await deps.db(video_ledger.resubmit_render, recipient_id)
            continue
        submission = video_ledger.Submission(recipient_id, job_id)
        await deps.db(video_ledger.save_submissions, [submission])
        await _schedule_polls(run, [submission])
        VIDEO_SUBMITS.labels(run.account.name, "found").inc()
    if orphans:
        log.warning("video_orphans_recovered", count=len(orphans))


async def _resync_polls(run: VideoRun) -> None:
    """Renders the ledger follows but Redis lost (wiped, or expired while every daemon was
    down) are polled again from their ledger start time."""
    deps = run.deps
    keys = video_schedule.video_keys(deps)
    renders = await deps.db(video_ledger.renders_in_progress, run.campaign.id)
    if not renders:
        return
    pipe = deps.redis.pipeline(transaction=False)
    for render in renders:
        pipe.exists(keys.job(render.video_job_id))
    known = await deps.redis_call(pipe.execute)
    lost = [render for render, exists in zip(renders, known, strict=True) if not exists]
    for render in lost:
        state = video_schedule.PollState(
            job_id=render.video_job_id,
            account=run.account.name,
            ledger_id=render.id,
            started_ms=int(render.started_at.timestamp() * 1000),
        )
        await video_schedule.schedule(deps, state, 0.0)
    if lost:
        log.warning("video_polls_restored", count=len(lost))


async def _deliver_rendered(run: VideoRun) -> None:
    """Videos rendered while the campaign was paused, or whose delivery a crash or a retry
    left to do."""
    deps = run.deps
    ids = await deps.db(video_ledger.rendered_ids, run.campaign.id, DELIVERY_SWEEP)
    async with asyncio.TaskGroup() as deliveries:
        for recipient_id in ids:
            deliveries.create_task(video_delivery.deliver(deps, recipient_id))
