"""Wablas campaigns through the daemon: bulk batching, the error policy of docs/errors.md class
by class, and the tracking webhook. Faults come from the Wablas sandbox's knobs; request and
per-recipient counts are the sandbox's."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from blastd import ledger
from blastd.embedded import free_port
from tests.harness import (
    WABLAS_ACCOUNT,
    WABLAS_WEBHOOK_SECRET,
    SandboxHandle,
    Servers,
    blast_job,
    digits,
    has_state,
    make_wablas_settings,
    moment_before_first_request,
    numbers_from,
    recipient_rows,
    retry,
    rows_by_phone,
    running_daemon,
    wablas_webhook_url,
    wait_until,
)

JOBS = "blastd:jobs"


def job(job_id: str, numbers: list[str], **fields: Any) -> bytes:
    return blast_job(job_id, numbers, account=WABLAS_ACCOUNT, **fields)


async def test_bulk_campaign_goes_out_in_requests_of_the_batch_size(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, wablas: SandboxHandle
) -> None:
    numbers = numbers_from(21_000_000, 250)
    settings = make_wablas_settings(servers, wablas.url)
    async with running_daemon(settings):
        await redis.lpush(JOBS, job("bulk", numbers))
        await wait_until(lambda: has_state(pool, "bulk", "done"))
    stats = await wablas.stats()
    assert stats["requests"] == 3
    assert stats["batch_sizes"] == {"100": 2, "50": 1}
    assert await wablas.recipients() == {digits(n): 1 for n in numbers}
    rows = await recipient_rows(pool, "bulk")
    assert {(r["state"], r["attempts"]) for r in rows} == {("sent", 1)}
    assert len({r["provider_message_id"] for r in rows}) == 250


async def test_single_sends_use_one_request_per_recipient(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, wablas: SandboxHandle
) -> None:
    numbers = numbers_from(21_000_300, 5)
    settings = make_wablas_settings(servers, wablas.url, account={"batch_size": 1})
    async with running_daemon(settings):
        await redis.lpush(JOBS, job("single", numbers))
        await wait_until(lambda: has_state(pool, "single", "done"))
    assert (await wablas.stats())["batch_sizes"] == {"1": 5}
    assert await ledger.count_states(pool, "single") == {"sent": 5}


async def test_transient_error_that_persists_fails_its_batch_after_the_configured_attempts(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, wablas: SandboxHandle
) -> None:
    """Batches of two: the request carrying the bad number fails as a whole, four times."""
    numbers = numbers_from(21_000_400, 4)
    await wablas.configure(fail_numbers_http={digits(numbers[1]): 503})
    account = {"batch_size": 2, **retry(4)}
    async with running_daemon(make_wablas_settings(servers, wablas.url, account=account)):
        await redis.lpush(JOBS, job("transient", numbers))
        await wait_until(lambda: has_state(pool, "transient", "done"))
    rows = await recipient_rows(pool, "transient")
    outcomes = [(r["state"], r["error_class"], r["error_code"], r["attempts"]) for r in rows]
    assert outcomes == [("failed", "transient", "http_503", 4)] * 2 + [("sent", None, None, 1)] * 2
    assert all(r["error_text"] for r in rows[:2])
    stats = await wablas.stats()
    assert (stats["requests"], stats["refused_by_reason"]) == (5, {"http_503": 4})


async def test_transient_errors_drawn_at_random_are_retried_until_sent_once(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, wablas: SandboxHandle
) -> None:
    numbers = numbers_from(21_000_500, 40)
    await wablas.configure(transient_p=0.5)
    account = {"batch_size": 4, **retry(20)}
    async with running_daemon(make_wablas_settings(servers, wablas.url, account=account)):
        await redis.lpush(JOBS, job("flaky", numbers))
        await wait_until(lambda: has_state(pool, "flaky", "done"))
    assert await ledger.count_states(pool, "flaky") == {"sent": 40}
    assert sum((await wablas.stats())["refused_by_reason"].values()) > 0
    assert await wablas.recipients() == {digits(n): 1 for n in numbers}


async def test_throttling_holds_the_account_until_retry_after_then_sends(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, wablas: SandboxHandle
) -> None:
    """Every request answers 429 with Retry-After: 1 until the first wave has been refused.
    No accepted request may arrive before Retry-After past a moment before the first one."""
    retry_after_s = 1.0
    concurrency = 3
    numbers = numbers_from(21_000_600, 30)
    await wablas.configure(throttled_p=1.0, retry_after_s=retry_after_s)
    account = {"batch_size": 10, "concurrency": concurrency}
    async with running_daemon(make_wablas_settings(servers, wablas.url, account=account)):
        pushed_at = time.monotonic()
        await redis.lpush(JOBS, job("throttled", numbers))
        before_first_request = await moment_before_first_request(wablas, pushed_at)
        await wait_until(lambda: _refused_at_least(wablas, "http_429", concurrency))
        await wablas.configure(throttled_p=0.0)
        await wait_until(lambda: has_state(pool, "throttled", "done"))
    async with wablas.http.get(f"{wablas.url}/_sandbox/arrivals") as response:
        accepted_at: list[float] = await response.json()
    assert len(accepted_at) == 3
    assert min(accepted_at) >= before_first_request + retry_after_s
    rows = await recipient_rows(pool, "throttled")
    assert {(r["state"], r["error_class"]) for r in rows} == {("sent", None)}
    assert await wablas.recipients() == {digits(n): 1 for n in numbers}


async def _refused_at_least(wablas: SandboxHandle, reason: str, count: int) -> bool:
    return bool((await wablas.stats())["refused_by_reason"].get(reason, 0) >= count)


async def test_disconnected_device_pauses_the_campaign_at_the_first_answer(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, wablas: SandboxHandle
) -> None:
    numbers = numbers_from(21_000_700, 30)
    await wablas.configure(device_connected=False)
    account = {"batch_size": 10, "concurrency": 1}
    async with running_daemon(make_wablas_settings(servers, wablas.url, account=account)):
        await redis.lpush(JOBS, job("device", numbers))
        await wait_until(lambda: has_state(pool, "device", "paused"))
    campaign = await ledger.load_campaign(pool, "device")
    assert campaign is not None
    assert campaign.state_reason is not None
    assert campaign.state_reason.startswith("device_disconnected: device disconnected")
    rows = await recipient_rows(pool, "device")
    assert [(r["state"], r["owner"]) for r in rows] == [("pending", None)] * 30
    answered = {(r["error_class"], r["error_code"]) for r in rows[:10]}
    assert answered == {("quality", "device_disconnected")}
    assert (await wablas.stats())["requests"] == 1


@pytest.mark.parametrize(
    ("knobs", "account", "code"),
    [
        ({}, {"token": "revoked-token"}, "credentials"),
        ({"quota": 5}, {}, "billing"),
        ({"max_batch": 5}, {}, "batch_too_large"),
    ],
    ids=["bad_token", "quota", "batch_too_large"],
)
async def test_campaign_fatal_refusal_stops_the_campaign_at_the_first_occurrence(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    wablas: SandboxHandle,
    knobs: dict[str, Any],
    account: dict[str, Any],
    code: str,
) -> None:
    """Only the first wave, already in flight when the first answer came back, may arrive."""
    concurrency = 2
    numbers = numbers_from(21_000_800, 80)
    await wablas.configure(**knobs)
    account = {"batch_size": 10, "concurrency": concurrency, **account}
    async with running_daemon(make_wablas_settings(servers, wablas.url, account=account)):
        await redis.lpush(JOBS, job("fatal", numbers))
        await wait_until(lambda: has_state(pool, "fatal", "stopped"))
    stats = await wablas.stats()
    assert 1 <= stats["requests"] <= concurrency, "the first wave, and not one request more"
    assert stats["accepted"] == 0
    campaign = await ledger.load_campaign(pool, "fatal")
    assert campaign is not None
    assert campaign.state_reason is not None
    assert campaign.state_reason.startswith(f"{code}:")
    assert await ledger.count_states(pool, "fatal") == {"pending": len(numbers)}
    answered = await pool.fetch(
        "SELECT DISTINCT error_class, error_code FROM recipients WHERE error_class IS NOT NULL"
    )
    assert [tuple(r) for r in answered] == [("campaign_fatal", code)]


async def test_a_refused_item_fails_only_that_recipient(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, wablas: SandboxHandle
) -> None:
    numbers = numbers_from(21_000_900, 5)
    bad = numbers[3]
    await wablas.configure(fail_numbers={digits(bad): "rejected"}, reverse_items=True)
    async with running_daemon(make_wablas_settings(servers, wablas.url, account=retry(5))):
        await redis.lpush(JOBS, job("permanent", numbers))
        await wait_until(lambda: has_state(pool, "permanent", "done"))
    rows = await rows_by_phone(pool, "permanent")
    failed = rows[bad]
    assert (failed["state"], failed["error_class"], failed["error_code"]) == (
        "failed",
        "permanent",
        "item_rejected",
    )
    assert failed["error_text"] == "failure configured for this recipient"
    assert [rows[n]["state"] for n in numbers if n != bad] == ["sent"] * 4
    assert (await wablas.stats())["requests"] == 1


async def test_template_campaign_on_a_wablas_account_fails_without_sending(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, wablas: SandboxHandle
) -> None:
    numbers = numbers_from(21_001_000, 3)
    message = {"template": {"name": "promo_nov", "language": "id", "params": ["{name}"]}}
    async with running_daemon(make_wablas_settings(servers, wablas.url)):
        await redis.lpush(JOBS, job("template", numbers, message=message))
        await wait_until(lambda: has_state(pool, "template", "done"))
    rows = await recipient_rows(pool, "template")
    assert {(r["state"], r["error_code"], r["error_text"]) for r in rows} == {
        ("failed", "template_unsupported", "template messages need a cloud_api account")
    }
    assert (await wablas.stats())["requests"] == 0


@pytest.mark.parametrize(
    ("knobs", "uncertain"),
    [({"malformed_body_p": 1.0}, 6), ({"omit_numbers": ["6281221001100"]}, 1)],
    ids=["unreadable_answer", "item_missing"],
)
async def test_uncertain_recipients_are_never_resent(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    wablas: SandboxHandle,
    knobs: dict[str, Any],
    uncertain: int,
) -> None:
    """The sandbox took every message; the answer does not say so for some. A restart and a
    later campaign do not resend them."""
    numbers = numbers_from(21_001_100, 6)
    await wablas.configure(**knobs)
    settings = make_wablas_settings(servers, wablas.url)
    async with running_daemon(settings):
        await redis.lpush(JOBS, job("garbled", numbers))
        await wait_until(lambda: has_state(pool, "garbled", "done"))
    counts = await ledger.count_states(pool, "garbled")
    assert counts == {"uncertain": uncertain, **({"sent": 6 - uncertain} if uncertain < 6 else {})}
    await wablas.configure(malformed_body_p=0.0, omit_numbers=[])
    marker = numbers_from(21_001_200, 1)
    async with running_daemon(settings):
        await redis.lpush(JOBS, job("marker", marker))
        await wait_until(lambda: has_state(pool, "marker", "done"))
    assert await ledger.count_states(pool, "garbled") == counts
    assert await wablas.recipients() == {digits(n): 1 for n in [*numbers, *marker]}


async def test_tracking_webhook_moves_recipients_to_read_and_failed(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, wablas: SandboxHandle
) -> None:
    numbers = numbers_from(21_001_300, 4)
    bad = numbers[2]
    admin_port = free_port()
    await wablas.configure(
        webhook_url=wablas_webhook_url(admin_port),
        webhook_secret=WABLAS_WEBHOOK_SECRET,
        async_fail_numbers={digits(bad): "cancel"},
    )
    settings = make_wablas_settings(servers, wablas.url, admin_port=admin_port)
    async with running_daemon(settings):
        await redis.lpush(JOBS, job("tracked", numbers))
        await wait_until(lambda: _webhooks_delivered(wablas, 3 * 3 + 1))
        await wait_until(lambda: has_state(pool, "tracked", "done"))
    rows = await rows_by_phone(pool, "tracked")
    assert [rows[n]["state"] for n in numbers] == ["read", "read", "failed", "read"]
    failed = rows[bad]
    assert (failed["error_class"], failed["error_code"], failed["error_text"]) == (
        "permanent",
        "tracking_cancel",
        "cancel",
    )


async def _webhooks_delivered(wablas: SandboxHandle, count: int) -> bool:
    return bool((await wablas.stats())["webhook_statuses_delivered"] == count)


async def test_tracking_webhook_with_a_bad_secret_gets_401_and_changes_nothing(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, wablas: SandboxHandle
) -> None:
    numbers = numbers_from(21_001_400, 2)
    admin_port = free_port()
    settings = make_wablas_settings(servers, wablas.url, admin_port=admin_port)
    async with running_daemon(settings), aiohttp.ClientSession() as http:
        await redis.lpush(JOBS, job("guarded", numbers))
        await wait_until(lambda: has_state(pool, "guarded", "done"))
        rows = await recipient_rows(pool, "guarded")
        body = orjson.dumps([{"id": r["provider_message_id"], "status": "read"} for r in rows])
        url = wablas_webhook_url(admin_port)
        for params in ({"secret": "wrong"}, {}):
            async with http.post(url, params=params, data=body) as response:
                assert response.status == 401
        async with http.post(url, params={"secret": WABLAS_WEBHOOK_SECRET}, data=b"{") as response:
            assert response.status == 400
    assert await ledger.count_states(pool, "guarded") == {"sent": 2}
