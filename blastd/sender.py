"""Sends one request's worth of messages through an account and turns the answers into outcomes.

Each account has one Sender: its provider adapter (with its own keep-alive pool), its pacer and
its concurrency bound. The policy for every class of provider answer (docs/errors.md) lives here,
next to the call it guards. A request carries one message, or up to the account's batch limit
for a bulk API; the pacer counts requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from blastd.backoff import backoff_s
from blastd.config import AccountSettings
from blastd.errors import (
    CampaignFatalError,
    ConfigurationError,
    MarketingCapError,
    NotSentError,
    PairLimitError,
    PermanentError,
    ProviderError,
    QualityError,
    ThrottledError,
    TransientError,
    UncertainOutcomeError,
)
from blastd.ledger import Outcome
from blastd.metrics import AccountMetrics
from blastd.pacing import AccountPacer, Pacer
from blastd.providers.base import OutboundMessage, Provider, SendResult

log = structlog.get_logger()

DEFAULT_THROTTLE_HOLD_S = 1.0  # when a throttling answer names no Retry-After
MAX_PAIR_DELAY_S = 3600.0
MARKETING_CAP_DELAY_S = 86_400.0  # Meta's advice for 131049: try that person again in 24 h
RECOVERY_STEPS = 100  # after a cut, the rate climbs back to the ceiling over this many successes


@dataclass(frozen=True, slots=True)
class Delivery:
    """Messages for one request, with the requests each recipient has had before."""

    messages: Sequence[OutboundMessage]
    earlier_attempts: Sequence[int]


class Sender:
    """One account's pacing, concurrency bound and retry policy around its provider."""

    def __init__(
        self, name: str, account: AccountSettings, provider: Provider, pacer: AccountPacer
    ) -> None:
        self.name = name
        self.account = account
        self.provider = provider
        self.pacer = pacer  # holds the throttling state too: shared by all daemons when shared
        self.slots = asyncio.Semaphore(account.concurrency)
        self.metrics = AccountMetrics(name)
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
        self, delivery: Delivery, campaign_pacer: Pacer | None, should_stop: Callable[[], bool]
    ) -> list[Outcome]:
        """Send with retries; return one ledger outcome per message. Never raises ProviderError.

        The caller has already waited for the first request's turn (`wait_turn`); retries wait
        for their own. `should_stop` is asked before a retry leaves, so a pause or a drain
        does not let out requests that were only waiting.
        """
        requests = [0]
        try:
            results = await self._send_with_retries(delivery, campaign_pacer, should_stop, requests)
        except NotSentError:
            return [
                Outcome(m.ledger_id, "pending", requests=requests[0]) for m in delivery.messages
            ]
        except ProviderError as exc:  # the request as a whole: it applies to every message
            results = [exc] * len(delivery.messages)
        return [
            outcome_of(message.ledger_id, result, earlier + requests[0], requests[0])
            for message, result, earlier in zip(
                delivery.messages, results, delivery.earlier_attempts, strict=True
            )
        ]

    async def _send_with_retries(
        self,
        delivery: Delivery,
        campaign_pacer: Pacer | None,
        should_stop: Callable[[], bool],
        requests: list[int],
    ) -> list[SendResult]:
        # The first attempt goes out without tenacity: its setup per call was a third of the
        # daemon's CPU per message at full speed (bench/throughput.py). It takes over from the
        # first failure, so the policy still counts and spaces every attempt.
        try:
            return await self._send_paced(delivery, campaign_pacer, should_stop, requests, False)
        except TransientError as exc:
            first_error = exc
        async for attempt in self._retrying.copy():
            with attempt:
                if attempt.retry_state.attempt_number == 1:
                    raise first_error  # counted and waited for by the policy like any attempt
                self.metrics.count_retry(TransientError.error_class)
                return await self._send_paced(delivery, campaign_pacer, should_stop, requests, True)
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def wait_turn(self, campaign_pacer: Pacer | None) -> None:
        """Wait until both the campaign's and the account's rate allow one more request."""
        started = time.monotonic()
        if campaign_pacer is not None:
            await campaign_pacer.acquire()
        await self.pacer.acquire()
        self.metrics.limiter_wait.observe(time.monotonic() - started)

    async def _send_paced(
        self,
        delivery: Delivery,
        campaign_pacer: Pacer | None,
        should_stop: Callable[[], bool],
        requests: list[int],
        needs_turn: bool,
    ) -> list[SendResult]:
        while True:
            if needs_turn:
                await self.wait_turn(campaign_pacer)
                if should_stop():
                    raise NotSentError
            requests[0] += 1
            try:
                results = await self.metrics.observe_request(
                    self.provider.send_batch(delivery.messages)
                )
            except ThrottledError as exc:
                self.metrics.count_retry(exc.error_class)
                await self._slow_down(exc)
                needs_turn = True
                continue
            if self.pacer.rate_per_s < self.account.rate_per_s:
                self.pacer.increase(self.account.rate_per_s / RECOVERY_STEPS)
            log.debug(
                "provider_sent",
                account=self.name,
                to=[message.to for message in delivery.messages],
                results=[type(result).__name__ for result in results],
            )
            return results

    async def _slow_down(self, exc: ThrottledError) -> None:
        """Hold the account for Retry-After and halve its rate, once per throttling episode:
        the other requests in flight (from every daemon) answer 429 too, and each must not cut
        the rate again. The pacer decides what is a new episode."""
        hold_s = exc.retry_after_s if exc.retry_after_s is not None else DEFAULT_THROTTLE_HOLD_S
        if not await self.pacer.throttle(hold_s, 0.5):
            return
        self.metrics.throttles.inc()
        log.warning(
            "account_throttled",
            account=self.name,
            code=exc.code,
            hold_s=hold_s,
            rate_per_s=round(self.pacer.rate_per_s, 1),
        )


def outcome_of(ledger_id: int, result: SendResult, attempts: int, requests: int) -> Outcome:
    """The ledger outcome of one message's result; `attempts` counts this delivery's requests."""
    if not isinstance(result, ProviderError):
        return Outcome(ledger_id, "sent", result.provider_message_id, requests=requests)
    state, later = "failed", None
    if isinstance(result, PairLimitError):
        # Meta's advice for 131056: wait 4^n seconds before writing to this user again.
        delay_s = backoff_s(attempts, 4.0, MAX_PAIR_DELAY_S, factor=4.0)
        state, later = "pending", datetime.now(UTC) + timedelta(seconds=delay_s)
    elif isinstance(result, MarketingCapError):
        # Once: the ledger fails a recipient that meets the cap a second time.
        state, later = "pending", datetime.now(UTC) + timedelta(seconds=MARKETING_CAP_DELAY_S)
    elif isinstance(result, QualityError | CampaignFatalError | ConfigurationError):
        state = "pending"  # not sent; the campaign stops around it
    elif isinstance(result, UncertainOutcomeError):
        state = "uncertain"
    elif not isinstance(result, PermanentError | TransientError):
        raise result  # a new ProviderError subclass without a policy is a bug
    return Outcome(
        ledger_id, state, None, result.error_class, result.code, result.text, later, requests
    )
