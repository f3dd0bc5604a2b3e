"""Runs the campaigns from the ledger: one task per running campaign, each run by its product's
runner; a blast claims the next requests' recipients (the intent to send), sends and records."""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from datetime import time as dt_time
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import structlog

from blastd import controls, events, ledger, metrics, runner
from blastd.claims import Claims
from blastd.job_fields import BlastOptions
from blastd.jobs import MessageSpec, render
from blastd.ledger import ClaimedRecipient, Outcome
from blastd.pacing import Pacer
from blastd.providers.base import OutboundMessage
from blastd.runner import CampaignRun, NotConfigured
from blastd.sender import Delivery, Sender
from blastd.status import broadcast as status_broadcast
from blastd.video import runner as video_runner

if TYPE_CHECKING:
    from blastd.resources import Dependencies
    from blastd.shutdown import Shutdown

log = structlog.get_logger()

# The state reason of a campaign paused by its account's messaging limit: the scheduler runs
# it again once the rolling window has room.
MESSAGING_LIMIT = "messaging_limit"
# A request whose claim (its intent) is still being committed when its slot frees leaves that
# slot idle for the commit (a few ms, a tenth of a provider's answer time, much more on a
# loaded machine). Requests are therefore claimed ahead of their turn, half the lookahead per
# claim (one statement), the next claim committing while the last one's requests launch: as
# many requests as the concurrency unpaced (with half of it, a third of the requests still
# waited for their commit on a loaded two-core machine), CLAIMED_AHEAD_S of sending when
# paced. The price: that many more recipients in doubt after a crash (claimed, never sent).
# A tenth of a second rather than 50 ms: at 80/s, one claim per four requests instead of two
# took the daemon's CPU per message from 1.57 to 1.36 ms (bench/pacing_cost.py), for four more
# recipients in doubt after a crash.
CLAIMED_AHEAD_S = 0.1
# A claim starts after the previous one's last id, so its scan skips the recipients already
# sent (their old versions stay in the index until a vacuum: a scan from the first id walks
# them all). Recipients that became due behind it (a retry's time came, a stop released them)
# are reached every RESCAN_S, when the scan starts from the first id again, and by the next
# run: a run ends when a claim finds nothing, and the next one starts from the first id.
# Not on every short claim: a campaign still being taken in comes back short on every claim
# while sending keeps up with intake, and a walk per claim cost 64 ms at 200,000 recipients.
RESCAN_S = 5.0


@dataclass(frozen=True, slots=True)
class _Active:
    """A campaign's task in this instance, and the event that halts its sending."""

    task: asyncio.Task[None]
    halted: asyncio.Event


async def run(deps: Dependencies, shutdown: Shutdown) -> None:
    """Run the campaigns with this daemon's claims, their orphans swept; return when shutdown
    is requested and the sends in flight are recorded."""
    claims = Claims(deps.db, deps.settings.instance_id)
    async with asyncio.TaskGroup() as services:
        services.create_task(_sweep_orphans(deps, claims, shutdown), name="orphan-sweeper")
        await _schedule(deps, claims, shutdown)


async def _sweep_orphans(deps: Dependencies, claims: Claims, shutdown: Shutdown) -> None:
    while not shutdown.is_requested:
        await shutdown.wait(None, deps.settings.orphan_sweep_interval_s)
        if shutdown.is_requested:
            return
        released = await claims.release_orphans(deps.outcomes)
        if released:
            log.warning("orphans_released", count=released)
            deps.campaigns_changed.set()


async def _schedule(deps: Dependencies, claims: Claims, shutdown: Shutdown) -> None:
    """Start a task for every running campaign, halt those paused or cancelled meanwhile (by an
    operator, another daemon); return when shutdown is requested."""
    active: dict[str, _Active] = {}
    paused_by_operator: set[str] = set()  # to log a resume when the campaign runs again
    pacers: dict[str, Pacer] = {}  # of running campaigns with a rate of their own
    prepare_blast = functools.partial(_prepare, claims, pacers)
    async with asyncio.TaskGroup() as group:
        while not shutdown.is_requested:
            deps.campaigns_changed.clear()
            await _resume_within_limit(deps)
            running = await deps.db(ledger.running_campaign_ids)
            active = {cid: entry for cid, entry in active.items() if not entry.task.done()}
            for campaign_id in pacers.keys() - set(running):
                del pacers[campaign_id]
            for campaign_id in running:
                if campaign_id in paused_by_operator:
                    paused_by_operator.discard(campaign_id)
                    controls.notice_resumed(campaign_id)
                if campaign_id not in active:
                    halted = asyncio.Event()
                    coro = run_campaign(deps, prepare_blast, campaign_id, shutdown, halted)
                    coro = events.reporting(deps, campaign_id, coro)  # progress events
                    task = group.create_task(coro, name=f"campaign:{campaign_id}")
                    active[campaign_id] = _Active(task, halted)
            departed = _halt_departed(active, running)
            paused_by_operator |= await controls.notice_departed(deps, departed)
            await shutdown.wait(deps.campaigns_changed, deps.settings.campaign_poll_interval_s)


async def _resume_within_limit(deps: Dependencies) -> None:
    """Campaigns paused by their messaging limit run again once the window has room."""
    for campaign_id, account in await deps.db(ledger.campaigns_paused_for, MESSAGING_LIMIT):
        room = await _messaging_room(deps, account)
        if (room is None or room > 0) and await deps.db(
            ledger.resume_paused_for, campaign_id, MESSAGING_LIMIT
        ):
            log.info("campaign_resumed", campaign_id=campaign_id, reason=MESSAGING_LIMIT)


async def _messaging_room(deps: Dependencies, account: str) -> int | None:
    """How many more unique people the account may message in the window now; None: no
    limit. Accounts of one portfolio share the budget."""
    settings = deps.settings
    limit = settings.messaging_limit_of(account)
    if limit is None:
        return None
    budget, names = limit
    used = await deps.db(ledger.recipients_in_window, names, settings.messaging_limit_window_s)
    return max(0, budget - used)


def _halt_departed(active: dict[str, _Active], running: list[str]) -> list[str]:
    """Runs of campaigns that are no longer running stop launching and release their claims;
    return the ones halted now."""
    still_running = set(running)
    halted = []
    for campaign_id, entry in active.items():
        if campaign_id not in still_running and not entry.halted.is_set():
            entry.halted.set()
            halted.append(campaign_id)
    return halted


@dataclass
class BlastRun(CampaignRun):
    """One blast campaign being sent by this instance."""

    spec: MessageSpec
    sender: Sender
    pacer: Pacer | None
    options: BlastOptions
    claims: Claims
    time_zones: list[str] = field(default_factory=list)  # of pending recipients, with a window
    counts: dict[str, int] = field(default_factory=dict)
    # The messaging limit has no room left: what is claimed goes out (it fits the budget),
    # then the campaign pauses.
    is_at_limit: bool = False
    after: int = 0  # the last id claimed: the next claim's scan starts above it
    rescan_at: float = 0.0  # monotonic time from which the next claim starts from the first id

    @property
    def not_before(self) -> datetime | None:
        return self.options.not_before

    async def wait_until_due(self) -> bool:
        return await _wait_for_window(self)

    async def send(self) -> None:
        started = time.monotonic()
        if not self.should_stop():
            await _send_due(self)
        if self.is_at_limit:
            self.stop("paused", MESSAGING_LIMIT)
        await self.deps.outcomes.synced()
        await _sweep(self)
        if self.counts and self.stop_state is None:
            duration_ms = round((time.monotonic() - started) * 1000)
            log.info("campaign_batch_sent", counts=self.counts, duration_ms=duration_ms)

    def should_stop(self) -> bool:
        # Written out rather than through super(): it is asked once per request.
        return (
            self.stop_state is not None
            or self.shutdown.is_requested
            or self.halted.is_set()
            or self.is_expired()
        )

    def is_expired(self) -> bool:
        """True once the campaign's not_after has passed: nothing more may be sent."""
        not_after = self.options.not_after
        return not_after is not None and datetime.now(UTC) >= not_after

    def open_time_zones(self) -> list[str] | None:
        """The zones of `time_zones` inside the sending window now; None without a window."""
        window = self.options.window
        if window is None:
            return None
        now = datetime.now(UTC)
        return [zone for zone in self.time_zones if window.contains(_local_time(now, zone))]

    @property
    def rate_per_s(self) -> float | None:
        """The rate this campaign is paced at (its own or its account's, the lower); None
        when unpaced."""
        rates = [p.rate_per_s for p in (self.sender.pacer, self.pacer) if p and p.rate_per_s > 0]
        return min(rates) if rates else None

    @property
    def claimed_ahead(self) -> int:
        """Requests that may be claimed before a slot frees for them."""
        rate = self.rate_per_s
        if rate:
            return max(1, math.ceil(rate * CLAIMED_AHEAD_S))
        return self.sender.account.concurrency

    @property
    def claim_size(self) -> int:
        """Recipients per claim: half the requests claimed ahead (the claim being launched and
        the next one stay within it), whole requests, within the page."""
        per_request = self.sender.account.batch_limit
        requests = max(1, self.claimed_ahead // 2)
        return max(per_request, min(self.deps.settings.claim_page_size, requests * per_request))


def _local_time(now: datetime, zone: str) -> dt_time:
    return now.astimezone(ZoneInfo(zone)).time()  # ZoneInfo caches its instances by name


async def run_campaign(
    deps: Dependencies,
    prepare_blast: runner.Prepare,
    campaign_id: str,
    shutdown: Shutdown,
    halted: asyncio.Event,
) -> None:
    """Run one campaign with its type's runner until it is done or stops; `halted` set (the
    campaign left 'running') stops the launching and releases what was claimed."""
    campaign = await deps.db(ledger.load_campaign, campaign_id)
    if campaign is None or campaign.state != "running":
        return
    campaign_type = await deps.db(ledger.campaign_type, campaign_id)
    prepare = PREPARERS.get(campaign_type) or prepare_blast
    await runner.run_campaign(prepare, deps, campaign, shutdown, halted)


async def _send_due(run: BlastRun) -> None:
    """Launch claimed requests, the next claim committing meanwhile, until the campaign runs
    out or stops; on a stop, put back to pending what was claimed and never launched."""
    async with asyncio.TaskGroup() as sends:
        claimed = await _claim(run)
        while claimed:
            # The next claim commits while this one launches, so a free slot never waits for it.
            next_claim = sends.create_task(_claim(run))
            launched = await _launch(run, claimed, sends)
            if launched < len(claimed):  # stopped
                _release(run, claimed[launched:])
                _release(run, await next_claim)
                return
            claimed = await next_claim


async def _launch(
    run: BlastRun, claimed: Sequence[ClaimedRecipient], sends: asyncio.TaskGroup
) -> int:
    """Launch the claim's requests, each when a slot is free and the rate allows; return how
    many of its recipients left (fewer when the campaign stopped)."""
    size = run.sender.account.batch_limit
    for start in range(0, len(claimed), size):
        await run.sender.slots.acquire()
        await run.sender.wait_turn(run.pacer)  # here, not in the task: only real sends fly
        if run.should_stop():
            run.sender.slots.release()
            return start
        sends.create_task(_send_batch(run, claimed[start : start + size]))
    return len(claimed)


async def _prepare(
    claims: Claims,
    pacers: dict[str, Pacer],
    deps: Dependencies,
    campaign: ledger.Campaign,
    shutdown: Shutdown,
    halted: asyncio.Event,
) -> BlastRun | NotConfigured:
    sender = deps.senders.get(campaign.account)
    if sender is None:
        return NotConfigured(f"account {campaign.account!r} is not configured")
    options = BlastOptions.model_validate(campaign.options)
    account_rate_per_s = sender.account.rate_per_s
    pacer = None
    rate = options.rate_per_s
    if rate and (not account_rate_per_s or rate < account_rate_per_s):
        # A campaign may go slower than its account, never faster. Its pacer outlives the run:
        # a run that caught up with an intake still under way ends, and the next one must not
        # start with a fresh allowance.
        pacer = pacers.get(campaign.id)
        if pacer is None or pacer.rate_per_s != rate:
            pacer = pacers[campaign.id] = Pacer(rate)
    spec = MessageSpec.model_validate(campaign.message)
    return BlastRun(deps, campaign, shutdown, halted, spec, sender, pacer, options, claims)


# How each type of campaign other than a blast is prepared.
PREPARERS: dict[str | None, runner.Prepare] = {
    "status": status_broadcast.prepare,
    "video_blast": video_runner.prepare,
    "video_poll": video_runner.prepare,
}


async def _wait_for_window(run: BlastRun) -> bool:
    """Hold the campaign while every pending recipient is outside its sending window (the
    campaign is not done meanwhile); False when shutdown or a halt came first."""
    window, deps = run.options.window, run.deps
    if window is None:
        return True
    is_logged = False
    while not (run.shutdown.is_requested or run.halted.is_set()):
        run.time_zones = await deps.db(ledger.pending_time_zones, run.campaign.id)
        if not run.time_zones or run.open_time_zones() or run.is_expired():
            return True
        if not is_logged:
            log.info(
                "campaign_waiting",
                window_start=window.start,
                window_end=window.end,
                time_zones=len(run.time_zones),
            )
            is_logged = True
        # Polled, not slept until the next opening: a retry may add recipients in open zones.
        await run.shutdown.wait(run.halted, deps.settings.campaign_poll_interval_s)
    return False


async def _claim(run: BlastRun) -> list[ClaimedRecipient]:
    """Claim the next requests' recipients (they become 'sending'); none once the campaign
    stops, runs out of due recipients, closes its window in every zone or meets its limit."""
    time_zones = run.open_time_zones()
    if run.should_stop() or (time_zones is not None and not time_zones):
        return []
    size = run.claim_size
    room = await _messaging_room(run.deps, run.campaign.account)
    if room is not None and room < size:
        size = room
        if room == 0:
            run.is_at_limit = True
            return []
    if time.monotonic() >= run.rescan_at:
        run.after, run.rescan_at = 0, time.monotonic() + RESCAN_S
    deps, claims = run.deps, run.claims
    token = claims.new_token()
    claimed = await deps.db(
        ledger.claim_recipients,
        run.campaign.id,
        deps.settings.instance_id,
        size,
        time_zones,
        token=token,
        after=run.after,
    )
    claims.hold(token, [r.id for r in claimed])
    if claimed:
        run.after = claimed[-1].id
    return claimed


def _release(run: BlastRun, recipients: Sequence[ClaimedRecipient]) -> None:
    """Recipients claimed but never sent go back to pending."""
    for recipient in recipients:
        run.deps.outcomes.add(Outcome(recipient.id, "pending"))
    run.claims.let_go([r.id for r in recipients])


async def _send_batch(run: BlastRun, recipients: Sequence[ClaimedRecipient]) -> None:
    try:
        messages = [
            OutboundMessage(r.id, r.phone, render(run.spec, r.vars or {})) for r in recipients
        ]
        delivery = Delivery(messages, [r.attempts for r in recipients])
        outcomes = await run.sender.deliver(delivery, run.pacer, run.should_stop)
    finally:
        run.sender.slots.release()
    run.sender.metrics.count_recipients(outcomes)
    for outcome in outcomes:
        run.deps.outcomes.add(outcome)
        run.counts[outcome.state] = run.counts.get(outcome.state, 0) + 1
        run.stop_on(outcome.error_class, outcome.error_code, outcome.error_text)
    run.claims.let_go([r.id for r in recipients])


async def _sweep(run: BlastRun) -> None:
    """After the sends: expire what missed not_after, and cancel what came back pending
    (released or deferred) while an operator's cancel committed."""
    deps, campaign_id, not_after = run.deps, run.campaign.id, run.options.not_after
    if not_after is not None and run.is_expired():
        expired = await deps.db(ledger.expire_pending, campaign_id)
        metrics.count_recipients(run.campaign.account, "expired", expired)
        if expired:
            log.info("recipients_expired", count=expired, not_after=not_after.isoformat())
    await deps.db(ledger.cancel_pending, campaign_id)
