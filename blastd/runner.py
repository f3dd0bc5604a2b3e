"""The steps every campaign run shares, whatever it sends: prepare, wait for the start, stop on
an answer that stops campaigns, settle.

A product (blast, video, status) supplies a `Prepare` function and a `CampaignRun` subclass
with its `send`; `run_campaign` does the rest in one order for all of them:

1. prepare; a campaign whose account this daemon does not have is stopped with the reason;
2. wait for `not_before`, then for whatever else the product waits for (a sending window),
   returning early on shutdown or when the campaign leaves 'running' (`halted`);
3. send, until done, stopped, or halted;
4. settle: write the stop state with its reason, or mark the campaign done if nothing is left.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

import structlog
from structlog.contextvars import bound_contextvars

from blastd import ledger
from blastd.errors import CampaignFatalError, ConfigurationError, QualityError

if TYPE_CHECKING:
    from blastd.resources import Dependencies
    from blastd.shutdown import Shutdown

log = structlog.get_logger()

# The stop policy: what a campaign becomes when a provider answers with these error classes.
# A quality warning waits for an operator's resume; a campaign-fatal answer (credentials, a
# missing template) or a wrong endpoint, API version or sender id ends the campaign.
STOP_STATES = {
    QualityError.error_class: "paused",
    CampaignFatalError.error_class: "stopped",
    ConfigurationError.error_class: "stopped",
}


def stop_state_of(error_class: str | None) -> str | None:
    """The campaign state an answer of this error class stops the campaign in, if any."""
    return STOP_STATES.get(error_class) if error_class is not None else None


@dataclass(frozen=True, slots=True)
class NotConfigured:
    """What `Prepare` answers for a campaign whose account this daemon does not have."""

    reason: str


@dataclass
class CampaignRun(abc.ABC):
    """One campaign being sent by this instance: what every product's run has."""

    deps: Dependencies
    campaign: ledger.Campaign
    shutdown: Shutdown
    halted: asyncio.Event  # set by the scheduler when the campaign leaves 'running'
    stop_state: str | None = field(default=None, kw_only=True)
    stop_reason: str | None = field(default=None, kw_only=True)
    # True: `send` does one pass, and the run goes on polling until the campaign is done.
    keeps_polling: ClassVar[bool] = False

    @property
    def campaign_id(self) -> str:
        return self.campaign.id

    @property
    @abc.abstractmethod
    def not_before(self) -> datetime | None:
        """Nothing is sent before this time."""

    @abc.abstractmethod
    async def send(self) -> None:
        """Send what is due, until nothing is or `should_stop()`."""

    async def wait_until_due(self) -> bool:
        """Wait, after not_before, until something may be sent; False when shutdown or a halt
        came first."""
        return True

    async def report_finished(self, duration_s: float) -> None:
        """Log the finished campaign."""
        counts = await self.deps.db(ledger.count_states, self.campaign.id)
        log.info("campaign_finished", counts=counts)

    @property
    def is_halted(self) -> bool:
        return self.shutdown.is_requested or self.halted.is_set()

    def should_stop(self) -> bool:
        return self.stop_state is not None or self.shutdown.is_requested or self.halted.is_set()

    def stop(self, state: str, reason: str, **context: Any) -> None:
        """Stop sending; `state` and `reason` are written when the run settles. The first
        stop wins."""
        if self.stop_state is None:
            self.stop_state, self.stop_reason = state, reason
            log.error("campaign_stopping", state=state, reason=reason, **context)

    def stop_on(self, error_class: str | None, code: str | None, text: str | None) -> None:
        """Apply the stop policy to one provider answer."""
        if self.stop_state is None and error_class in STOP_STATES:
            state = STOP_STATES[error_class]
            self.stop(state, f"{code}: {text}", error_class=error_class, code=code)


Prepare = Callable[
    ["Dependencies", ledger.Campaign, "Shutdown", asyncio.Event],
    Awaitable[CampaignRun | NotConfigured],
]


async def run_campaign(
    prepare: Prepare,
    deps: Dependencies,
    campaign: ledger.Campaign,
    shutdown: Shutdown,
    halted: asyncio.Event,
) -> None:
    """Run one running campaign until it is done, stops, leaves 'running', or the daemon stops."""
    with bound_contextvars(campaign_id=campaign.id, account=campaign.account):
        run = await prepare(deps, campaign, shutdown, halted)
        if isinstance(run, NotConfigured):
            await deps.db(ledger.set_campaign_state, campaign.id, "stopped", run.reason)
            log.error("campaign_stopped", reason=run.reason)
            return
        if not await _wait_for_start(run) or not await run.wait_until_due():
            return
        started = time.monotonic()
        while True:
            await run.send()
            if await _settle(run, time.monotonic() - started) or not run.keeps_polling:
                return
            await shutdown.wait(halted, deps.settings.campaign_poll_interval_s)
            if run.is_halted:
                return


async def _wait_for_start(run: CampaignRun) -> bool:
    """Hold the campaign until its not_before; False when shutdown or a halt came first."""
    not_before = run.not_before
    if not_before is not None:
        delay_s = (not_before - datetime.now(UTC)).total_seconds()
        if delay_s > 0:
            log.info("campaign_waiting", not_before=not_before.isoformat())
            await run.shutdown.wait(run.halted, delay_s)
    return not run.is_halted


async def _settle(run: CampaignRun, duration_s: float) -> bool:
    """Write the stop state, or finish the campaign if nothing is left to send; True when the
    campaign has left 'running' either way."""
    deps, campaign_id = run.deps, run.campaign.id
    if run.stop_state is not None:
        await deps.db(ledger.set_campaign_state, campaign_id, run.stop_state, run.stop_reason)
        log.error("campaign_stopped", state=run.stop_state, reason=run.stop_reason)
        return True
    if await deps.db(ledger.finish_campaign_if_done, campaign_id):
        await run.report_finished(duration_s)
        return True
    return False
