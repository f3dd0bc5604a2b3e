"""The ledger read back for operators: campaign lists, recipient exports, why recipients did
not get the message, and the purge of old finished campaigns.

Each query here only reads, except `purge_finished`; none of them changes a running campaign.
"""

from __future__ import annotations

import csv
import io
import operator
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

from blastd import ledger, logs

CAMPAIGN_STATES = ("running", "paused", "stopped", "cancelled", "done")
RECIPIENT_STATES = (*ledger.ACTIVE_STATES, *ledger.FINAL_STATES)
# A purge only takes campaigns that no daemon will touch again on its own.
PURGEABLE_STATES = ("done", "cancelled", "stopped")
# States in which a recipient did not get the message; their reasons are what an operator asks.
UNDELIVERED_STATES = ("failed", "skipped", "uncertain", "expired", "cancelled", "video_failed")
# Keyset pages: one page in memory at a time, whatever the campaign's size.
EXPORT_PAGE_ROWS = 5_000


# --- campaigns -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CampaignLine:
    """One campaign as `blastd campaigns` lists it."""

    id: str
    type: str
    account: str
    state: str
    state_reason: str | None
    total: int
    done: int
    created_at: datetime
    finished_at: datetime | None
    intake_complete: bool  # False while its recipients are still being taken in

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "account": self.account,
            "state": self.state,
            "state_reason": self.state_reason,
            "intake_complete": self.intake_complete,
            "total": self.total,
            "done": self.done,
            "created_at": self.created_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


async def list_campaigns(
    pool: ledger.Pool, states: Sequence[str] = (), limit: int = 50
) -> list[CampaignLine]:
    """The newest `limit` campaigns (of `states`, when given), newest first; `done` counts the
    recipients no longer active, as `blastd status` does."""
    rows = await pool.fetch(
        """
        SELECT c.id, c.type, c.account, c.state, c.state_reason, c.total, c.created_at,
               c.finished_at, c.intake_complete,
               c.total - (SELECT count(*) FROM recipients r
                          WHERE r.campaign_id = c.id AND r.state = ANY($3::text[])) AS done
        FROM campaigns c
        WHERE cardinality($1::text[]) = 0 OR c.state = ANY($1::text[])
        ORDER BY c.created_at DESC, c.id
        LIMIT $2
        """,
        list(states),
        limit,
        list(ledger.ACTIVE_STATES),
    )
    return [CampaignLine(**dict(row)) for row in rows]


# --- recipients ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecipientLine:
    """One recipient as exported; `skip_reason` is set for skipped rows, `error_text` for the
    others (the ledger keeps both in error_text)."""

    id: int
    seq: int
    number: str
    state: str
    error_class: str | None
    error_code: str | None
    error_text: str | None
    skip_reason: str | None
    attempts: int
    provider_message_id: str | None
    next_attempt_at: datetime | None
    updated_at: datetime
    # What a report must say beside the state: possible_duplicate (resent after doubt),
    # delivered_after_failure (evidence of a send came after a recorded failure or doubt).
    flags: str


RECIPIENT_FIELDS = tuple(RecipientLine.__dataclass_fields__)

_RECIPIENT_PAGE = """
    SELECT id, seq, phone AS number, state, error_class, error_code,
           CASE WHEN state <> 'skipped' THEN error_text END AS error_text,
           CASE WHEN state = 'skipped' THEN error_text END AS skip_reason,
           attempts, provider_message_id, next_attempt_at, updated_at,
           array_to_string(flags, ' ') AS flags
    FROM recipients
    WHERE campaign_id = $1 AND id > $2
      AND (cardinality($3::text[]) = 0 OR state = ANY($3::text[]))
      AND (cardinality($4::text[]) = 0 OR error_class = ANY($4::text[]))
    ORDER BY id
    LIMIT $5
"""


@dataclass(frozen=True, slots=True)
class RecipientFilter:
    """Which recipients of a campaign to read: no states or classes means all of them."""

    campaign_id: str
    states: Sequence[str] = ()
    classes: Sequence[str] = ()
    unmask: bool = False


async def recipients_page(
    pool: ledger.Pool, which: RecipientFilter, after_id: int = 0, limit: int = EXPORT_PAGE_ROWS
) -> list[RecipientLine]:
    """Up to `limit` matching recipients with an id above `after_id`, in id order."""
    rows = await pool.fetch(
        _RECIPIENT_PAGE,
        which.campaign_id,
        after_id,
        list(which.states),
        list(which.classes),
        limit,
    )
    if which.unmask:
        return [RecipientLine(*row) for row in rows]
    # Positional, the columns in the fields' order: a million rows make the cost of a copy show.
    return [RecipientLine(row[0], row[1], mask_number(row[2]), *row[3:]) for row in rows]


async def iter_recipients(
    pool: ledger.Pool, which: RecipientFilter, page_rows: int = EXPORT_PAGE_ROWS
) -> AsyncIterator[list[RecipientLine]]:
    """Every matching recipient, page by page (keyset on id: each page is one short query, no
    transaction held open, and only one page is in memory at a time)."""
    after_id = 0
    while page := await recipients_page(pool, which, after_id, page_rows):
        yield page
        after_id = page[-1].id


def mask_number(number: str) -> str:
    """The number as the logs show it: country prefix and last four digits."""
    masked: str = logs.mask_phone_numbers(None, "", {"number": number})["number"]
    return masked


# --- CSV and JSON ----------------------------------------------------------------------------

# A spreadsheet runs a cell that starts with one of these as a formula; provider texts and the
# raw input of skipped rows are not ours, so such cells are quoted with a leading apostrophe.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"\+?[\d*]+")


def csv_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str):
        if value.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(value):
            return "'" + value
        return value
    return str(value)  # a count or an id: never read as a formula


EXPORT_FORMATS = ("text", "csv", "json")


async def export_chunks(
    pool: ledger.Pool, which: RecipientFilter, fmt: str, page_rows: int = EXPORT_PAGE_ROWS
) -> AsyncIterator[bytes]:
    """The matching recipients as `fmt` (text, csv or json), one chunk per page: written out as
    they come, a million rows never sit in memory at once."""
    pages = iter_recipients(pool, which, page_rows)
    if fmt == "json":
        yield b"["
        first = True
        async for page in pages:
            yield json_chunk(page, first=first)
            first = False
        yield b"]\n"
        return
    if fmt == "csv":
        yield csv_rows([RECIPIENT_FIELDS]).encode()
    async for page in pages:
        if fmt == "csv":
            yield csv_rows([csv_cell(value) for value in _values(line)] for line in page).encode()
        else:
            yield text_rows([_plain(value) for value in _values(line)] for line in page).encode()


_VALUES = operator.attrgetter(*RECIPIENT_FIELDS)


def _values(line: RecipientLine) -> tuple[object, ...]:
    values: tuple[object, ...] = _VALUES(line)
    return values


def _plain(value: object) -> str:
    if value is None:
        return ""
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return " ".join(text.split())  # one line per recipient, whatever a provider's text holds


def csv_rows(rows: Iterable[Sequence[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    return buffer.getvalue()


def text_rows(rows: Iterable[Sequence[str]]) -> str:
    """Two spaces between fields, '-' for an empty one: for reading and grep, not for parsing."""
    return "".join("  ".join(cell or "-" for cell in row) + "\n" for row in rows)


def recipient_json(line: RecipientLine) -> dict[str, Any]:
    return {
        name: value.isoformat() if isinstance(value, datetime) else value
        for name in RECIPIENT_FIELDS
        for value in (getattr(line, name),)
    }


def json_chunk(page: Sequence[RecipientLine], *, first: bool) -> bytes:
    """One page of the JSON array, one object per line, the comma before it unless first."""
    body = b",\n".join(orjson.dumps(recipient_json(line)) for line in page)
    return (b"\n" if first else b",\n") + body


# --- why recipients did not get the message ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reason:
    """Recipients that ended in one state for one reason: a provider's error code, or the skip
    reason of skipped ones; with the first of them as an example."""

    state: str
    error_class: str | None
    reason: str
    count: int
    example_number: str
    example_text: str | None


async def undelivered_reasons(pool: ledger.Pool, campaign_id: str) -> list[Reason]:
    """Counts per state and error code (per skip reason for skipped rows), largest first; one
    example each, its number masked. One pass over the campaign's rows, then one row per group."""
    rows = await pool.fetch(
        """
        WITH grouped AS (
            SELECT state, error_class,
                   CASE WHEN state = 'skipped' THEN coalesce(error_text, '-')
                        ELSE coalesce(error_code, error_class, '-') END AS reason,
                   count(*) AS count, min(id) AS first_id
            FROM recipients
            WHERE campaign_id = $1 AND state = ANY($2::text[])
            GROUP BY 1, 2, 3
        )
        SELECT g.state, g.error_class, g.reason, g.count, r.phone, r.error_text
        FROM grouped g JOIN recipients r ON r.id = g.first_id
        ORDER BY g.count DESC, g.state, g.reason
        """,
        campaign_id,
        list(UNDELIVERED_STATES),
    )
    return [
        Reason(
            state=row["state"],
            error_class=row["error_class"],
            reason=row["reason"],
            count=row["count"],
            example_number=mask_number(row["phone"]),
            example_text=row["error_text"],
        )
        for row in rows
    ]


# --- purge -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Purged:
    """A finished campaign a purge removed (or, dry, would remove)."""

    id: str
    state: str
    total: int
    finished_at: datetime


# Stopped campaigns may have no finished_at: their last change is when they stopped.
_PURGEABLE = """
    FROM campaigns
    WHERE state = ANY($1::text[]) AND coalesce(finished_at, updated_at) < now() - $2::interval
"""
_PURGE_COLUMNS = "id, state, total, coalesce(finished_at, updated_at) AS finished_at"


async def purge_finished(
    pool: ledger.Pool, older_than: timedelta, *, dry_run: bool = False
) -> list[Purged]:
    """Delete the campaigns done, cancelled or stopped before `older_than` ago, their
    recipients with them (ON DELETE CASCADE); with `dry_run`, only list them. Oldest first."""
    if dry_run:
        statement = f"SELECT {_PURGE_COLUMNS} {_PURGEABLE}"
    else:
        statement = f"DELETE {_PURGEABLE} RETURNING {_PURGE_COLUMNS}"
    rows = await pool.fetch(
        statement,
        list(PURGEABLE_STATES),
        older_than,
        timeout=ledger.BULK_STATEMENT_TIMEOUT_S,  # a million recipients go with one campaign
    )
    return sorted((Purged(**dict(row)) for row in rows), key=_by_finish)


def _by_finish(purged: Purged) -> datetime:
    return purged.finished_at


_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_duration(text: str) -> timedelta:
    """'30d', '12h', '1w2d': a whole number and a unit (s, m, h, d, w), repeated."""
    parts = _DURATION.findall(text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise ValueError(f"{text!r} is not a duration such as 30d, 12h or 1w2d")
    return timedelta(seconds=sum(int(n) * _UNIT_S[u] for n, u in parts))
