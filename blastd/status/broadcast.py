"""Status broadcasts (docs/status.md): anchor send, then the same id resent in batches.

One contact first, the anchor (the highest-priority one): the gateway creates the status and
answers with its id. The rest get that same id in batches whose size follows the number of
contacts (the size table in docs/status.md, overridable). The ledger is the checkpoint: the
anchor's id and the batch size live in `broadcasts`, every contact's outcome in its
recipients row, so a restart goes on with the same status and never resends a batch the
gateway accepted.

A failed batch goes back to pending with a backoff and is claimed again when due, so later
batches are not held up by it (failed batches are retried after the others); a 429 holds the
broadcast and retries the same batch, waiting 1 s, then twice as long each time, up to 10 s,
as the systems blastd replaces did. A list refused as too large is split in two, and later
batches use the smaller size.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import structlog
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE

from blastd import ledger
from blastd.backoff import backoff_s
from blastd.config import StatusBatchSizes, StatusGatewayAccount
from blastd.errors import (
    BatchTooLargeError,
    NotSentError,
    ProviderError,
    ThrottledError,
    TransientError,
    UncertainOutcomeError,
)
from blastd.jobs import StatusOptions, StatusSpec
from blastd.ledger import ClaimedRecipient, Outcome
from blastd.providers.status_gateway import (
    StatusContent,
    StatusGatewayProvider,
    jid_of,
)
from blastd.runner import CampaignRun, NotConfigured, stop_state_of
from blastd.sender import Sender

if TYPE_CHECKING:
    from blastd.resources import Dependencies
    from blastd.shutdown import Shutdown

log = structlog.get_logger()

# The size table (docs/status.md): a list shorter than the n-th limit gets the n-th size,
# a longer one the last.
SIZE_LIMITS = (500, 2_000, 5_000, 10_000, 20_000)
THROTTLE_FIRST_S = 1.0  # the first hold after a rate-limit answer...
THROTTLE_MAX_S = 10.0  # ...doubling up to this
SENT_STATES = ("sent", "delivered", "read")


def batch_size_for(contacts: int, sizes: StatusBatchSizes) -> int:
    """The adaptive batch size for a status to `contacts` contacts."""
    table = (sizes.small, sizes.medium, sizes.large, sizes.xlarge, sizes.xxlarge)
    for limit, size in zip(SIZE_LIMITS, table, strict=True):
        if contacts < limit:
            return size
    return sizes.enterprise


def initial_batch_size(contacts: int, account: StatusGatewayAccount, options: StatusOptions) -> int:
    """The job's size, else the account's table; never above the gateway's known limit."""
    size = options.batch_size or batch_size_for(contacts, account.batch_sizes)
    return min(size, account.max_batch_size or size)


def calling_code(e164: str) -> str:
    """The country calling code of an E.164 number: '+6281234' -> '62'. Codes are prefix-free,
    so the first known prefix is the one."""
    digits = e164.removeprefix("+")
    for length in (1, 2, 3):
        if int(digits[:length]) in COUNTRY_CODE_TO_REGION_CODE:
            return digits[:length]
    return ""


@dataclass(frozen=True, slots=True)
class BroadcastResult:
    """The result of a broadcast: the status id, and who has it and who does not."""

    campaign_id: str
    message_id: str | None
    total_contacts: int
    sent: list[str]  # JIDs
    failed: list[str]  # JIDs
    batches_accepted: int
    batches_failed: int

    def document(self) -> dict[str, object]:
        """The result in the JSON shape smart-send callers expect (docs/status.md), plus the
        sent contacts."""
        return {
            "success": self.message_id is not None,
            "messageId": self.message_id,
            "totalRecipients": self.total_contacts,
            "sentSuccessfully": len(self.sent),
            "failed": len(self.failed),
            "batches": {
                "total": self.batches_accepted + self.batches_failed,
                "successful": self.batches_accepted,
                "failed": self.batches_failed,
            },
            "failedRecipients": self.failed,
            "sentRecipients": self.sent,
        }


async def load_result(pool: ledger.Pool, campaign_id: str) -> BroadcastResult | None:
    """The broadcast's result as the ledger has it now; None for no such broadcast."""
    broadcast = await ledger.load_broadcast(pool, campaign_id)
    if broadcast is None:
        return None
    sent = await ledger.phones_in_states(pool, campaign_id, SENT_STATES)
    failed = await ledger.phones_in_states(pool, campaign_id, ("failed",))
    return BroadcastResult(
        campaign_id,
        broadcast.message_id,
        broadcast.contacts,
        [jid_of(phone) for phone in sent],
        [jid_of(phone) for phone in failed],
        broadcast.batches_accepted,
        broadcast.batches_failed,
    )


@dataclass
class BroadcastRun(CampaignRun):
    """One status broadcast being sent by this instance."""

    sender: Sender
    provider: StatusGatewayProvider
    content: StatusContent
    options: StatusOptions
    broadcast: ledger.Broadcast
    reached: int  # contacts that have the status, anchor included
    message_id: str | None = None
    batch_size: int = 1
    batches_accepted: int = 0
    throttles: int = 0  # rate-limit answers in a row
    next_request_at: float = 0.0
    in_flight: int = 0
    batch_done: asyncio.Event = field(default_factory=asyncio.Event)
    is_id_warned: bool = False

    @property
    def account(self) -> StatusGatewayAccount:
        return self.provider.account

    @property
    def batch_delay_s(self) -> float:
        delay_ms = self.options.batch_delay_ms
        return (self.account.batch_delay_ms if delay_ms is None else delay_ms) / 1000.0

    @property
    def concurrency(self) -> int:
        return self.options.max_concurrent_batches or self.account.max_concurrent_batches

    @property
    def not_before(self) -> datetime | None:
        return None  # a status job has no start time: it goes out when taken

    async def send(self) -> None:
        """The anchor, then the batches; what came back pending while an operator's cancel
        committed is cancelled."""
        if self.message_id is None:
            await _send_anchor(self)
        if self.message_id is not None:
            await _send_batches(self)
        await self.deps.outcomes.synced()
        await self.deps.db(ledger.cancel_pending, self.campaign_id)

    async def report_finished(self, duration_s: float) -> None:
        result = await self.deps.db(load_result, self.campaign_id)
        assert result is not None
        log.info(
            "broadcast_finished",
            message_id=result.message_id,
            contacts=result.total_contacts,
            sent=len(result.sent),
            failed=len(result.failed),
            batches_accepted=result.batches_accepted,
            batches_failed=result.batches_failed,
            duration_ms=round(duration_s * 1000),
        )


async def prepare(
    deps: Dependencies, campaign: ledger.Campaign, shutdown: Shutdown, halted: asyncio.Event
) -> BroadcastRun | NotConfigured:
    """The run of a status campaign, going on from what the ledger holds of its broadcast."""
    sender = deps.senders.get(campaign.account)
    broadcast = await deps.db(ledger.load_broadcast, campaign.id)
    if sender is None or not isinstance(sender.provider, StatusGatewayProvider):
        return NotConfigured(
            f"account {campaign.account!r} is not a configured status_gateway account"
        )
    assert broadcast is not None  # inserted with the campaign
    spec = StatusSpec.model_validate(campaign.message)
    content = StatusContent(
        spec.type, spec.text, spec.url, spec.caption, spec.background_color, spec.font
    )
    counts = await deps.db(ledger.count_states, campaign.id)
    return BroadcastRun(
        deps,
        campaign,
        shutdown,
        halted,
        sender,
        sender.provider,
        content,
        StatusOptions.model_validate(campaign.options),
        broadcast,
        reached=sum(counts.get(state, 0) for state in SENT_STATES),
        message_id=broadcast.message_id,
        batch_size=broadcast.batch_size,
        batches_accepted=broadcast.batches_accepted,
    )


# --- the anchor ------------------------------------------------------------------------------


async def _send_anchor(run: BroadcastRun) -> None:
    """Post the status to the first pending contact (the highest priority): its id is the one
    every batch resends. A contact whose anchor send fails for good leaves it to the next."""
    deps = run.deps
    while run.message_id is None and not run.should_stop():
        claimed = await deps.db(
            ledger.claim_recipients, run.campaign_id, deps.settings.instance_id, 1
        )
        if not claimed:
            return
        await _try_anchor(run, claimed[0])


async def _try_anchor(run: BroadcastRun, anchor: ClaimedRecipient) -> None:
    """The anchor's own retries wait here: without its id no batch can go."""
    jids = [jid_of(anchor.phone), *([run.account.own_jid] if run.account.own_jid else [])]
    attempts = anchor.attempts
    while True:
        attempts += 1
        try:
            message_id = await _post(run, jids, None)
        except NotSentError:
            await _write(run, [Outcome(anchor.id, "pending")])
            return
        except TransientError as exc:
            if not await _wait_to_retry_anchor(run, anchor, exc, attempts):
                return
            continue
        except ProviderError as exc:
            await _anchor_refused(run, anchor, exc)
            return
        await _anchor_accepted(run, anchor, message_id, attempts - anchor.attempts)
        return


async def _wait_to_retry_anchor(
    run: BroadcastRun, anchor: ClaimedRecipient, exc: TransientError, attempts: int
) -> bool:
    """Wait out the backoff; False (the anchor recorded) when it is out of attempts or the
    broadcast stopped meanwhile."""
    await _count_request(run, accepted=False)
    log.warning("broadcast_anchor_failed", code=exc.code, reason=exc.text, attempt=attempts)
    if attempts >= run.account.retry.attempts:
        await _write(run, [_failed(anchor.id, exc, attempts - anchor.attempts)])
        return False
    await run.shutdown.wait(run.halted, _backoff_s(run, attempts))
    if run.should_stop():
        await _write(run, [Outcome(anchor.id, "pending", requests=attempts - anchor.attempts)])
        return False
    return True


async def _anchor_refused(run: BroadcastRun, anchor: ClaimedRecipient, exc: ProviderError) -> None:
    """Anything but a transient failure stops the broadcast: a refused anchor means a refused
    status (content, credentials, session), and an unreadable answer leaves no id to resend."""
    await _count_request(run, accepted=False)
    state = "uncertain" if isinstance(exc, UncertainOutcomeError) else "pending"
    outcome = Outcome(anchor.id, state, None, exc.error_class, exc.code, exc.text, requests=1)
    await _write(run, [outcome])
    state = stop_state_of(exc.error_class) or "stopped"
    run.stop(state, f"anchor refused: {exc.code}: {exc.text}", error_class=exc.error_class)


async def _anchor_accepted(
    run: BroadcastRun, anchor: ClaimedRecipient, message_id: str, requests: int
) -> None:
    deps = run.deps
    await deps.db(ledger.record_anchor, run.campaign_id, anchor.id, message_id, requests)
    run.message_id = message_id
    run.reached += 1
    run.batches_accepted += 1
    log.info("broadcast_anchor_sent", message_id=message_id, batch_size=run.batch_size)


# --- the batches -----------------------------------------------------------------------------


async def _send_batches(run: BroadcastRun) -> None:
    """Claim the next `batch_size` contacts and resend the status to them, up to the job's
    number of batches at once (one by default), until none is pending."""
    slots = asyncio.Semaphore(run.concurrency)
    async with asyncio.TaskGroup() as sends:
        while not run.should_stop():
            await slots.acquire()
            claimed = await _claim(run)
            if not claimed:
                slots.release()
                if not await _wait_for_work(run):
                    return
                continue
            run.in_flight += 1
            sends.create_task(_send_claimed(run, claimed, slots))


async def _claim(run: BroadcastRun) -> list[ClaimedRecipient]:
    deps = run.deps
    return await deps.db(
        ledger.claim_recipients,
        run.campaign_id,
        deps.settings.instance_id,
        run.batch_size,
    )


async def _wait_for_work(run: BroadcastRun) -> bool:
    """Nothing is due now: wait for a batch in flight, or for the earliest deferred retry.
    False when no contact is left pending."""
    if run.in_flight:
        run.batch_done.clear()
        await run.shutdown.wait(run.batch_done, None)
        return True
    deps = run.deps
    retry_at = await deps.db(ledger.next_retry_at, run.campaign_id)
    if retry_at is None:
        return False
    delay_s = (retry_at - datetime.now(UTC)).total_seconds()
    await run.shutdown.wait(run.halted, max(delay_s, 0.0))
    return True


async def _send_claimed(
    run: BroadcastRun, claimed: Sequence[ClaimedRecipient], slots: asyncio.Semaphore
) -> None:
    try:
        requests = _by_country(claimed) if run.options.group_by_country else [claimed]
        for index, batch in enumerate(requests):
            if run.should_stop():
                rest = [r for later in requests[index:] for r in later]
                await _write(run, [Outcome(r.id, "pending") for r in rest])
                return
            await _send_request(run, batch)
    finally:
        run.in_flight -= 1
        run.batch_done.set()
        slots.release()


def _by_country(claimed: Sequence[ClaimedRecipient]) -> list[list[ClaimedRecipient]]:
    """Consecutive contacts of one calling code go together (intake put them next to each
    other), so no request mixes countries."""
    groups: list[list[ClaimedRecipient]] = []
    previous = None
    for recipient in claimed:
        code = calling_code(recipient.phone)
        if code != previous:
            groups.append([])
            previous = code
        groups[-1].append(recipient)
    return groups


async def _send_request(run: BroadcastRun, batch: Sequence[ClaimedRecipient]) -> None:
    """Resend the status to one batch and record every contact's outcome; a batch refused as
    too large lowers the broadcast's batch size to half of it and goes again in pieces."""
    assert run.message_id is not None
    try:
        returned_id = await _post(run, [jid_of(r.phone) for r in batch], run.message_id)
    except NotSentError:
        await _write(run, [Outcome(r.id, "pending") for r in batch])
    except BatchTooLargeError as exc:
        if len(batch) == 1:
            await _batch_failed(run, batch, exc)
            return
        await _count_request(run, accepted=False)
        await _lower_batch_size(run, (len(batch) + 1) // 2, exc)
        await _send_in_chunks(run, batch)
    except ProviderError as exc:
        await _batch_failed(run, batch, exc)
    else:
        await _batch_accepted(run, batch, returned_id)


async def _send_in_chunks(run: BroadcastRun, batch: Sequence[ClaimedRecipient]) -> None:
    """Send a refused batch again in pieces of the batch size, read before each piece: a
    piece refused in turn lowers it for the pieces after it."""
    start = 0
    while start < len(batch):
        size = run.batch_size
        await _send_request(run, batch[start : start + size])
        start += size


async def _lower_batch_size(run: BroadcastRun, size: int, exc: ProviderError) -> None:
    deps = run.deps
    run.batch_size = await deps.db(ledger.lower_broadcast_batch_size, run.campaign_id, size)
    log.warning("broadcast_batch_too_large", code=exc.code, batch_size=run.batch_size)


async def _batch_accepted(
    run: BroadcastRun, batch: Sequence[ClaimedRecipient], returned_id: str
) -> None:
    await _write(run, [Outcome(r.id, "sent", returned_id, requests=1) for r in batch])
    await _count_request(run, accepted=True)
    run.batches_accepted += 1
    run.reached += len(batch)
    if returned_id != run.message_id and not run.is_id_warned:
        # The gateway made a new status instead of resending ours: viewers see several.
        run.is_id_warned = True
        log.warning("broadcast_message_id_not_honoured", message_id=run.message_id)
    contacts = run.broadcast.contacts
    log.info(
        "broadcast_batch_sent",
        batch=run.batches_accepted,
        size=len(batch),
        accepted=True,
        reached=run.reached,
        contacts=contacts,
        progress_pct=round(100 * run.reached / contacts) if contacts else 100,
    )


async def _batch_failed(
    run: BroadcastRun, batch: Sequence[ClaimedRecipient], exc: ProviderError
) -> None:
    await _write(run, [_failure_outcome(run, r, exc) for r in batch])
    await _count_request(run, accepted=False)
    log.warning(
        "broadcast_batch_failed",
        size=len(batch),
        accepted=False,
        error_class=exc.error_class,
        code=exc.code,
        reason=exc.text,
    )
    run.stop_on(exc.error_class, exc.code, exc.text)


def _failure_outcome(run: BroadcastRun, recipient: ClaimedRecipient, exc: ProviderError) -> Outcome:
    """A transient failure comes back, with the same id, after a backoff until the account's
    attempts are spent; a stop leaves the contact pending; the rest end here."""
    attempts = recipient.attempts + 1
    if isinstance(exc, TransientError) and attempts < run.account.retry.attempts:
        retry_at = datetime.now(UTC) + timedelta(seconds=_backoff_s(run, attempts))
        return Outcome(
            recipient.id, "pending", None, exc.error_class, exc.code, exc.text, retry_at, 1
        )
    if stop_state_of(exc.error_class):
        return Outcome(recipient.id, "pending", None, exc.error_class, exc.code, exc.text, None, 1)
    if isinstance(exc, UncertainOutcomeError):
        return Outcome(
            recipient.id, "uncertain", None, exc.error_class, exc.code, exc.text, None, 1
        )
    return _failed(recipient.id, exc, 1)


def _failed(ledger_id: int, exc: ProviderError, requests: int) -> Outcome:
    return Outcome(ledger_id, "failed", None, exc.error_class, exc.code, exc.text, None, requests)


def _backoff_s(run: BroadcastRun, attempts: int) -> float:
    """Exponential from the account's retry settings, with jitter: initial, 2x, 4x... to max."""
    retry = run.account.retry
    return backoff_s(attempts, retry.initial_s, retry.max_s) + random.uniform(0, retry.jitter_s)


# --- requests and records --------------------------------------------------------------------


async def _post(run: BroadcastRun, jids: list[str], message_id: str | None) -> str:
    """One request when the delay and the account's rate allow; a rate-limit answer holds the
    broadcast (Retry-After, else 1 s doubling to 10 s) and sends the same request again."""
    while True:
        await _wait_turn(run)
        if run.should_stop():
            raise NotSentError
        try:
            returned_id = await run.sender.metrics.observe_request(
                run.provider.post_status(run.content, jids, message_id)
            )
        except ThrottledError as exc:
            run.throttles += 1
            throttle_s = backoff_s(run.throttles, THROTTLE_FIRST_S, THROTTLE_MAX_S)
            hold_s = exc.retry_after_s if exc.retry_after_s is not None else throttle_s
            log.warning("broadcast_throttled", code=exc.code, hold_s=hold_s)
            run.sender.metrics.throttles.inc()
            await run.shutdown.wait(run.halted, hold_s)
            continue
        run.throttles = 0
        return returned_id


async def _wait_turn(run: BroadcastRun) -> None:
    """Space requests by the broadcast's batch delay, then by the account's own rate."""
    delay_s = run.batch_delay_s
    if delay_s:
        now = time.monotonic()
        wait_s = run.next_request_at - now
        run.next_request_at = max(now, run.next_request_at) + delay_s
        if wait_s > 0:
            await run.shutdown.wait(run.halted, wait_s)
    await run.sender.wait_turn(None)


async def _write(run: BroadcastRun, outcomes: list[Outcome]) -> None:
    """Outcomes are committed before the next batch leaves: a restart must see them."""
    await run.deps.outcomes.add_durably(outcomes)
    run.sender.metrics.count_recipients(outcomes)


async def _count_request(run: BroadcastRun, *, accepted: bool) -> None:
    deps = run.deps
    await deps.db(ledger.count_broadcast_request, run.campaign_id, accepted=accepted)
