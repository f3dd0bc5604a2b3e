"""Status webhooks matched by message id first and our opaque id second, through the admin
endpoint with signed payloads; what matches nobody is counted and logged, sparingly."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from blastd import ledger, metrics
from blastd.embedded import free_port
from tests.harness import (
    ACCOUNT,
    APP_SECRET,
    SandboxHandle,
    Servers,
    blast_job,
    campaign_state,
    is_ready,
    make_settings,
    numbers_from,
    running_daemon,
    wait_until,
    webhook_url,
)

JOBS = "blastd:jobs"


def _unmatched(reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "blastd_receipts_unmatched_total", {"account": ACCOUNT, "reason": reason}
    )
    return value or 0.0


async def _post_signed(http: aiohttp.ClientSession, url: str, document: Any) -> int:
    body = orjson.dumps(document)
    signature = hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"X-Hub-Signature-256": f"sha256={signature}", "Content-Type": "application/json"}
    async with http.post(url, data=body, headers=headers) as response:
        return response.status


def _webhook(value: dict[str, Any]) -> dict[str, Any]:
    change = {"field": "messages", "value": {"messaging_product": "whatsapp", **value}}
    return {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [change]}]}


def _status(message_id: str, state: str, **fields: Any) -> dict[str, Any]:
    return {"id": message_id, "status": state, "recipient_id": "6281200000001", **fields}


async def test_statuses_without_our_opaque_field_are_matched_by_message_id(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    admin_port = free_port()
    await sandbox.configure(
        webhook_url=webhook_url(admin_port), webhook_omit_callback_data=True, webhook_delay_ms=200
    )
    before = _unmatched("unknown_message")
    async with running_daemon(make_settings(servers, sandbox.url, admin_port=admin_port)):
        await redis.lpush(JOBS, blast_job("by-wamid", numbers_from(41_200_000, 8)))
        await wait_until(lambda: _counts_are(pool, "by-wamid", {"read": 8}))
    assert await campaign_state(pool, "by-wamid") == "done"
    assert (await sandbox.stats())["webhook_statuses_delivered"] == 24
    assert _unmatched("unknown_message") == before


async def test_the_message_id_wins_and_unmatched_statuses_and_system_errors_are_counted(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    admin_port = free_port()
    settings = make_settings(servers, sandbox.url, admin_port=admin_port)
    async with running_daemon(settings), aiohttp.ClientSession() as http:
        await redis.lpush(JOBS, blast_job("matched", numbers_from(41_300_000, 2)))
        await wait_until(lambda: _counts_are(pool, "matched", {"sent": 2}))
        rows = await pool.fetch(
            "SELECT id, provider_message_id FROM recipients WHERE campaign_id = 'matched' "
            "ORDER BY id"
        )
        (first_id, first_wamid), (second_id, _second_wamid) = (tuple(r) for r in rows)
        await wait_until(lambda: is_ready(admin_port))
        unknown, system = _unmatched("unknown_message"), _unmatched("system_error")
        statuses = [
            # the wamid names the first; a wrong opaque id must not move the second
            _status(first_wamid, "delivered", biz_opaque_callback_data=f"blastd:{second_id}"),
            _status("wamid.nobody-knows", "read"),
            _status("wamid.nobody-either", "delivered", biz_opaque_callback_data="blastd:0"),
        ]
        errors = [{"code": 131000, "title": "Something went wrong"}]
        url = webhook_url(admin_port)
        assert await _post_signed(http, url, _webhook({"statuses": statuses})) == 200
        assert await _post_signed(http, url, _webhook({"errors": errors})) == 200
        assert _unmatched("unknown_message") - unknown == 2
        assert _unmatched("system_error") - system == 1
    states = {r["id"]: r["state"] for r in await pool.fetch("SELECT id, state FROM recipients")}
    assert states == {first_id: "delivered", second_id: "sent"}


def test_unmatched_receipts_log_one_line_per_account_and_reason_per_interval() -> None:
    now = [0.0]
    tally = metrics.UnmatchedReceipts(every_s=60.0, clock=lambda: now[0])
    with capture_logs() as logs:
        tally.count("acct-a", "unknown_message", 3)
        tally.count("acct-a", "unknown_message", 4)  # within the minute: counted, not logged
        tally.count("acct-b", "unknown_message", 1)  # another account has its own line
        now[0] = 61.0
        tally.count("acct-a", "unknown_message", 2)
    lines = [(e["account"], e["count"]) for e in logs if e["event"] == "receipts_unmatched"]
    assert lines == [("acct-a", 3), ("acct-b", 1), ("acct-a", 6)]
    assert metrics.REGISTRY.get_sample_value(
        "blastd_receipts_unmatched_total", {"account": "acct-a", "reason": "unknown_message"}
    ) == pytest.approx(9.0)


async def _counts_are(pool: ledger.Pool, campaign_id: str, counts: dict[str, int]) -> bool:
    return await ledger.count_states(pool, campaign_id) == counts
