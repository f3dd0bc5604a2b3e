"""Sends one recipient's message through its account and turns the answer into a ledger outcome.

Each account has one Sender: its provider adapter (with its own keep-alive pool), its pacer and
its concurrency bound. The policy for every class of provider answer (DESIGN §4) lives here,
next to the call it guards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from blastd.config import AccountSettings
from blastd.errors import (
    CampaignFatalError,
    PairLimitError,
    PermanentError,
    ProviderError,
    QualityError,
    ThrottledError,
    TransientError,
    UncertainOutcomeError,
)
from blastd.ledger import Outcome
from blastd.limiter import Pacer
from blastd.providers import OutboundMessage, Provider, SendReceipt

log = structlog.get_logger()

DEFAULT_THROTTLE_HOLD_S = 1.0  # when a throttling answer names no Retry-After
MAX_PAIR_DELAY_S = 3600.0
RECOVERY_STEPS = 100  # after a cut, the rate climbs back to the ceiling over this many successes


class NotSentError(Exception):
    """Internal: the campaign or the daemon stopped before this request left; nothing was sent."""


class Sender:
    """One account's pacing, concurrency bound and retry policy around its provider."""

    def __init__(self, name: str, account: AccountSettings, provider: Provider) -> None:
        self.name = name
        self.account = account
        self.provider = provider
        self.pacer = Pacer(account.rate_per_s)
        self.slots = asyncio.Semaphore(account.concurrency)
        self._held_until = 0.0  # loop time until which a throttling answer holds this account
        retry = account.retry
        self._retrying = AsyncRetrying(  # copied per send: an AsyncRetrying holds one run's state
            retry=retry_if_exception_type(TransientError),
            stop=stop_after_attempt(retry.attempts),
            wait=wait_exponential_jitter(
                multiplier=retry.initial_s, max=retry.max_s, jitter=retry.jitter_s
            ),
            reraise=True,
        )

    async def deliver(
        self,
        message: OutboundMessage,
        attempts: int,
        campaign_pacer: Pacer | None,
        should_stop: Callable[[], bool],
    ) -> Outcome:
        """Send with retries; return what the ledger should record. Never raises ProviderError.

        The caller has already waited for the first request's turn (`wait_turn`); retries wait
        for their own. `should_stop` is asked before a retry leaves, so a pause or a drain
        does not let out requests that were only waiting.
        """
        try:
            receipt = await self._send_with_retries(message, campaign_pacer, should_stop)
        except NotSentError:
            return Outcome(message.ledger_id, "pending")
        except ProviderError as exc:
            return outcome_of_error(message.ledger_id, exc, attempts)
        return Outcome(message.ledger_id, "sent", provider_message_id=receipt.provider_message_id)

    async def _send_with_retries(
        self,
        message: OutboundMessage,
        campaign_pacer: Pacer | None,
        should_stop: Callable[[], bool],
    ) -> SendReceipt:
        # The first attempt goes out without tenacity: its setup per call was a third of the
        # daemon's CPU per message at full speed (bench/throughput.py). It takes over from the
        # first failure, so the policy still counts and spaces every attempt.
        try:
            return await self._send_paced(message, campaign_pacer, should_stop, False)
        except TransientError as exc:
            first_error = exc
        async for attempt in self._retrying.copy():
            with attempt:
                if attempt.retry_state.attempt_number == 1:
                    raise first_error  # counted and waited for by the policy like any attempt
                return await self._send_paced(message, campaign_pacer, should_stop, True)
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def wait_turn(self, campaign_pacer: Pacer | None) -> None:
        """Wait until both the campaign's and the account's rate allow one more request."""
        if campaign_pacer is not None:
            await campaign_pacer.acquire()
        await self.pacer.acquire()

    async def _send_paced(
        self,
        message: OutboundMessage,
        campaign_pacer: Pacer | None,
        should_stop: Callable[[], bool],
        needs_turn: bool,
    ) -> SendReceipt:
        while True:
            if needs_turn:
                await self.wait_turn(campaign_pacer)
                if should_stop():
                    raise NotSentError
            try:
                receipt = await self.provider.send(message)
            except ThrottledError as exc:
                self._slow_down(exc)
                needs_turn = True
                continue
            if self.pacer.rate_per_s < self.account.rate_per_s:
                self.pacer.increase(self.account.rate_per_s / RECOVERY_STEPS)
            return receipt

    def _slow_down(self, exc: ThrottledError) -> None:
        """Hold the account for Retry-After and halve its rate, once per throttling episode:
        the other requests in flight answer 429 too, and each must not cut the rate again."""
        now = asyncio.get_running_loop().time()
        hold_s = exc.retry_after_s if exc.retry_after_s is not None else DEFAULT_THROTTLE_HOLD_S
        is_new_episode = now >= self._held_until
        self._held_until = max(self._held_until, now + hold_s)
        self.pacer.hold_until(self._held_until)
        if not is_new_episode:
            return
        self.pacer.decrease(0.5)
        log.warning(
            "account_throttled",
            account=self.name,
            code=exc.code,
            hold_s=hold_s,
            rate_per_s=round(self.pacer.rate_per_s, 1),
        )


def outcome_of_error(ledger_id: int, exc: ProviderError, attempts: int) -> Outcome:
    """The ledger outcome for a provider answer that was not a success."""
    if isinstance(exc, PairLimitError):
        # Meta's advice for 131056: wait 4^n seconds before writing to this user again.
        delay_s = min(4.0 ** (attempts + 1), MAX_PAIR_DELAY_S)
        later = datetime.now(UTC) + timedelta(seconds=delay_s)
        return _error_outcome(ledger_id, "pending", exc, later)
    if isinstance(exc, QualityError | CampaignFatalError):
        return _error_outcome(ledger_id, "pending", exc)  # not sent; the campaign stops around it
    if isinstance(exc, UncertainOutcomeError):
        return _error_outcome(ledger_id, "uncertain", exc)
    if isinstance(exc, PermanentError | TransientError):
        return _error_outcome(ledger_id, "failed", exc)
    raise exc  # a new ProviderError subclass without a policy is a bug


def _error_outcome(
    ledger_id: int, state: str, exc: ProviderError, next_attempt_at: datetime | None = None
) -> Outcome:
    return Outcome(ledger_id, state, None, exc.error_class, exc.code, exc.text, next_attempt_at)
