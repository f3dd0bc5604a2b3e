"""Opt-outs: the list the ledger keeps, how intake honours it, and what fills it."""

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
TEMPLATE = {"name": "promo_nov", "language": "id", "params": ["{name}"]}


async def skipped_reasons(pool: ledger.Pool, campaign_id: str) -> dict[str, str]:
    rows = await pool.fetch(
        "SELECT phone, error_text FROM recipients WHERE campaign_id = $1 AND state = 'skipped'",
        campaign_id,
    )
    return {r["phone"]: r["error_text"] for r in rows}


async def test_marketing_sends_skip_opted_out_numbers_and_utility_sends_do_not(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    numbers = numbers_from(40_000_000, 4)
    await pool.execute(
        "INSERT INTO optouts (phone, source) VALUES ($1, 'operator'), ($2, 'inbound')",
        numbers[0],
        numbers[2],
    )
    utility = {"template": {**TEMPLATE, "category": "utility"}}
    async with running_daemon(make_settings(servers, sandbox.url)):
        await redis.lpush(JOBS, blast_job("promo", numbers))
        await redis.lpush(JOBS, blast_job("receipt", numbers, message=utility))
        await wait_until(lambda: is_done(pool, "promo"))
        await wait_until(lambda: is_done(pool, "receipt"))
    assert await skipped_reasons(pool, "promo") == {
        numbers[0]: "opted_out",
        numbers[2]: "opted_out",
    }
    assert await skipped_reasons(pool, "receipt") == {}


async def test_the_categories_the_list_applies_to_are_a_setting(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    numbers = numbers_from(41_000_000, 2)
    await pool.execute("INSERT INTO optouts (phone, source) VALUES ($1, 'operator')", numbers[1])
    utility = {"template": {**TEMPLATE, "category": "utility"}}
    settings = make_settings(servers, sandbox.url, optout_applies_to=["utility"])
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("promo", numbers))
        await redis.lpush(JOBS, blast_job("receipt", numbers, message=utility))
        await wait_until(lambda: is_done(pool, "promo"))
        await wait_until(lambda: is_done(pool, "receipt"))
    assert await skipped_reasons(pool, "promo") == {}
    assert await skipped_reasons(pool, "receipt") == {numbers[1]: "opted_out"}
