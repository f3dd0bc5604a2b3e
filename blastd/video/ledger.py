"""Every SQL statement of the video pipeline (schema in sql/005_video.sql).

The recipients row is the checkpoint of a render as of a message: a restart carries on from
its state, `video_job_id` and `video_url`, never from memory. The Redis keys of the polling
loop only say when to look next; whatever they lose is rebuilt from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from blastd.ledger import NewCampaign, Pool

_RUNNING = "EXISTS (SELECT 1 FROM campaigns WHERE id = r.campaign_id AND state = 'running')"


@dataclass(frozen=True, slots=True)
class RenderClaim:
    id: int
    vars: dict[str, str] | None
    renders: int  # submissions made for it before this one


@dataclass(frozen=True, slots=True)
class Submission:
    id: int
    video_job_id: str


@dataclass(frozen=True, slots=True)
class RenderFailure:
    id: int
    error_class: str
    error_code: str
    error_text: str


async def claim_renders(pool: Pool, campaign_id: str, owner: str, limit: int) -> list[RenderClaim]:
    """Take up to `limit` pending recipients of a running campaign for submission.

    They are 'rendering' with `owner` set and no job id yet: should this instance die now,
    their submissions may or may not have reached the provider, and the recovery looks them
    up by reference (`orphaned_renders`) instead of submitting them again blindly."""
    rows = await pool.fetch(
        f"""
        UPDATE recipients r SET state = 'rendering', owner = $2, video_job_id = NULL,
            video_url = NULL, render_started_at = now(), renders = r.renders + 1,
            updated_at = now()
        FROM (SELECT id FROM recipients WHERE campaign_id = $1 AND state = 'pending'
              ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) due
        WHERE r.id = due.id AND {_RUNNING}
        RETURNING r.id, r.vars, r.renders - 1 AS renders
        """,
        campaign_id,
        owner,
        limit,
    )
    return sorted((RenderClaim(r["id"], r["vars"], r["renders"]) for r in rows), key=_claim_id)


def _claim_id(claim: RenderClaim) -> int:
    return claim.id


async def save_submissions(pool: Pool, submissions: Sequence[Submission]) -> None:
    """Record the job ids of submitted renders: one statement per progress batch."""
    await pool.execute(
        """
        UPDATE recipients r SET video_job_id = s.job_id, owner = NULL, updated_at = now()
        FROM unnest($1::bigint[], $2::text[]) AS s(id, job_id)
        WHERE r.id = s.id AND r.state = 'rendering'
        """,
        [s.id for s in submissions],
        [s.video_job_id for s in submissions],
    )


async def fail_renders(pool: Pool, failures: Sequence[RenderFailure]) -> None:
    """Renders that ended in an error, or whose submission was refused, end 'video_failed'."""
    await pool.execute(
        """
        UPDATE recipients r SET state = 'video_failed', owner = NULL, error_class = f.class,
            error_code = f.code, error_text = f.text, updated_at = now()
        FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[])
             AS f(id, class, code, text)
        WHERE r.id = f.id AND r.state = 'rendering'
        """,
        [f.id for f in failures],
        [f.error_class for f in failures],
        [f.error_code for f in failures],
        [f.error_text for f in failures],
    )


async def release_renders(pool: Pool, ids: Sequence[int]) -> None:
    """Claimed renders that were never submitted (a stop came first) go back to pending."""
    await pool.execute(
        "UPDATE recipients SET state = 'pending', owner = NULL, renders = renders - 1, "
        "updated_at = now() WHERE id = ANY($1::bigint[]) AND state = 'rendering' "
        "AND video_job_id IS NULL",
        list(ids),
    )


async def recover_renders(pool: Pool, owner: str) -> int:
    """After a crash of `owner`: its submissions in flight lose their owner, which marks them
    for the lookup by reference (`orphaned_renders`)."""
    result: str = await pool.execute(
        "UPDATE recipients SET owner = NULL, updated_at = now() "
        "WHERE owner = $1 AND state = 'rendering' AND video_job_id IS NULL",
        owner,
    )
    return int(result.split()[-1])


async def orphaned_renders(pool: Pool, campaign_id: str) -> list[int]:
    """Renders whose submission a crashed instance left unrecorded."""
    rows = await pool.fetch(
        "SELECT id FROM recipients WHERE campaign_id = $1 AND state = 'rendering' "
        "AND video_job_id IS NULL AND owner IS NULL ORDER BY id",
        campaign_id,
    )
    return [r["id"] for r in rows]


async def resubmit_render(pool: Pool, recipient_id: int) -> bool:
    """A render to submit again (not found after a crash, or a provider-side error worth
    another try): back to pending, its old job forgotten."""
    return bool(
        await pool.fetchval(
            "UPDATE recipients SET state = 'pending', owner = NULL, video_job_id = NULL, "
            "updated_at = now() WHERE id = $1 AND state = 'rendering' RETURNING true",
            recipient_id,
        )
    )


@dataclass(frozen=True, slots=True)
class Render:
    """A render the polling loop follows."""

    id: int
    video_job_id: str
    started_at: datetime


async def renders_in_progress(pool: Pool, campaign_id: str) -> list[Render]:
    rows = await pool.fetch(
        "SELECT id, video_job_id, render_started_at FROM recipients "
        "WHERE campaign_id = $1 AND state = 'rendering' AND video_job_id IS NOT NULL",
        campaign_id,
    )
    return [Render(r["id"], r["video_job_id"], r["render_started_at"]) for r in rows]


async def mark_rendered(pool: Pool, recipient_id: int, video_job_id: str, url: str) -> bool:
    """The render is done: keep its link. False when the row moved on meanwhile (cancelled,
    already rendered by another daemon, or resubmitted under another job id)."""
    return bool(
        await pool.fetchval(
            "UPDATE recipients SET state = 'rendered', video_url = $3, rendered_at = now(), "
            "updated_at = now() WHERE id = $1 AND state = 'rendering' AND video_job_id = $2 "
            "RETURNING true",
            recipient_id,
            video_job_id,
            url,
        )
    )


async def fail_render(
    pool: Pool, recipient_id: int, video_job_id: str, failure: RenderFailure
) -> bool:
    """The render of this job failed or timed out; False when the row moved on meanwhile."""
    return bool(
        await pool.fetchval(
            "UPDATE recipients SET state = 'video_failed', error_class = $3, error_code = $4, "
            "error_text = $5, owner = NULL, updated_at = now() "
            "WHERE id = $1 AND state = 'rendering' AND video_job_id = $2 RETURNING true",
            recipient_id,
            video_job_id,
            failure.error_class,
            failure.error_code,
            failure.error_text,
        )
    )


async def record_notice(pool: Pool, recipient_id: int, notice: str) -> None:
    await pool.execute("UPDATE recipients SET notice = $2 WHERE id = $1", recipient_id, notice)


@dataclass(frozen=True, slots=True)
class VideoDelivery:
    """A rendered video claimed for delivery, with what its message needs."""

    id: int
    campaign_id: str
    campaign_type: str
    account: str  # the messaging account
    message: dict[str, Any]  # the campaign's stored message (texts and render spec)
    phone: str
    vars: dict[str, str] | None
    video_url: str
    attempts: int
    elapsed_s: float  # from the render's submission to its completion


async def claim_delivery(pool: Pool, recipient_id: int, owner: str) -> VideoDelivery | None:
    """Take a rendered video of a running campaign for sending: 'sending' first, as any
    message (a crash now leaves it 'uncertain', never sent twice)."""
    row = await pool.fetchrow(
        f"""
        UPDATE recipients r SET state = 'sending', owner = $2, updated_at = now()
        FROM campaigns c
        WHERE r.id = $1 AND r.state = 'rendered' AND c.id = r.campaign_id AND {_RUNNING}
        RETURNING r.id, r.campaign_id, c.type, c.account, c.message, r.phone, r.vars,
                  r.video_url, r.attempts,
                  extract(epoch FROM r.rendered_at - r.render_started_at) AS elapsed_s
        """,
        recipient_id,
        owner,
    )
    if row is None:
        return None
    return VideoDelivery(
        row["id"],
        row["campaign_id"],
        row["type"],
        row["account"],
        row["message"],
        row["phone"],
        row["vars"],
        row["video_url"],
        row["attempts"],
        float(row["elapsed_s"] or 0.0),
    )


async def rendered_ids(pool: Pool, campaign_id: str, limit: int) -> list[int]:
    """Rendered videos waiting for delivery (after a pause, a restart, a delivery retry)."""
    rows = await pool.fetch(
        "SELECT id FROM recipients WHERE campaign_id = $1 AND state = 'rendered' "
        "ORDER BY id LIMIT $2",
        campaign_id,
        limit,
    )
    return [r["id"] for r in rows]


@dataclass(frozen=True, slots=True)
class NoticeTarget:
    """A recipient whose render failed, with what its failure notice needs."""

    id: int
    account: str
    message: dict[str, Any]
    phone: str
    vars: dict[str, str] | None


async def notice_target(pool: Pool, recipient_id: int) -> NoticeTarget | None:
    row = await pool.fetchrow(
        "SELECT r.id, c.account, c.message, r.phone, r.vars FROM recipients r "
        "JOIN campaigns c ON c.id = r.campaign_id WHERE r.id = $1",
        recipient_id,
    )
    return NoticeTarget(**dict(row)) if row else None


async def insert_poll_campaign(
    conn: asyncpg.Connection,
    campaign: NewCampaign,
    phone: str,
    video_job_id: str,
    started_at: datetime,
) -> int | None:
    """A video_poll campaign and its one recipient, already rendering; the recipient's id, or
    None when a campaign with this id exists (the job id is the idempotency key)."""
    inserted = await conn.fetchval(
        "INSERT INTO campaigns (id, type, account, message, options, total) "
        "VALUES ($1, $2, $3, $4, $5, 1) ON CONFLICT (id) DO NOTHING RETURNING true",
        campaign.id,
        campaign.type,
        campaign.account,
        campaign.message,
        campaign.options,
    )
    if not inserted:
        return None
    recipient_id: int = await conn.fetchval(
        "INSERT INTO recipients (campaign_id, seq, phone, state, video_job_id, "
        "render_started_at, renders) VALUES ($1, 0, $2, 'rendering', $3, $4, 1) RETURNING id",
        campaign.id,
        phone,
        video_job_id,
        started_at,
    )
    return recipient_id


async def requeue_renders(conn: asyncpg.Connection, campaign_id: str) -> int:
    """Operator's retry, scope videos: failed renders are submitted again."""
    result: str = await conn.execute(
        "UPDATE recipients SET state = 'pending', owner = NULL, video_job_id = NULL, "
        "video_url = NULL, error_class = NULL, error_code = NULL, error_text = NULL, "
        "notice = NULL, updated_at = now() WHERE campaign_id = $1 AND state = 'video_failed'",
        campaign_id,
    )
    return int(result.split()[-1])


@dataclass(frozen=True, slots=True)
class RenderInfo:
    campaign_type: str
    renders: int


async def render_info(pool: Pool, recipient_id: int) -> RenderInfo | None:
    row = await pool.fetchrow(
        "SELECT c.type, r.renders FROM recipients r JOIN campaigns c ON c.id = r.campaign_id "
        "WHERE r.id = $1",
        recipient_id,
    )
    return RenderInfo(row["type"], row["renders"]) if row else None


async def poll_recipient_id(pool: Pool, campaign_id: str) -> int | None:
    """The one recipient of a video_poll campaign."""
    value: int | None = await pool.fetchval(
        "SELECT r.id FROM recipients r JOIN campaigns c ON c.id = r.campaign_id "
        "WHERE c.id = $1 AND c.type = 'video_poll'",
        campaign_id,
    )
    return value


async def recent_render_times(pool: Pool, video_account: str, limit: int) -> list[float]:
    """Seconds from submission to completion of the account's latest renders, newest first."""
    rows = await pool.fetch(
        """
        SELECT extract(epoch FROM r.rendered_at - r.render_started_at) AS seconds
        FROM recipients r JOIN campaigns c ON c.id = r.campaign_id
        WHERE r.rendered_at IS NOT NULL AND c.message -> 'video' ->> 'account' = $1
        ORDER BY r.rendered_at DESC LIMIT $2
        """,
        video_account,
        limit,
    )
    return [float(r["seconds"]) for r in rows]
