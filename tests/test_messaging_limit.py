"""The messaging limit: a Cloud API account messages at most so many unique people in a rolling
window; a campaign that reaches it pauses itself, and runs again once the window has room."""

from __future__ import annotations

import redis.asyncio as aioredis

from blastd import ledger
from tests.harness import (
    SandboxHandle,
    Servers,
    blast_job,
    is_done,
    make_settings,
    numbers_from,
    running_daemon,
    wait_until,
)

JOBS = "blastd:jobs"
LIMIT = 20
WINDOW_S = 4.0


async def paused_for_limit(pool: ledger.Pool, campaign_id: str) -> bool:
    row = await pool.fetchrow(
        "SELECT state, state_reason FROM campaigns WHERE id = $1", campaign_id
    )
    return row is not None and tuple(row) == ("paused", "messaging_limit")


async def test_a_campaign_pauses_at_the_messaging_limit_and_resumes_when_the_window_frees(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    settings = make_settings(
        servers,
        sandbox.url,
        account={"messaging_limit_per_24h": LIMIT},
        messaging_limit_window_s=WINDOW_S,
    )
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("limited", numbers_from(47_000_000, 50)))
        await wait_until(lambda: paused_for_limit(pool, "limited"))
        sent_before_pause = await pool.fetchval(
            "SELECT count(*) FROM recipients WHERE campaign_id = 'limited' AND state = 'sent'"
        )
        await wait_until(lambda: is_done(pool, "limited"), timeout_s=60)
    assert sent_before_pause == LIMIT
    counts = await ledger.count_states(pool, "limited")
    assert counts == {"sent": 50}
    assert (await sandbox.stats())["accepted"] == 50


async def test_the_marketing_cap_defers_its_recipient_a_day_instead_of_failing_it(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    numbers = numbers_from(48_000_000, 3)
    await sandbox.configure(fail_numbers={numbers[0].lstrip("+"): 131049})
    async with running_daemon(make_settings(servers, sandbox.url)):
        await redis.lpush(JOBS, blast_job("capped", numbers))
        await wait_until(lambda: _sent_count_is(pool, "capped", 2))
        row = await pool.fetchrow(
            "SELECT state, error_class, next_attempt_at > now() + interval '23 hours' AS later "
            "FROM recipients WHERE phone = $1",
            numbers[0],
        )
    assert tuple(row) == ("pending", "marketing_cap", True)


async def _sent_count_is(pool: ledger.Pool, campaign_id: str, count: int) -> bool:
    counts = await ledger.count_states(pool, campaign_id)
    return counts.get("sent") == count and counts.get("pending") == 1
