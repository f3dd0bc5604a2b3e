"""End to end in one process: jobs pushed to Redis, the daemon, the sandbox over loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from blastd import ledger
from blastd.embedded import free_port
from tests.harness import (
    ACCOUNT,
    SandboxHandle,
    Servers,
    has_state,
    is_done,
    make_settings,
    running_daemon,
    wait_until,
    webhook_url,
)

NUMBERS = [f"+62812{n:08d}" for n in range(10_000_000, 10_000_000 + 60)]


def blast(job_id: str, numbers: list[str], **message: Any) -> bytes:
    return orjson.dumps(
        {
            "type": "blast",
            "id": job_id,
            "account": ACCOUNT,
            "message": message or {"text": "Halo {name}"},
            "recipients": [
                {"to": n, "vars": {"name": f"N{i}", "code": f"C{i}"}} for i, n in enumerate(numbers)
            ],
        }
    )


async def test_blast_sends_every_recipient_once_and_records_it(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    settings = make_settings(servers, sandbox.url)
    async with running_daemon(settings):
        await redis.lpush("blastd:jobs", blast("promo-1", NUMBERS))
        await wait_until(lambda: is_done(pool, "promo-1"))
    counts = await ledger.count_states(pool, "promo-1")
    assert counts == {"sent": len(NUMBERS)}
    received = await sandbox.recipients()
    assert received == {n.lstrip("+"): 1 for n in NUMBERS}
    assert await redis.llen("blastd:processing:test-instance") == 0


async def test_template_parameters_are_personalised_per_recipient(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    settings = make_settings(servers, sandbox.url)
    template = {"name": "promo_nov", "language": "id", "params": ["{name}", "{code}"]}
    async with running_daemon(settings):
        await redis.lpush("blastd:jobs", blast("promo-2", NUMBERS[:3], template=template))
        await wait_until(lambda: is_done(pool, "promo-2"))
    assert await ledger.count_states(pool, "promo-2") == {"sent": 3}


async def test_same_job_pushed_twice_creates_one_campaign(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    settings = make_settings(servers, sandbox.url)
    job = blast("promo-3", NUMBERS[:5])
    async with running_daemon(settings):
        await redis.lpush("blastd:jobs", job, job)
        await wait_until(lambda: is_done(pool, "promo-3"))
        await wait_until(lambda: _queue_drained(redis))
    assert await pool.fetchval("SELECT count(*) FROM campaigns") == 1
    assert (await sandbox.stats())["accepted"] == 5


async def test_invalid_and_duplicate_numbers_are_skipped_with_a_reason(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    settings = make_settings(servers, sandbox.url)
    numbers = ["+6281210000000", "0812-1000-0000", "6281210000000", "12345", "+6281210000001"]
    async with running_daemon(settings):
        await redis.lpush("blastd:jobs", blast("promo-4", numbers))
        await wait_until(lambda: is_done(pool, "promo-4"))
    rows = await pool.fetch("SELECT seq, state, error_text FROM recipients ORDER BY seq")
    assert [r["state"] for r in rows] == ["sent", "skipped", "skipped", "skipped", "sent"]
    assert rows[1]["error_text"] == "duplicate"
    assert "invalid" in rows[3]["error_text"]
    assert (await sandbox.stats())["accepted"] == 2


async def test_status_webhooks_move_recipients_to_read(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    admin_port = free_port()
    settings = make_settings(servers, sandbox.url, admin_port=admin_port)
    await sandbox.configure(webhook_url=webhook_url(admin_port))
    async with running_daemon(settings):
        await redis.lpush("blastd:jobs", blast("promo-5", NUMBERS[:10]))
        await wait_until(lambda: is_done(pool, "promo-5"))
        await wait_until(lambda: _all_read(pool, "promo-5"))
    ids = await pool.fetch("SELECT provider_message_id FROM recipients")
    assert all(r["provider_message_id"].startswith("wamid.") for r in ids)


async def _queue_drained(redis: aioredis.Redis) -> bool:
    return (
        await redis.llen("blastd:jobs") + await redis.llen("blastd:processing:test-instance") == 0
    )


async def _all_read(pool: ledger.Pool, campaign_id: str) -> bool:
    return await ledger.count_states(pool, campaign_id) == {"read": 10}


async def _pages(numbers: list[str]) -> AsyncIterator[list[ledger.StagedRecipient]]:
    yield [ledger.StagedRecipient(seq, phone, None, None) for seq, phone in enumerate(numbers)]


@pytest.mark.parametrize(
    ("campaign_type", "message", "reason"),
    [
        ("blast", {"text": "Halo"}, "account 'gone' is not configured"),
        (
            "video_blast",
            {"video": {"account": "no-renders"}},
            "account 'no-renders' or 'gone' is not configured",
        ),
        ("status", {"type": "text", "text": "Halo"}, "not a configured status_gateway account"),
    ],
)
async def test_a_campaign_whose_account_is_gone_is_stopped_with_the_reason(
    servers: Servers,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    campaign_type: str,
    message: dict[str, Any],
    reason: str,
) -> None:
    """Taken by a daemon that has the account, left running for one that no longer has it."""
    campaign = ledger.NewCampaign("gone-1", campaign_type, "gone", message, {})
    async with ledger.transaction(pool) as conn:
        await ledger.insert_campaign(conn, campaign, _pages(NUMBERS[:2]))
    async with running_daemon(make_settings(servers, sandbox.url)):
        await wait_until(lambda: has_state(pool, "gone-1", "stopped"))
    stopped = await ledger.load_campaign(pool, "gone-1")
    assert stopped is not None
    assert reason in (stopped.state_reason or "")
    assert await ledger.count_states(pool, "gone-1") == {"pending": 2}
    assert await sandbox.recipients() == {}


async def test_a_base_url_that_leads_nowhere_stops_the_campaign_and_fails_no_recipient(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """The sandbox answers a path it does not serve with a bare 404."""
    settings = make_settings(servers, sandbox.url, account={"base_url": f"{sandbox.url}/nowhere"})
    async with running_daemon(settings):
        await redis.lpush("blastd:jobs", blast("nowhere-1", NUMBERS[:5]))
        await wait_until(lambda: has_state(pool, "nowhere-1", "stopped"))
    stopped = await ledger.load_campaign(pool, "nowhere-1")
    assert stopped is not None
    assert (stopped.state_reason or "").startswith("http_404: ")
    assert await ledger.count_states(pool, "nowhere-1") == {"pending": 5}


async def test_an_api_version_graph_does_not_serve_stops_the_campaign_and_fails_no_recipient(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    settings = make_settings(servers, sandbox.url, account={"api_version": "v99.0"})
    async with running_daemon(settings):
        await redis.lpush("blastd:jobs", blast("old-version-1", NUMBERS[:5]))
        await wait_until(lambda: has_state(pool, "old-version-1", "stopped"))
    stopped = await ledger.load_campaign(pool, "old-version-1")
    assert stopped is not None
    assert stopped.state_reason == "2500: v99.0 is not an API version"
    assert await ledger.count_states(pool, "old-version-1") == {"pending": 5}
    assert await sandbox.recipients() == {}
