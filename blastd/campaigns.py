"""Runs blast campaigns from the ledger: claim recipients in pages, mark intent, send, record."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog
from structlog.contextvars import bound_contextvars

from blastd import ledger
from blastd.jobs import BlastOptions, MessageSpec, render
from blastd.ledger import ClaimedRecipient, Outcome
from blastd.limiter import Pacer
from blastd.providers import OutboundMessage
from blastd.sender import Delivery, Sender

if TYPE_CHECKING:
    from blastd.daemon import Dependencies, Shutdown

log = structlog.get_logger()

# How much sending time one claim covers. Claimed recipients are 'sending' at once, and a crash
# can leave about two claims' worth 'uncertain' without their request having left: keep it short.
CLAIM_AHEAD_S = 0.02
STOP_STATES = {"quality": "paused", "campaign_fatal": "stopped"}


async def run(deps: Dependencies, shutdown: Shutdown) -> None:
    """Start a task for every running campaign; return when shutdown is requested."""
    active: dict[str, asyncio.Task[None]] = {}
    async with asyncio.TaskGroup() as group:
        while not shutdown.is_requested:
            deps.campaigns_changed.clear()
            for campaign_id in await deps.db_call(ledger.running_campaign_ids, deps.pool):
                task = active.get(campaign_id)
                if task is None or task.done():
                    coro = run_campaign(deps, campaign_id, shutdown)
                    active[campaign_id] = group.create_task(coro, name=f"campaign:{campaign_id}")
            active = {cid: task for cid, task in active.items() if not task.done()}
            await shutdown.wait(deps.campaigns_changed, deps.settings.campaign_poll_interval_s)


@dataclass
class CampaignRun:
    """One campaign being sent by this instance."""

    deps: Dependencies
    campaign: ledger.Campaign
    spec: MessageSpec
    sender: Sender
    pacer: Pacer | None
    shutdown: Shutdown
    stop_state: str | None = None
    stop_reason: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def should_stop(self) -> bool:
        return self.stop_state is not None or self.shutdown.is_requested

    def stop(self, outcome: Outcome) -> None:
        if self.stop_state is None and outcome.error_class in STOP_STATES:
            self.stop_state = STOP_STATES[outcome.error_class]
            self.stop_reason = f"{outcome.error_code}: {outcome.error_text}"
            log.error(
                "campaign_stopping",
                state=self.stop_state,
                error_class=outcome.error_class,
                code=outcome.error_code,
                reason=outcome.error_text,
            )

    @property
    def claim_size(self) -> int:
        """Recipients per claim: CLAIM_AHEAD_S of sending, whole requests, within the page."""
        per_request = self.sender.account.batch_limit
        rates = [p.rate_per_s for p in (self.sender.pacer, self.pacer) if p and p.rate_per_s > 0]
        if rates:
            requests = math.ceil(min(rates) * CLAIM_AHEAD_S)
        else:
            requests = self.sender.account.concurrency
        return max(per_request, min(self.deps.settings.claim_page_size, requests * per_request))


async def run_campaign(deps: Dependencies, campaign_id: str, shutdown: Shutdown) -> None:
    """Send every due pending recipient of one campaign, then finish or stop it."""
    campaign = await deps.db_call(ledger.load_campaign, deps.pool, campaign_id)
    if campaign is None or campaign.state != "running":
        return
    with bound_contextvars(campaign_id=campaign_id, account=campaign.account):
        run = await _prepare(deps, campaign, shutdown)
        if run is None or not await _wait_for_start(run):
            return
        started = time.monotonic()
        async with asyncio.TaskGroup() as sends:
            claimed = await _claim(run)
            while claimed and not run.should_stop():
                # The next claim runs while this one goes out, so sends never wait for it.
                next_claim = sends.create_task(_claim(run))
                await _send_claimed(run, claimed, sends)
                claimed = await next_claim
            _release(run, claimed)  # claimed as the campaign stopped: never sent
        await deps.outcomes.synced()
        await _settle(run, time.monotonic() - started)


async def _prepare(
    deps: Dependencies, campaign: ledger.Campaign, shutdown: Shutdown
) -> CampaignRun | None:
    sender = deps.senders.get(campaign.account)
    if sender is None:
        reason = f"account {campaign.account!r} is not configured"
        await deps.db_call(ledger.set_campaign_state, deps.pool, campaign.id, "stopped", reason)
        log.error("campaign_stopped", reason=reason)
        return None
    options = BlastOptions.model_validate(campaign.options)
    account_rate_per_s = sender.account.rate_per_s
    pacer = None
    if options.rate_per_s and (not account_rate_per_s or options.rate_per_s < account_rate_per_s):
        pacer = Pacer(options.rate_per_s)  # a campaign may go slower than its account, never faster
    spec = MessageSpec.model_validate(campaign.message)
    return CampaignRun(deps, campaign, spec, sender, pacer, shutdown)


async def _wait_for_start(run: CampaignRun) -> bool:
    """Hold the campaign until its not_before; False when shutdown came first."""
    options = BlastOptions.model_validate(run.campaign.options)
    if options.not_before is not None:
        delay_s = (options.not_before - datetime.now(UTC)).total_seconds()
        if delay_s > 0:
            log.info("campaign_waiting", not_before=options.not_before.isoformat())
            await run.shutdown.wait(None, delay_s)
    return not run.shutdown.is_requested


async def _send_claimed(
    run: CampaignRun, claimed: Sequence[ClaimedRecipient], sends: asyncio.TaskGroup
) -> None:
    """Launch one request per batch, each when the rate allows; release the rest on a stop."""
    size = run.sender.account.batch_limit
    batches = [claimed[i : i + size] for i in range(0, len(claimed), size)]
    for index, batch in enumerate(batches):
        await run.sender.slots.acquire()
        await run.sender.wait_turn(run.pacer)  # here, not in the task: only real sends fly
        if run.should_stop():
            run.sender.slots.release()
            _release(run, [r for b in batches[index:] for r in b])
            return
        sends.create_task(_send_batch(run, batch))


async def _claim(run: CampaignRun) -> list[ClaimedRecipient]:
    deps = run.deps
    return await deps.db_call(
        ledger.claim_recipients,
        deps.pool,
        run.campaign.id,
        deps.settings.instance_id,
        run.claim_size,
    )


def _release(run: CampaignRun, recipients: Sequence[ClaimedRecipient]) -> None:
    """Recipients claimed but never sent go back to pending."""
    for recipient in recipients:
        run.deps.outcomes.add(Outcome(recipient.id, "pending"))


async def _send_batch(run: CampaignRun, recipients: Sequence[ClaimedRecipient]) -> None:
    try:
        messages = [
            OutboundMessage(r.id, r.phone, render(run.spec, r.vars or {})) for r in recipients
        ]
        delivery = Delivery(messages, [r.attempts for r in recipients])
        outcomes = await run.sender.deliver(delivery, run.pacer, run.should_stop)
    finally:
        run.sender.slots.release()
    for outcome in outcomes:
        run.deps.outcomes.add(outcome)
        run.counts[outcome.state] = run.counts.get(outcome.state, 0) + 1
        run.stop(outcome)


async def _settle(run: CampaignRun, duration_s: float) -> None:
    deps, campaign_id = run.deps, run.campaign.id
    if run.stop_state is not None:
        await deps.db_call(
            ledger.set_campaign_state, deps.pool, campaign_id, run.stop_state, run.stop_reason
        )
        log.error("campaign_stopped", state=run.stop_state, reason=run.stop_reason)
        return
    if run.counts:
        log.info("campaign_batch_sent", counts=run.counts, duration_ms=round(duration_s * 1000))
    if await deps.db_call(ledger.finish_campaign_if_done, deps.pool, campaign_id):
        counts = await deps.db_call(ledger.count_states, deps.pool, campaign_id)
        log.info("campaign_finished", counts=counts)
