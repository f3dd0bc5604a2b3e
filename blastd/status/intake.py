"""Accepts a status job: its contacts put in send order (the anchor first) and stored as a campaign.

The order is decided once, here, and kept as the recipients' `seq` (ids follow it), so the
broadcast claims contacts in order and a restart resumes in the same order: the
highest-priority contact first (the anchor), then the rest by priority (`order_by_priority`),
optionally kept together by country calling code (`group_by_country`, countries in the order
their best contact comes). Ties keep the producer's order. The whole list is read before it is
ordered: a status goes to an account's contacts, tens of thousands, not millions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import orjson
import redis.exceptions
import structlog
from pydantic import ValidationError
from structlog.contextvars import bound_contextvars

from blastd import ledger
from blastd.config import StatusGatewayAccount
from blastd.errors import InvalidJobError, InvalidNumberError
from blastd.jobs import StatusContact, StatusJob, StatusOptions
from blastd.recipients import MAX_ENTRY_BYTES, BadEntry, normalize_number, preview
from blastd.status.broadcast import calling_code, initial_batch_size

if TYPE_CHECKING:
    from blastd.resources import Dependencies

log = structlog.get_logger()
_Valid = tuple[str, float]  # E.164 number, priority


async def accept_status(deps: Dependencies, job: StatusJob) -> None:
    """Store the status job as a campaign of type 'status' with its broadcast row, or drop it
    as a duplicate; raises InvalidJobError when it cannot be accepted."""
    account = deps.settings.accounts[job.account]
    if not isinstance(account, StatusGatewayAccount):
        raise InvalidJobError(f"account {preview(job.account)} is not a status_gateway", job.id)
    with bound_contextvars(job_id=job.id, campaign_id=job.id, account=job.account):
        if await deps.db(ledger.campaign_exists, job.id):
            log.info("job_duplicate")
            return
        entries = job.contacts if job.contacts is not None else await _read_key(deps, job)
        staged = stage_contacts(entries, job.options, deps.settings.default_region)
        counts = await deps.outage_call(_insert, deps, job, account, staged)
        if counts is None:
            log.info("job_duplicate")
            return
        if job.contacts_key:
            await deps.redis_call(deps.redis.delete, job.contacts_key)
        log.info("campaign_created", pending=counts.pending, skipped=counts.skipped)
        deps.campaigns_changed.set()


def stage_contacts(
    entries: Sequence[StatusContact | BadEntry], options: StatusOptions, region: str
) -> list[ledger.StagedRecipient]:
    """Every entry as a recipients row, `seq` in send order; unusable ones last, skipped."""
    valid: list[_Valid] = []
    skipped: list[tuple[str, str]] = []
    for entry in entries:
        if isinstance(entry, BadEntry):
            skipped.append((entry.raw_preview, entry.reason))
            continue
        try:
            valid.append((normalize_number(entry.to, region), entry.priority))
        except InvalidNumberError as exc:
            skipped.append((entry.to[:64], exc.reason))
    ordered = send_order(valid, options)
    staged = [ledger.StagedRecipient(seq, phone, None, None) for seq, phone in enumerate(ordered)]
    first = len(staged)
    staged += [
        ledger.StagedRecipient(first + i, raw, None, why) for i, (raw, why) in enumerate(skipped)
    ]
    return staged


def send_order(contacts: Sequence[_Valid], options: StatusOptions) -> list[str]:
    """The numbers in send order: the highest priority first (the earliest on a tie), then
    the others by priority and, if asked, grouped by calling code."""
    if not contacts:
        return []
    anchor = max(range(len(contacts)), key=lambda i: (contacts[i][1], -i))
    rest = [contact for i, contact in enumerate(contacts) if i != anchor]
    if options.order_by_priority:
        rest.sort(key=lambda contact: -contact[1])  # stable: ties keep the producer's order
    phones = [phone for phone, _ in rest]
    if options.group_by_country:
        groups: dict[str, list[str]] = {}
        for phone in phones:
            groups.setdefault(calling_code(phone), []).append(phone)
        phones = [phone for group in groups.values() for phone in group]
    return [contacts[anchor][0], *phones]


async def _insert(
    deps: Dependencies,
    job: StatusJob,
    account: StatusGatewayAccount,
    staged: list[ledger.StagedRecipient],
) -> ledger.CampaignCounts | None:
    campaign = ledger.NewCampaign(
        id=job.id,
        type="status",
        account=job.account,
        message=job.status.model_dump(mode="json", exclude_none=True),
        options=job.options.model_dump(mode="json", exclude_none=True),
    )
    async with ledger.transaction(deps.pool) as conn:
        pages = _pages(staged, deps.settings.recipients_page_size)
        counts = await ledger.insert_campaign(conn, campaign, pages)
        if counts is None:
            return None
        if counts.pending == 0:
            raise InvalidJobError("no valid contact", job.id)  # rolls the campaign back
        batch_size = initial_batch_size(counts.pending, account, job.options)
        await ledger.insert_broadcast(conn, job.id, counts.pending, batch_size)
        return counts


async def _pages(
    staged: list[ledger.StagedRecipient], size: int
) -> AsyncIterator[Sequence[ledger.StagedRecipient]]:
    for start in range(0, len(staged), size):
        yield staged[start : start + size]


async def _read_key(deps: Dependencies, job: StatusJob) -> list[StatusContact | BadEntry]:
    """The contacts in the Redis list `contacts_key`, read in pages; deleted once stored."""
    key, settings = job.contacts_key, deps.settings
    assert key is not None  # parse_job guarantees one of the two sources
    prefix = settings.redis_prefix
    if key.startswith(prefix) and not key.startswith(f"{prefix}recipients:"):
        raise InvalidJobError(f"contacts_key {key[:60]!r} names one of blastd's own keys", job.id)
    entries: list[StatusContact | BadEntry] = []
    page_size = settings.recipients_page_size
    try:
        while page := await deps.redis_call(
            deps.redis.lrange, key, len(entries), len(entries) + page_size - 1
        ):
            entries += [parse_contact_entry(raw) for raw in page]
            if len(entries) > settings.max_recipients:
                raise InvalidJobError(f"more than {settings.max_recipients} contacts", job.id)
    except redis.exceptions.ResponseError:  # WRONGTYPE: the producer named a non-list
        raise InvalidJobError(f"contacts_key {key[:60]!r} is not a list", job.id) from None
    if not entries:
        raise InvalidJobError(f"contacts_key {key[:60]!r} is empty or missing", job.id)
    return entries


def parse_contact_entry(raw: bytes | str) -> StatusContact | BadEntry:
    """One contacts_key element: JSON {"to", "priority"}, a JSON string or a bare number."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    if len(text) > MAX_ENTRY_BYTES:
        return BadEntry(preview(text), f"entry is over {MAX_ENTRY_BYTES} bytes")
    stripped = text.strip()
    value: object = {"to": stripped}
    if stripped.startswith(("{", '"')):
        try:
            value = orjson.loads(stripped)
        except orjson.JSONDecodeError as exc:
            return BadEntry(preview(stripped), f"invalid JSON: {exc.msg}")
    if isinstance(value, str):
        value = {"to": value}
    try:
        return StatusContact.model_validate(value)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in error["loc"])
        return BadEntry(preview(stripped), f"invalid contact: {where}: {error['msg']}".strip())
