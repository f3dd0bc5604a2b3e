"""The asyncpg pool, the migrations, and every SQL statement blastd runs against the ledger."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, TypeAlias

import asyncpg
import orjson

ACTIVE_STATES = ("pending", "sending")
FINAL_STATES = (
    "sent",
    "delivered",
    "read",
    "failed",
    "skipped",
    "cancelled",
    "uncertain",
    "expired",
)
MIGRATION_LOCK_ID = 0x626C617374  # 'blast': one migrator at a time across daemons

Pool: TypeAlias = asyncpg.Pool

# What a PostgreSQL outage or restart looks like to asyncpg: wait and try again, never give up.
DB_OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now
)


async def open_pool(url: str, *, command_timeout_s: float, max_size: int = 10) -> Pool:
    """Open a pool whose connections decode jsonb with orjson."""
    pool: Pool = await asyncpg.create_pool(
        url,
        min_size=1,
        max_size=max_size,
        command_timeout=command_timeout_s,
        init=_init_connection,
    )
    return pool


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )


async def migrate(pool: Pool) -> list[str]:
    """Apply the numbered files in blastd/sql this database has not seen; return their names."""
    applied: list[str] = []
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS blastd_migrations "
            "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM blastd_migrations")}
        files = sorted(
            (f for f in resources.files("blastd.sql").iterdir() if f.name.endswith(".sql")),
            key=lambda f: f.name,
        )
        for file in files:
            if file.name not in done:
                await conn.execute(file.read_text())
                await conn.execute("INSERT INTO blastd_migrations (name) VALUES ($1)", file.name)
                applied.append(file.name)
    return applied


# --- campaigns -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewCampaign:
    id: str
    type: str
    account: str
    message: dict[str, Any]
    options: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StagedRecipient:
    """One producer entry as it will be stored: a number to send to, or a reason to skip it."""

    seq: int
    phone: str
    vars: dict[str, str] | None
    skip_reason: str | None


@dataclass(frozen=True, slots=True)
class CampaignCounts:
    pending: int
    skipped: int


async def campaign_exists(pool: Pool, campaign_id: str) -> bool:
    return bool(await pool.fetchval("SELECT 1 FROM campaigns WHERE id = $1", campaign_id))


async def insert_campaign(
    conn: asyncpg.Connection,
    campaign: NewCampaign,
    pages: AsyncIterator[Sequence[StagedRecipient]],
) -> CampaignCounts | None:
    """Insert a campaign and all its recipients inside the caller's transaction.

    Returns None when a campaign with this id exists already (the job id is an idempotency
    key). Recipients are staged page by page with COPY, so a million of them never sit in
    memory at once; duplicates of a number become 'skipped' rows with reason 'duplicate'.
    """
    inserted = await conn.fetchval(
        "INSERT INTO campaigns (id, type, account, message, options) VALUES ($1, $2, $3, $4, $5) "
        "ON CONFLICT (id) DO NOTHING RETURNING true",
        campaign.id,
        campaign.type,
        campaign.account,
        campaign.message,
        campaign.options,
    )
    if not inserted:
        return None
    await conn.execute(
        "CREATE TEMP TABLE staged_recipients (seq integer, phone text, vars text, "
        "skip_reason text) ON COMMIT DROP"
    )
    async for page in pages:
        await conn.copy_records_to_table(
            "staged_recipients",
            records=[(r.seq, r.phone, _vars_json(r.vars), r.skip_reason) for r in page],
        )
    row = await conn.fetchrow(INSERT_STAGED_RECIPIENTS, campaign.id)
    return CampaignCounts(pending=row["pending"], skipped=row["skipped"])


def _vars_json(vars: dict[str, str] | None) -> str | None:
    # Staged as text: COPY's binary format has no encoder for the connection's jsonb text codec.
    return orjson.dumps(vars).decode() if vars else None


INSERT_STAGED_RECIPIENTS = """
WITH ranked AS (
    SELECT seq, phone, vars, skip_reason,
           row_number() OVER (PARTITION BY skip_reason IS NULL, phone ORDER BY seq) AS nth
    FROM staged_recipients
), inserted AS (
    INSERT INTO recipients (campaign_id, seq, phone, vars, state, error_text)
    SELECT $1, seq, phone, vars::jsonb,
           CASE WHEN skip_reason IS NULL AND nth = 1 THEN 'pending' ELSE 'skipped' END,
           CASE WHEN skip_reason IS NOT NULL THEN skip_reason
                WHEN nth > 1 THEN 'duplicate' END
    FROM ranked ORDER BY seq
    RETURNING state
), counted AS (
    SELECT count(*) FILTER (WHERE state = 'pending') AS pending,
           count(*) FILTER (WHERE state = 'skipped') AS skipped
    FROM inserted
)
UPDATE campaigns SET total = counted.pending + counted.skipped FROM counted
WHERE campaigns.id = $1
RETURNING counted.pending, counted.skipped
"""


@dataclass(frozen=True, slots=True)
class Campaign:
    id: str
    account: str
    state: str
    state_reason: str | None
    message: dict[str, Any]
    options: dict[str, Any]
    total: int
    created_at: datetime
    finished_at: datetime | None


async def load_campaign(pool: Pool, campaign_id: str) -> Campaign | None:
    row = await pool.fetchrow(
        "SELECT id, account, state, state_reason, message, options, total, created_at, "
        "finished_at FROM campaigns WHERE id = $1",
        campaign_id,
    )
    return Campaign(**dict(row)) if row else None


async def running_campaign_ids(pool: Pool) -> list[str]:
    rows = await pool.fetch("SELECT id FROM campaigns WHERE state = 'running' ORDER BY created_at")
    return [r["id"] for r in rows]


async def set_campaign_state(pool: Pool, campaign_id: str, state: str, reason: str | None) -> None:
    await pool.execute(
        "UPDATE campaigns SET state = $2, state_reason = $3, updated_at = now() WHERE id = $1",
        campaign_id,
        state,
        reason,
    )


async def finish_campaign_if_done(pool: Pool, campaign_id: str) -> bool:
    """Mark a running campaign done once no recipient is pending or sending."""
    return bool(
        await pool.fetchval(
            "UPDATE campaigns SET state = 'done', finished_at = now(), updated_at = now() "
            "WHERE id = $1 AND state = 'running' AND NOT EXISTS (SELECT 1 FROM recipients "
            "WHERE campaign_id = $1 AND state = ANY($2::text[])) RETURNING true",
            campaign_id,
            list(ACTIVE_STATES),
        )
    )


async def next_retry_at(pool: Pool, campaign_id: str) -> datetime | None:
    """When the earliest deferred recipient of the campaign becomes due, if any."""
    value: datetime | None = await pool.fetchval(
        "SELECT min(next_attempt_at) FROM recipients WHERE campaign_id = $1 AND state = 'pending'",
        campaign_id,
    )
    return value


async def count_states(pool: Pool, campaign_id: str) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT state, count(*) AS n FROM recipients WHERE campaign_id = $1 GROUP BY state",
        campaign_id,
    )
    return {r["state"]: r["n"] for r in rows}


# --- recipients ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimedRecipient:
    id: int
    phone: str
    vars: dict[str, str] | None
    attempts: int  # earlier requests made for this recipient


async def claim_recipients(
    pool: Pool, campaign_id: str, owner: str, limit: int
) -> list[ClaimedRecipient]:
    """Take up to `limit` due pending recipients of a running campaign, in producer order.

    They become 'sending' at once: their requests leave next, so if this instance dies before
    their answers are written they are 'uncertain'. Claims are kept small (a few tens of ms of
    sending) to keep that window small; what is claimed but not sent is released to pending.
    """
    rows = await pool.fetch(
        """
        UPDATE recipients r SET state = 'sending', owner = $2, updated_at = now()
        FROM (SELECT id FROM recipients
              WHERE campaign_id = $1 AND state = 'pending'
                AND (next_attempt_at IS NULL OR next_attempt_at <= now())
              ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) due
        WHERE r.id = due.id
          -- paused, stopped or cancelled elsewhere (another daemon, an operator): claim nothing
          AND EXISTS (SELECT 1 FROM campaigns WHERE id = $1 AND state = 'running')
        RETURNING r.id, r.phone, r.vars, r.attempts
        """,
        campaign_id,
        owner,
        limit,
    )
    claimed = (ClaimedRecipient(r["id"], r["phone"], r["vars"], r["attempts"]) for r in rows)
    return sorted(claimed, key=_by_id)


def _by_id(recipient: ClaimedRecipient) -> int:
    return recipient.id


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one recipient: its new state and the provider's word on it."""

    id: int
    state: str
    provider_message_id: str | None = None
    error_class: str | None = None
    error_code: str | None = None
    error_text: str | None = None
    next_attempt_at: datetime | None = None
    requests: int = 0  # requests made for it in this delivery, added to `attempts`


# An answer is written for a row this instance claimed ('sending'); one that finds it
# delivered, read or failed was overtaken by a receipt, and the receipt has the last word.
RECEIPT_FIRST = "r.state IN ('delivered', 'read', 'failed')"


async def record_outcomes(pool: Pool, outcomes: Sequence[Outcome]) -> None:
    """Write a batch of outcomes in one statement; receipts already recorded are kept."""
    await pool.execute(
        f"""
        UPDATE recipients r SET
            state = CASE WHEN {RECEIPT_FIRST} THEN r.state ELSE o.state END,
            provider_message_id = COALESCE(o.message_id, r.provider_message_id),
            error_class = CASE WHEN {RECEIPT_FIRST} THEN r.error_class ELSE o.error_class END,
            error_code = CASE WHEN {RECEIPT_FIRST} THEN r.error_code ELSE o.error_code END,
            error_text = CASE WHEN {RECEIPT_FIRST} THEN r.error_text ELSE o.error_text END,
            next_attempt_at = o.next_at,
            attempts = r.attempts + o.requests,
            owner = NULL,
            updated_at = now()
        FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                    $7::timestamptz[], $8::integer[])
             AS o(id, state, message_id, error_class, error_code, error_text, next_at, requests)
        WHERE r.id = o.id
        """,
        [o.id for o in outcomes],
        [o.state for o in outcomes],
        [o.provider_message_id for o in outcomes],
        [o.error_class for o in outcomes],
        [o.error_code for o in outcomes],
        [o.error_text for o in outcomes],
        [o.next_attempt_at for o in outcomes],
        [o.requests for o in outcomes],
    )


async def recover_owned(pool: Pool, owner: str, *, resend_uncertain: bool) -> dict[str, int]:
    """After a crash of `owner`: its 'sending' recipients may have had their request leave, so
    they become 'uncertain', or pending again when the policy accepts a possible duplicate."""
    rows = await pool.fetch(
        """
        UPDATE recipients SET owner = NULL, updated_at = now(),
            state = CASE WHEN $2 THEN 'pending' ELSE 'uncertain' END,
            error_class = 'uncertain',
            error_text = 'daemon stopped before the answer was recorded'
        WHERE owner = $1 AND state = 'sending'
        RETURNING state
        """,
        owner,
        resend_uncertain,
    )
    counts = {"pending": 0, "uncertain": 0}
    for row in rows:
        counts[row["state"]] += 1
    return counts


@dataclass(frozen=True, slots=True)
class Receipt:
    """A provider's status report for one ledger id."""

    id: int
    state: str  # sent | delivered | read | failed
    provider_message_id: str | None
    error_code: str | None = None
    error_text: str | None = None


async def apply_receipts(pool: Pool, receipts: Sequence[Receipt]) -> int:
    """Move recipients forward by webhook receipts; repeated or late ones change nothing.

    A receipt resolves an 'uncertain' recipient (the request did reach the provider). 'failed'
    only overrides a state before delivery; sent < delivered < read otherwise.
    """
    result: str = await pool.execute(
        """
        UPDATE recipients r SET
            state = u.state,
            provider_message_id = COALESCE(r.provider_message_id, u.message_id),
            error_class = CASE WHEN u.state = 'failed' THEN 'permanent' ELSE r.error_class END,
            error_code = CASE WHEN u.state = 'failed' THEN u.error_code ELSE r.error_code END,
            error_text = CASE WHEN u.state = 'failed' THEN u.error_text ELSE r.error_text END,
            owner = CASE WHEN r.state = 'sending' THEN r.owner END,
            updated_at = now()
        FROM (SELECT DISTINCT ON (id) id, state, message_id, error_code, error_text
              FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[])
                   AS x(id, state, message_id, error_code, error_text)
              -- one receipt per recipient per batch: the furthest, failure after 'sent'
              ORDER BY id, CASE WHEN state = 'failed' THEN 1.5
                                ELSE blastd_state_rank(state) END DESC) u
        WHERE r.id = u.id AND r.state IN ('sending', 'uncertain', 'sent', 'delivered', 'read')
          AND CASE WHEN u.state = 'failed' THEN r.state IN ('sending', 'uncertain', 'sent')
                   ELSE blastd_state_rank(u.state) > blastd_state_rank(r.state) END
        """,
        [r.id for r in receipts],
        [r.state for r in receipts],
        [r.provider_message_id for r in receipts],
        [r.error_code for r in receipts],
        [r.error_text for r in receipts],
    )
    return int(result.split()[-1])


@contextlib.asynccontextmanager
async def transaction(pool: Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as conn, conn.transaction():
        yield conn
