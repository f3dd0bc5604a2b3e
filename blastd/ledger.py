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

# A campaign is done once none of its recipients is in one of these.
ACTIVE_STATES = ("pending", "sending", "rendering", "rendered")
FINAL_STATES = (
    "sent",
    "delivered",
    "read",
    "failed",
    "skipped",
    "cancelled",
    "uncertain",
    "expired",
    "video_failed",
)
MIGRATION_LOCK_ID = 0x626C617374  # 'blast': one migrator at a time across daemons

Pool: TypeAlias = asyncpg.Pool

# Moving a million staged recipients into the ledger (one sort for the duplicates, index
# inserts) takes tens of seconds on a busy host. Under the pool's command timeout it would
# time out, be taken for an outage and start over forever; a dead server still fails fast.
BULK_STATEMENT_TIMEOUT_S = 900.0


async def open_pool(
    url: str, *, command_timeout_s: float, max_size: int = 10, keep_open: bool = False
) -> Pool:
    """Open a pool whose connections decode jsonb with orjson. With `keep_open` (the daemon),
    every connection is opened now and kept, idle or not: one opened when a campaign starts,
    while its intake keeps PostgreSQL busy, took 50-110 ms, and a paced campaign's claims look
    only 100 ms ahead, so its first sends waited for connections."""
    pool: Pool = await asyncpg.create_pool(
        url,
        min_size=max_size if keep_open else 1,
        max_size=max_size,
        max_inactive_connection_lifetime=0 if keep_open else 300,
        command_timeout=command_timeout_s,
        init=_init_connection,
        reset=_keep_session,
    )
    return pool


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Hand a connection back as it is. asyncpg still rolls back a transaction left open; its
    default reset adds a round trip per release (advisory locks, cursors, LISTEN, settings),
    state our statements never leave behind: a lock is taken per transaction, the staging
    table is dropped on commit. An idle daemon made as many of those as of its own queries."""


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
    time_zone: str | None = None  # for a campaign with a sending window


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
    skip_opted_out: bool = False,
) -> CampaignCounts | None:
    """Insert a campaign and all its recipients inside the caller's transaction.

    Returns None when a campaign with this id exists already (the job id is an idempotency
    key). Recipients are staged page by page with COPY, so a million of them never sit in
    memory at once; duplicates of a number become 'skipped' rows with reason 'duplicate', and
    with `skip_opted_out` numbers on the opt-out list become 'skipped' with reason 'opted_out'.
    """
    if not await _insert_campaign_row(conn, campaign, complete=True, length=None):
        return None
    await conn.execute(
        "CREATE TEMP TABLE staged_recipients (seq integer, phone text, vars text, "
        "skip_reason text, time_zone text) ON COMMIT DROP"
    )
    async for page in pages:
        await conn.copy_records_to_table(
            "staged_recipients",
            timeout=BULK_STATEMENT_TIMEOUT_S,
            records=[
                (r.seq, r.phone, _vars_json(r.vars), r.skip_reason, r.time_zone) for r in page
            ],
        )
    if skip_opted_out:
        await conn.execute(
            SKIP_OPTED_OUT.format(staged="staged_recipients"), timeout=BULK_STATEMENT_TIMEOUT_S
        )
    row = await conn.fetchrow(
        INSERT_STAGED_RECIPIENTS, campaign.id, timeout=BULK_STATEMENT_TIMEOUT_S
    )
    return CampaignCounts(pending=row["pending"], skipped=row["skipped"])


def _vars_json(vars: dict[str, str] | None) -> str | None:
    # Staged as text: COPY's binary format has no encoder for the connection's jsonb text codec.
    return orjson.dumps(vars).decode() if vars else None


# Marks the staged numbers on the opt-out list; formatted with the staging table's name.
SKIP_OPTED_OUT = """
UPDATE {staged} s SET skip_reason = 'opted_out'
FROM optouts o WHERE o.phone = s.phone AND s.skip_reason IS NULL
"""

INSERT_STAGED_RECIPIENTS = """
WITH ranked AS (
    SELECT seq, phone, vars, skip_reason, time_zone,
           row_number() OVER (PARTITION BY skip_reason IS NULL, phone ORDER BY seq) AS nth
    FROM staged_recipients
), inserted AS (
    INSERT INTO recipients (campaign_id, seq, phone, vars, state, error_text, time_zone)
    SELECT $1, seq, phone, vars::jsonb,
           CASE WHEN skip_reason IS NULL AND nth = 1 THEN 'pending' ELSE 'skipped' END,
           CASE WHEN skip_reason IS NOT NULL THEN skip_reason
                WHEN nth > 1 THEN 'duplicate' END,
           time_zone
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


# --- intake page by page ---------------------------------------------------------------------
# A campaign from a producer's list is committed with its first page(s), and every later page
# in its own transaction; campaigns.intake_seq (sql/010_intake.sql) makes each page commit once.


@dataclass(frozen=True, slots=True)
class Intake:
    """Where a campaign's intake stands."""

    complete: bool
    next_seq: int  # the seq of the first entry not in the ledger yet
    length: int | None  # entries the producer's list held when the intake began
    state: str


async def load_intake(pool: Pool, campaign_id: str) -> Intake | None:
    row = await pool.fetchrow(
        "SELECT intake_complete, intake_seq, intake_length, state FROM campaigns WHERE id = $1",
        campaign_id,
    )
    return Intake(*row) if row else None


async def insert_campaign_head(
    conn: asyncpg.Connection, campaign: NewCampaign, length: int
) -> bool:
    """Insert the campaign row, its intake not complete; False when the id exists already."""
    return await _insert_campaign_row(conn, campaign, complete=False, length=length)


async def _insert_campaign_row(
    conn: asyncpg.Connection, campaign: NewCampaign, *, complete: bool, length: int | None
) -> bool:
    return bool(
        await conn.fetchval(
            "INSERT INTO campaigns (id, type, account, message, options, intake_complete, "
            "intake_length) VALUES ($1, $2, $3, $4, $5, $6, $7) "
            "ON CONFLICT (id) DO NOTHING RETURNING true",
            campaign.id,
            campaign.type,
            campaign.account,
            campaign.message,
            campaign.options,
            complete,
            length,
        )
    )


async def insert_recipient_page(
    conn: asyncpg.Connection,
    campaign_id: str,
    page: Sequence[StagedRecipient],
    *,
    skip_opted_out: bool,
    last: bool,
) -> CampaignCounts | None:
    """Add one page (consecutive seqs) to a campaign being taken in, in the caller's
    transaction; `last` completes the intake. Entries another take committed already are left
    out (its pages may be cut differently); None when that is all of them, or the intake is
    over.

    Same rules as a campaign inserted whole: a number already in the campaign, or earlier in
    the page, is skipped as 'duplicate'; with `skip_opted_out`, numbers on the opt-out list are
    skipped as 'opted_out'. In a cancelled campaign the page's numbers arrive cancelled."""
    # The row lock orders this page after any other take's and after a control's change.
    row = await conn.fetchrow(
        "SELECT intake_seq, intake_complete FROM campaigns WHERE id = $1 FOR UPDATE", campaign_id
    )
    if row is None or row["intake_complete"]:
        return None
    page = [r for r in page if r.seq >= row["intake_seq"]]
    if not page or page[0].seq != row["intake_seq"]:
        return None
    await conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS staged_page (seq integer, phone text, vars text, "
        "skip_reason text, time_zone text) ON COMMIT DROP"
    )
    await conn.copy_records_to_table(
        "staged_page",
        timeout=BULK_STATEMENT_TIMEOUT_S,
        records=[(r.seq, r.phone, _vars_json(r.vars), r.skip_reason, r.time_zone) for r in page],
    )
    if skip_opted_out:
        await conn.execute(
            SKIP_OPTED_OUT.format(staged="staged_page"), timeout=BULK_STATEMENT_TIMEOUT_S
        )
    counted = await conn.fetchrow(
        INSERT_PAGE, campaign_id, page[-1].seq + 1, last, timeout=BULK_STATEMENT_TIMEOUT_S
    )
    await conn.execute("TRUNCATE staged_page")  # the next page of this transaction starts empty
    return CampaignCounts(pending=counted["pending"], skipped=counted["skipped"])


async def stop_intake(pool: Pool, campaign_id: str, reason: str) -> bool:
    """Stop a campaign whose intake cannot go on (what it has is all it gets); False when its
    intake was complete after all."""
    return bool(
        await pool.fetchval(
            "UPDATE campaigns SET state = 'stopped', state_reason = $2, updated_at = now() "
            "WHERE id = $1 AND NOT intake_complete AND state <> 'cancelled' RETURNING true",
            campaign_id,
            reason,
        )
    )


# A number already in the campaign (an earlier page) is found by the insert itself, through
# recipients_one_per_number: ON CONFLICT leaves it out of `fresh`, and `rest` stores it
# skipped. (An EXISTS probe per row let the planner scan the campaign's rows for every page.)
INSERT_PAGE = """
WITH ranked AS (
    SELECT seq, phone, vars, skip_reason, time_zone,
           row_number() OVER (PARTITION BY skip_reason IS NULL, phone ORDER BY seq) AS nth
    FROM staged_page
), fresh AS (
    INSERT INTO recipients (campaign_id, seq, phone, vars, state, time_zone)
    SELECT $1, seq, phone, vars::jsonb,
           CASE WHEN (SELECT state FROM campaigns WHERE id = $1) = 'cancelled'
                THEN 'cancelled' ELSE 'pending' END,
           time_zone
    FROM ranked WHERE skip_reason IS NULL AND nth = 1 ORDER BY seq
    ON CONFLICT (campaign_id, phone) WHERE state <> 'skipped' DO NOTHING
    RETURNING seq, state
), rest AS (
    INSERT INTO recipients (campaign_id, seq, phone, vars, state, error_text, time_zone)
    SELECT $1, seq, phone, vars::jsonb, 'skipped', COALESCE(skip_reason, 'duplicate'), time_zone
    FROM ranked WHERE NOT EXISTS (SELECT 1 FROM fresh WHERE fresh.seq = ranked.seq)
    RETURNING state
), counted AS (
    SELECT (SELECT count(*) FILTER (WHERE state = 'pending') FROM fresh) AS pending,
           (SELECT count(*) FROM rest) AS skipped,
           (SELECT count(*) FROM fresh) + (SELECT count(*) FROM rest) AS entries
)
UPDATE campaigns SET total = total + counted.entries, intake_seq = $2,
       intake_complete = $3, updated_at = now()
FROM counted WHERE campaigns.id = $1
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
    intake_complete: bool  # False while recipients are still being taken in


async def load_campaign(pool: Pool, campaign_id: str) -> Campaign | None:
    row = await pool.fetchrow(
        "SELECT id, account, state, state_reason, message, options, total, created_at, "
        "finished_at, intake_complete FROM campaigns WHERE id = $1",
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
    """Mark a running campaign done once its recipients are all taken in, none is pending or
    sending, and none waits for reconciliation (uncertain, its doubt not yet decided)."""
    return bool(
        await pool.fetchval(
            "UPDATE campaigns SET state = 'done', finished_at = now(), updated_at = now() "
            "WHERE id = $1 AND state = 'running' AND intake_complete "
            "AND NOT EXISTS (SELECT 1 FROM recipients "
            "WHERE campaign_id = $1 AND (state = ANY($2::text[]) "
            "OR (state = 'uncertain' AND doubt_since IS NOT NULL))) RETURNING true",
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


# What a report says of a recipient besides its state (sql/006_recipient_fate.sql).
FLAGS = ("possible_duplicate", "delivered_after_failure")


async def count_states_and_flags(
    pool: Pool, campaign_id: str
) -> tuple[dict[str, int], dict[str, int]]:
    """A campaign's recipients per state, and per flag, in the one scan count_states makes."""
    rows = await pool.fetch(
        "SELECT state, count(*) AS n, "
        "count(*) FILTER (WHERE 'possible_duplicate' = ANY(flags)) AS possible_duplicate, "
        "count(*) FILTER (WHERE 'delivered_after_failure' = ANY(flags)) "
        "AS delivered_after_failure "
        "FROM recipients WHERE campaign_id = $1 GROUP BY state",
        campaign_id,
    )
    flags = {flag: sum(r[flag] for r in rows) for flag in FLAGS}
    return {r["state"]: r["n"] for r in rows}, {f: n for f, n in flags.items() if n}


async def pending_time_zones(pool: Pool, campaign_id: str) -> list[str]:
    """The distinct zones of a campaign's pending recipients: one index probe per zone."""
    rows = await pool.fetch(
        """
        WITH RECURSIVE zones(name) AS (
            (SELECT time_zone FROM recipients
             WHERE campaign_id = $1 AND state = 'pending' AND time_zone IS NOT NULL
             ORDER BY time_zone LIMIT 1)
            UNION ALL
            SELECT (SELECT time_zone FROM recipients
                    WHERE campaign_id = $1 AND state = 'pending' AND time_zone > zones.name
                    ORDER BY time_zone LIMIT 1)
            FROM zones WHERE zones.name IS NOT NULL
        )
        SELECT name FROM zones WHERE name IS NOT NULL
        """,
        campaign_id,
    )
    return [r["name"] for r in rows]


async def expire_pending(pool: Pool, campaign_id: str) -> int:
    """Pending recipients of a campaign past its not_after end 'expired'; return how many."""
    result: str = await pool.execute(
        "UPDATE recipients SET state = 'expired', error_text = 'not sent before not_after', "
        "next_attempt_at = NULL, updated_at = now() "
        "WHERE campaign_id = $1 AND state = 'pending'",
        campaign_id,
    )
    return int(result.split()[-1])


async def cancel_pending(executor: Pool | asyncpg.Connection, campaign_id: str) -> int:
    """Pending recipients of a cancelled campaign end 'cancelled', and so do videos not yet
    delivered (a render still running is then never delivered); return how many.

    Also run after a campaign's sends: a claim released (or a send deferred) while the cancel
    committed comes back pending, and must not stay so."""
    result: str = await executor.execute(
        "UPDATE recipients SET state = 'cancelled', next_attempt_at = NULL, updated_at = now() "
        "WHERE campaign_id = $1 AND state IN ('pending', 'rendering', 'rendered') "
        "AND EXISTS (SELECT 1 FROM campaigns WHERE id = $1 AND state = 'cancelled')",
        campaign_id,
    )
    return int(result.split()[-1])


# --- controls (pause, resume, cancel, retry_failed) -------------------------------------------


async def lock_campaign_state(conn: asyncpg.Connection, campaign_id: str) -> str | None:
    """The campaign's state, its row locked until the transaction ends; None if there is none."""
    state: str | None = await conn.fetchval(
        "SELECT state FROM campaigns WHERE id = $1 FOR UPDATE", campaign_id
    )
    return state


async def record_control(
    conn: asyncpg.Connection, control_id: str, campaign_id: str, action: str
) -> bool:
    """Remember a control job by its id; False when it was applied before."""
    return bool(
        await conn.fetchval(
            "INSERT INTO controls (id, campaign_id, action) VALUES ($1, $2, $3) "
            "ON CONFLICT (id) DO NOTHING RETURNING true",
            control_id,
            campaign_id,
            action,
        )
    )


async def change_campaign_state(
    conn: asyncpg.Connection, campaign_id: str, state: str, reason: str | None
) -> None:
    """Set an operator's state; finished_at is set by a cancel and cleared by a reopening."""
    await conn.execute(
        "UPDATE campaigns SET state = $2, state_reason = $3, updated_at = now(), "
        "finished_at = CASE WHEN $2 = 'cancelled' THEN now() "
        "WHEN $2 = 'running' THEN NULL ELSE finished_at END WHERE id = $1",
        campaign_id,
        state,
        reason,
    )


async def requeue_recipients(
    conn: asyncpg.Connection, campaign_id: str, classes: Sequence[str], to_state: str = "pending"
) -> int:
    """Failed recipients of `classes` (and uncertain ones, if 'uncertain' is among them) go
    back to `to_state` with their attempts kept; sent, delivered and read are never touched.
    A video campaign's go back to 'rendered': their video is sent again, not rendered again.

    A recipient with evidence of a send (a provider message id, a receipt) is never requeued:
    its failure is the provider's word after the message reached it. An uncertain one sent
    again is flagged possible_duplicate."""
    result: str = await conn.execute(
        f"""
        UPDATE recipients SET state = $3, owner = NULL, next_attempt_at = NULL,
            error_class = NULL, error_code = NULL, error_text = NULL, updated_at = now(),
            flags = CASE WHEN state = 'uncertain' THEN {_ADD_POSSIBLE_DUPLICATE}
                         ELSE flags END
        WHERE campaign_id = $1
          AND ((state = 'failed' AND error_class = ANY($2::text[]))
               OR (state = 'uncertain' AND 'uncertain' = ANY($2::text[])))
          AND provider_message_id IS NULL AND receipt_at IS NULL
          AND blastd_may_move(state, $3)
        """,
        campaign_id,
        list(classes),
        to_state,
    )
    return int(result.split()[-1])


_ADD_POSSIBLE_DUPLICATE = (
    "CASE WHEN 'possible_duplicate' = ANY(flags) THEN flags "
    "ELSE flags || 'possible_duplicate'::text END"
)


# --- recipients ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimedRecipient:
    id: int
    phone: str
    vars: dict[str, str] | None
    attempts: int  # earlier requests made for this recipient


# `id > $5` starts the scan after the caller's previous claim. Without it, each claim walked
# the campaign's index entries from its first recipient, the ones already sent included (their
# dead versions stay in the index until a vacuum), so a claim cost grew with the campaign.
_CLAIM = """
        UPDATE recipients r SET state = 'sending', owner = $2, claim_token = $4, updated_at = now()
        FROM (SELECT id FROM recipients
              WHERE campaign_id = $1 AND state = 'pending' AND id > $5
                AND (next_attempt_at IS NULL OR next_attempt_at <= now()){zone_filter}
              ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) due
        WHERE r.id = due.id
          -- paused, stopped or cancelled elsewhere (another daemon, an operator): claim nothing
          AND EXISTS (SELECT 1 FROM campaigns WHERE id = $1 AND state = 'running')
        RETURNING r.id, r.phone, r.vars, r.attempts
"""
CLAIM_DUE = _CLAIM.format(zone_filter="")
# Two statements, not one with "$6 IS NULL OR": each keeps a plan that fits it.
CLAIM_DUE_IN_ZONES = _CLAIM.format(zone_filter=" AND time_zone = ANY($6::text[])")


async def claim_recipients(
    pool: Pool,
    campaign_id: str,
    owner: str,
    limit: int,
    time_zones: Sequence[str] | None = None,
    *,
    token: int | None = None,
    after: int = 0,
) -> list[ClaimedRecipient]:
    """Take up to `limit` due pending recipients of a running campaign with ids above `after`,
    in producer order; with `time_zones`, only recipients in those zones (the ones inside the
    sending window). `token` tells this claim's rows from an orphaned claim's (Claims).

    The claim is the intent to send: they become 'sending' at once, so if this instance dies
    before their answers are written they are 'uncertain'. Claims are kept small (the requests
    about to leave) to keep that window small; what is claimed but not sent is released to
    pending."""
    if time_zones is None:
        rows = await pool.fetch(CLAIM_DUE, campaign_id, owner, limit, token, after)
    else:
        rows = await pool.fetch(
            CLAIM_DUE_IN_ZONES, campaign_id, owner, limit, token, after, list(time_zones)
        )
    claimed = (ClaimedRecipient(r["id"], r["phone"], r["vars"], r["attempts"]) for r in rows)
    return sorted(claimed, key=_by_id)


async def release_orphans(
    pool: Pool,
    owner: str,
    tokens: tuple[int, int],
    live_ids: Sequence[int],
    claiming: Sequence[int],
) -> int:
    """Free what `owner` claimed under tokens in the range `tokens` and no longer holds
    (`live_ids` are the ones it works on, `claiming` the tokens whose claim has not answered
    yet): a claim whose commit it never heard back. No request left for them, so they go back
    to 'pending'."""
    result: str = await pool.execute(
        """
        UPDATE recipients SET state = 'pending', owner = NULL, updated_at = now()
        WHERE owner = $1 AND state = 'sending'
          AND claim_token BETWEEN $2 AND $3 AND NOT (id = ANY($4::bigint[]))
          AND NOT (claim_token = ANY($5::bigint[]))
        """,
        owner,
        tokens[0],
        tokens[1],
        list(live_ids),
        list(claiming),
    )
    return int(result.split()[-1])


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


# An answer is written for a row this instance claimed ('sending'). One that finds the row
# moved on was overtaken by a receipt, which has the last word, except that an answer with a
# message id resolves a row another instance's recovery made uncertain meanwhile. Either way
# the move must be one blastd_may_move allows (sql/006_recipient_fate.sql).
ANSWER_APPLIES = (
    "(r.state = 'sending' OR (r.state = 'uncertain' AND o.state = 'sent')) "
    "AND blastd_may_move(r.state, o.state)"
)


# BY_ID: a statement that updates recipients joined to a batch also names their ids as
# `r.id = ANY(...)`, so the rows are found through the primary key whatever the planner's
# statistics say. Planned while the table still looked small (a new database, the first big
# campaign, before autovacuum's next analyze), the join alone read every recipient for each
# batch: a hash join over a sequential scan, 15-80 ms a batch at 100,000 recipients.

# A recipient deferred for the marketing cap meets it again: it fails instead of waiting more.
CAPPED_AGAIN = "(o.error_class = 'marketing_cap' AND r.error_class = 'marketing_cap')"


async def record_outcomes(pool: Pool, outcomes: Sequence[Outcome]) -> None:
    """Write a batch of outcomes in one statement; receipts already recorded are kept. A
    recipient that failed as opted out puts its number on the opt-out list in the same
    statement, so the list never misses a refusal the ledger recorded."""
    await pool.execute(
        f"""
        WITH written AS (
        UPDATE recipients r SET
            state = CASE WHEN {ANSWER_APPLIES}
                         THEN CASE WHEN {CAPPED_AGAIN} THEN 'failed' ELSE o.state END
                         ELSE r.state END,
            provider_message_id = COALESCE(o.message_id, r.provider_message_id),
            error_class = CASE WHEN {ANSWER_APPLIES} THEN o.error_class ELSE r.error_class END,
            error_code = CASE WHEN {ANSWER_APPLIES} THEN o.error_code ELSE r.error_code END,
            error_text = CASE WHEN {ANSWER_APPLIES} THEN o.error_text ELSE r.error_text END,
            next_attempt_at = CASE WHEN {CAPPED_AGAIN} THEN NULL ELSE o.next_at END,
            attempts = r.attempts + o.requests,
            owner = NULL,
            updated_at = now()
        FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                    $7::timestamptz[], $8::integer[])
             AS o(id, state, message_id, error_class, error_code, error_text, next_at, requests)
        WHERE r.id = o.id AND r.id = ANY($1::bigint[])  -- see BY_ID
        RETURNING r.phone, r.state, r.error_class, r.error_text
        )
        INSERT INTO optouts (phone, source, reason)
        SELECT DISTINCT ON (phone) phone, 'provider', error_text FROM written
        WHERE state = 'failed' AND error_class = 'opted_out'
        ON CONFLICT (phone) DO NOTHING
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


async def recover_owned(pool: Pool, owner: str) -> int:
    """After a crash of `owner`: its 'sending' recipients may have had their request leave, so
    they become 'uncertain'; reconciliation (blastd.reconcile) decides their fate once their
    receipts have had time to come. Returns how many."""
    result: str = await pool.execute(
        """
        UPDATE recipients SET owner = NULL, updated_at = now(), state = 'uncertain',
            error_class = 'uncertain',
            error_text = 'daemon stopped before the answer was recorded'
        WHERE owner = $1 AND state = 'sending'
        """,
        owner,
    )
    return int(result.split()[-1])


@dataclass(frozen=True, slots=True)
class Decision:
    """What reconciliation made of one recipient in doubt."""

    campaign_id: str
    state: str  # 'pending' or 'rendered' (sent again), 'uncertain' (held)


async def reconcile_doubts(
    pool: Pool, window_s: float, *, resend: bool, limit: int
) -> list[Decision]:
    """Decide up to `limit` uncertain recipients whose doubt is older than `window_s`: no
    receipt came for them (one would have moved them on). With `resend`, each goes back to be
    sent again (a video's message: to 'rendered') flagged possible_duplicate, unless it was
    resent after doubt before, its campaign is cancelled, or it is a status broadcast's (a
    second status would reach every contact); all others are held for an operator."""
    rows = await pool.fetch(
        f"""
        WITH due AS (
            SELECT r.id, $2 AND c.state <> 'cancelled' AND c.type <> 'status'
                       AND NOT 'possible_duplicate' = ANY(r.flags) AS resend,
                   c.type IN ('video_blast', 'video_poll') AS is_video
            FROM recipients r JOIN campaigns c ON c.id = r.campaign_id
            WHERE r.state = 'uncertain' AND r.doubt_since IS NOT NULL
              AND r.doubt_since <= now() - make_interval(secs => $1)
            ORDER BY r.doubt_since LIMIT $3 FOR UPDATE OF r SKIP LOCKED
        )
        UPDATE recipients r SET
            state = CASE WHEN NOT due.resend THEN r.state
                         WHEN due.is_video THEN 'rendered' ELSE 'pending' END,
            flags = CASE WHEN due.resend THEN {_ADD_POSSIBLE_DUPLICATE} ELSE r.flags END,
            error_class = CASE WHEN due.resend THEN NULL ELSE r.error_class END,
            error_code = CASE WHEN due.resend THEN NULL ELSE r.error_code END,
            error_text = CASE WHEN due.resend THEN NULL ELSE r.error_text END,
            owner = NULL, next_attempt_at = NULL, doubt_since = NULL, updated_at = now()
        FROM due WHERE r.id = due.id
        RETURNING r.campaign_id, r.state
        """,
        window_s,
        resend,
        limit,
    )
    return [Decision(r["campaign_id"], r["state"]) for r in rows]


@dataclass(frozen=True, slots=True)
class Receipt:
    """A provider's status report: matched by its message id first (the recipient holds the
    id its send was answered with), by our ledger id, when the provider echoed it, second."""

    id: int | None
    state: str  # sent | delivered | read | failed
    provider_message_id: str | None
    error_code: str | None = None
    error_text: str | None = None
    account: str = ""  # the webhook's account: labels the ones that match no recipient


@dataclass(frozen=True, slots=True)
class ReceiptsApplied:
    moved: int  # recipients now in a receipt's state
    unmatched: list[Receipt]  # receipts no recipient matched


# A receipt moves a recipient when blastd_may_move allows it (sql/006_recipient_fate.sql);
# a 'failed' one only before delivery.
RECEIPT_APPLIES = (
    "(u.state <> r.state AND blastd_may_move(r.state, u.state) "
    "AND (u.state <> 'failed' OR r.state IN ('sending', 'uncertain', 'sent')))"
)


async def apply_receipts(pool: Pool, receipts: Sequence[Receipt]) -> int:
    """apply_receipts_reporting, for callers that only need how many recipients moved."""
    return (await apply_receipts_reporting(pool, receipts)).moved


async def apply_receipts_reporting(pool: Pool, receipts: Sequence[Receipt]) -> ReceiptsApplied:
    """Move recipients forward by webhook receipts, in one statement; repeated or late ones
    change nothing.

    A receipt finds its recipient by message id (recipients_by_message_id), else by the
    ledger id it carries: a provider need not echo our id, and a lost answer never gave us
    the message id. A receipt resolves an 'uncertain' recipient (the request did reach the
    provider), and evidence of a send overrides a 'failed' one (flagged
    delivered_after_failure by the trigger). 'failed' only overrides a state before delivery;
    sent < delivered < read otherwise. The first receipt for a sent recipient stamps
    receipt_at, applied or not.
    """
    row = await pool.fetchrow(
        f"""
        WITH x AS (
            SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[])
                   WITH ORDINALITY AS x(id, state, message_id, error_code, error_text, nth)
        ), matched AS (
            SELECT x.*, COALESCE(
                -- both agree: the common case, and the one a shared message id needs
                (SELECT o.id FROM recipients o
                 WHERE o.id = x.id AND o.provider_message_id = x.message_id),
                (SELECT m.id FROM recipients m WHERE m.provider_message_id = x.message_id
                 ORDER BY m.id LIMIT 1),
                (SELECT o.id FROM recipients o WHERE o.id = x.id)) AS target
            FROM x
        ), u AS (
            -- one receipt per recipient per batch: the furthest, failure after 'sent'
            SELECT DISTINCT ON (target) target AS id, state, message_id, error_code, error_text
            FROM matched WHERE target IS NOT NULL
            ORDER BY target, CASE WHEN state = 'failed' THEN 1.5
                                  ELSE blastd_state_rank(state) END DESC
        ), moved AS (
            UPDATE recipients r SET
                state = CASE WHEN {RECEIPT_APPLIES} THEN u.state ELSE r.state END,
                provider_message_id = COALESCE(r.provider_message_id, u.message_id),
                error_class = CASE WHEN {RECEIPT_APPLIES} AND u.state = 'failed'
                                   THEN 'permanent' ELSE r.error_class END,
                error_code = CASE WHEN {RECEIPT_APPLIES} AND u.state = 'failed'
                                  THEN u.error_code ELSE r.error_code END,
                error_text = CASE WHEN {RECEIPT_APPLIES} AND u.state = 'failed'
                                  THEN u.error_text ELSE r.error_text END,
                owner = CASE WHEN r.state = 'sending' THEN r.owner END,
                receipt_at = COALESCE(r.receipt_at, now()),
                updated_at = now()
            FROM u
            WHERE r.id = u.id AND r.id = ANY(ARRAY(SELECT id FROM u))  -- see BY_ID
              AND r.state NOT IN ('pending', 'rendering', 'rendered')
              AND ({RECEIPT_APPLIES} OR r.receipt_at IS NULL)
            -- now in the receipt's state: moved by it, or confirmed in it
            RETURNING r.state = u.state AS applied
        )
        SELECT (SELECT count(*) FROM moved WHERE applied) AS moved,
               ARRAY(SELECT nth FROM matched WHERE target IS NULL ORDER BY nth) AS unmatched
        """,
        [r.id for r in receipts],
        [r.state for r in receipts],
        [r.provider_message_id for r in receipts],
        [r.error_code for r in receipts],
        [r.error_text for r in receipts],
    )
    return ReceiptsApplied(row["moved"], [receipts[nth - 1] for nth in row["unmatched"]])


@dataclass(frozen=True, slots=True)
class MessageReceipt:
    """A provider's status report naming its own message id instead of our ledger id."""

    provider_message_id: str
    state: str  # sent | delivered | read | failed
    error_code: str | None = None
    error_text: str | None = None


async def apply_receipts_by_message_id(pool: Pool, receipts: Sequence[MessageReceipt]) -> int:
    """apply_receipts for receipts matched by the provider message id stored at send time.

    Ids no recipient holds (not yet recorded, or sent from elsewhere) change nothing.
    """
    rows = await pool.fetch(
        "SELECT id, provider_message_id FROM recipients WHERE provider_message_id = ANY($1)",
        list({r.provider_message_id for r in receipts}),
    )
    ledger_ids: dict[str, list[int]] = {}
    for row in rows:
        ledger_ids.setdefault(row["provider_message_id"], []).append(row["id"])
    resolved = [
        Receipt(ledger_id, r.state, r.provider_message_id, r.error_code, r.error_text)
        for r in receipts
        for ledger_id in ledger_ids.get(r.provider_message_id, ())
    ]
    return await apply_receipts(pool, resolved) if resolved else 0


@contextlib.asynccontextmanager
async def transaction(pool: Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as conn, conn.transaction():
        yield conn


# --- status broadcasts -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Broadcast:
    """A status campaign's progress: the anchor's status id once sent, and the batch size."""

    campaign_id: str
    contacts: int
    batch_size: int
    message_id: str | None
    anchor_id: int | None
    batches_accepted: int
    batches_failed: int


async def campaign_type(executor: Pool | asyncpg.Connection, campaign_id: str) -> str | None:
    value: str | None = await executor.fetchval(
        "SELECT type FROM campaigns WHERE id = $1", campaign_id
    )
    return value


async def insert_broadcast(
    conn: asyncpg.Connection, campaign_id: str, contacts: int, batch_size: int
) -> None:
    """Add the broadcast row inside the transaction that inserts its campaign."""
    await conn.execute(
        "INSERT INTO broadcasts (campaign_id, contacts, batch_size) VALUES ($1, $2, $3)",
        campaign_id,
        contacts,
        batch_size,
    )


async def load_broadcast(pool: Pool, campaign_id: str) -> Broadcast | None:
    row = await pool.fetchrow(
        "SELECT campaign_id, contacts, batch_size, message_id, anchor_id, batches_accepted, "
        "batches_failed FROM broadcasts WHERE campaign_id = $1",
        campaign_id,
    )
    return Broadcast(**dict(row)) if row else None


async def record_anchor(
    pool: Pool, campaign_id: str, anchor_id: int, message_id: str, requests: int
) -> None:
    """The anchor contact is sent and its status id kept, in one statement: a restart never
    sees the id without the anchor sent, nor the anchor sent without the id."""
    await pool.execute(
        """
        WITH anchor AS (
            UPDATE recipients SET state = 'sent', provider_message_id = $3, owner = NULL,
                error_class = NULL, error_code = NULL, error_text = NULL,
                next_attempt_at = NULL, attempts = attempts + $4, updated_at = now()
            WHERE id = $2 AND blastd_may_move(state, 'sent')  -- a receipt may have come first
        )
        UPDATE broadcasts SET message_id = $3, anchor_id = $2,
            batches_accepted = batches_accepted + 1, updated_at = now()
        WHERE campaign_id = $1
        """,
        campaign_id,
        anchor_id,
        message_id,
        requests,
    )


async def count_broadcast_request(pool: Pool, campaign_id: str, *, accepted: bool) -> None:
    await pool.execute(
        "UPDATE broadcasts SET updated_at = now(), "
        "batches_accepted = batches_accepted + CASE WHEN $2 THEN 1 ELSE 0 END, "
        "batches_failed = batches_failed + CASE WHEN $2 THEN 0 ELSE 1 END "
        "WHERE campaign_id = $1",
        campaign_id,
        accepted,
    )


async def lower_broadcast_batch_size(pool: Pool, campaign_id: str, batch_size: int) -> int:
    """Keep the smaller of the stored and the given batch size; return the one now stored."""
    value: int = await pool.fetchval(
        "UPDATE broadcasts SET batch_size = LEAST(batch_size, $2), updated_at = now() "
        "WHERE campaign_id = $1 RETURNING batch_size",
        campaign_id,
        batch_size,
    )
    return value


async def phones_in_states(pool: Pool, campaign_id: str, states: Sequence[str]) -> list[str]:
    """The numbers of a campaign's recipients in `states`, in producer order."""
    rows = await pool.fetch(
        "SELECT phone FROM recipients WHERE campaign_id = $1 AND state = ANY($2::text[]) "
        "ORDER BY seq",
        campaign_id,
        list(states),
    )
    return [r["phone"] for r in rows]


# --- opt-outs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptOut:
    """A number on the opt-out list, how it got there and when."""

    phone: str
    source: str
    reason: str | None
    created_at: datetime


async def add_optouts(pool: Pool, phones: Sequence[str], source: str, reason: str | None) -> int:
    """Put numbers on the opt-out list; one already there keeps its first source. Returns how
    many were new."""
    result: str = await pool.execute(
        "INSERT INTO optouts (phone, source, reason) SELECT DISTINCT p, $2, $3 "
        "FROM unnest($1::text[]) AS p ON CONFLICT (phone) DO NOTHING",
        list(phones),
        source,
        reason,
    )
    return int(result.split()[-1])


async def load_optouts(pool: Pool) -> frozenset[str]:
    """Every number on the opt-out list, for a plan to count against."""
    rows = await pool.fetch("SELECT phone FROM optouts")
    return frozenset(r["phone"] for r in rows)


async def remove_optouts(pool: Pool, phones: Sequence[str]) -> int:
    """Take numbers off the opt-out list; returns how many were on it."""
    result: str = await pool.execute(
        "DELETE FROM optouts WHERE phone = ANY($1::text[])", list(phones)
    )
    return int(result.split()[-1])


async def list_optouts(pool: Pool, limit: int) -> list[OptOut]:
    """The most recent opt-outs first."""
    rows = await pool.fetch(
        "SELECT phone, source, reason, created_at FROM optouts "
        "ORDER BY created_at DESC, phone LIMIT $1",
        limit,
    )
    return [OptOut(r["phone"], r["source"], r["reason"], r["created_at"]) for r in rows]


# --- messaging limit --------------------------------------------------------------------------


async def recipients_in_window(pool: Pool, accounts: Sequence[str], window_s: float) -> int:
    """Unique numbers the accounts messaged within the window, with those claimed or in
    flight now (they will be messaged): what the messaging limit has used."""
    used: int = await pool.fetchval(
        """
        SELECT count(DISTINCT r.phone) FROM recipients r JOIN campaigns c ON c.id = r.campaign_id
        WHERE c.account = ANY($1::text[]) AND (
            (r.state IN ('sent', 'delivered', 'read', 'uncertain')
             AND r.updated_at > now() - make_interval(secs => $2))
            OR r.state = 'sending')
        """,
        list(accounts),
        window_s,
    )
    return used


async def campaigns_paused_for(pool: Pool, reason: str) -> list[tuple[str, str]]:
    """(id, account) of the campaigns paused with this reason."""
    rows = await pool.fetch(
        "SELECT id, account FROM campaigns WHERE state = 'paused' AND state_reason = $1", reason
    )
    return [(r["id"], r["account"]) for r in rows]


async def resume_paused_for(pool: Pool, campaign_id: str, reason: str) -> bool:
    """Run a campaign again if it is still paused for this reason (not by an operator since)."""
    result: str = await pool.execute(
        "UPDATE campaigns SET state = 'running', state_reason = NULL, updated_at = now() "
        "WHERE id = $1 AND state = 'paused' AND state_reason = $2",
        campaign_id,
        reason,
    )
    return result.endswith(" 1")
