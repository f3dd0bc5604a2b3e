"""The Marketing Messages API as an account option: marketing templates go to its endpoint,
everything else to /messages, and their statuses still find their recipients."""

from __future__ import annotations

import redis.asyncio as aioredis

from blastd import ledger
from blastd.embedded import free_port
from tests.harness import (
    SandboxHandle,
    Servers,
    blast_job,
    make_settings,
    numbers_from,
    running_daemon,
    wait_until,
    webhook_url,
)

JOBS = "blastd:jobs"


async def count_states_are(pool: ledger.Pool, campaign_id: str, expected: dict[str, int]) -> bool:
    return await ledger.count_states(pool, campaign_id) == expected


TEMPLATE = {"name": "promo_nov", "language": "id", "params": ["{name}", "x"]}


async def test_marketing_templates_go_to_the_marketing_messages_endpoint(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    admin_port = free_port()
    await sandbox.configure(webhook_url=webhook_url(admin_port))
    settings = make_settings(
        servers, sandbox.url, admin_port=admin_port, account={"marketing_messages_api": True}
    )
    utility = {"template": {**TEMPLATE, "category": "utility"}}
    async with running_daemon(settings):
        await redis.lpush(
            JOBS, blast_job("promo", numbers_from(49_000_000, 3), message={"template": TEMPLATE})
        )
        await redis.lpush(JOBS, blast_job("receipt", numbers_from(49_100_000, 2), message=utility))
        await wait_until(lambda: count_states_are(pool, "promo", {"read": 3}))
        await wait_until(lambda: count_states_are(pool, "receipt", {"read": 2}))
    stats = await sandbox.stats()
    assert stats["marketing_messages"] == 3
    assert stats["accepted"] == 5
