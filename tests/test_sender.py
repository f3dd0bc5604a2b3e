"""The error policy of docs/errors.md, class by class, through the daemon and the sandbox.

Faults come from the sandbox's knobs: `fail_numbers` answers a Graph code for one recipient
every time, the `*_p` probabilities draw a fault per request. Request counts are the sandbox's.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from blastd import ledger
from blastd.embedded import free_port
from tests.harness import (
    SandboxHandle,
    Servers,
    blast_job,
    campaign_state,
    digits,
    events_named,
    has_state,
    make_settings,
    moment_before_first_request,
    numbers_from,
    recipient_rows,
    retry,
    rows_by_phone,
    running_daemon,
    wait_until,
    webhook_url,
)

JOBS = "blastd:jobs"


async def rejected(sandbox: SandboxHandle, code: str) -> int:
    count: int = (await sandbox.stats())["rejected_by_code"].get(code, 0)
    return count


@pytest.mark.parametrize(
    ("knob", "value", "code"),
    [
        ("fail_numbers", 131000, "131000"),
        ("fail_numbers", 131016, "131016"),
        ("fail_numbers_http", 500, "http_500"),
        ("fail_numbers_http", 503, "http_503"),
    ],
)
async def test_transient_error_that_persists_fails_after_exactly_the_configured_attempts(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    knob: str,
    value: int,
    code: str,
) -> None:
    numbers = numbers_from(11_000_000, 4)
    bad = numbers[1]
    await sandbox.configure(**{knob: {digits(bad): value}})
    settings = make_settings(servers, sandbox.url, account=retry(4))
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("transient", numbers))
        await wait_until(lambda: has_state(pool, "transient", "done"))
    rows = await rows_by_phone(pool, "transient")
    assert (rows[bad]["state"], rows[bad]["error_class"], rows[bad]["error_code"]) == (
        "failed",
        "transient",
        code,
    )
    assert rows[bad]["error_text"]
    assert rows[bad]["attempts"] == 4, "every request is counted, retries included"
    assert [rows[n]["state"] for n in numbers if n != bad] == ["sent"] * 3
    stats = await sandbox.stats()
    assert stats["rejected_by_code"] == {code: 4}
    assert stats["requests"] == 4 + 3


async def test_transient_error_that_clears_up_ends_sent(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """Retries 0.3 s apart, 20 of them: the fault is removed long before they run out."""
    numbers = numbers_from(11_000_100, 3)
    bad = numbers[0]
    await sandbox.configure(fail_numbers={digits(bad): 131000})
    settings = make_settings(servers, sandbox.url, account=retry(20, 0.3, 0.3))
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("clears-up", numbers))
        await wait_until(lambda: _at_least(rejected(sandbox, "131000"), 2))
        await sandbox.configure(fail_numbers={})
        await wait_until(lambda: has_state(pool, "clears-up", "done"))
    rows = await rows_by_phone(pool, "clears-up")
    assert [rows[n]["state"] for n in numbers] == ["sent"] * 3
    assert rows[bad]["error_class"] is None
    assert await sandbox.recipients() == {digits(n): 1 for n in numbers}


async def _at_least(count: Any, minimum: int) -> bool:
    return bool(await count >= minimum)


async def test_transient_errors_drawn_at_random_are_retried_until_sent(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """Half the requests fail (500 and 503s); 20 attempts make a final failure a 1e-6 chance."""
    numbers = numbers_from(11_000_200, 40)
    await sandbox.configure(transient_p=0.5)
    settings = make_settings(servers, sandbox.url, account=retry(20))
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("flaky", numbers))
        await wait_until(lambda: has_state(pool, "flaky", "done"))
    assert await ledger.count_states(pool, "flaky") == {"sent": 40}
    stats = await sandbox.stats()
    assert sum(stats["rejected_by_code"].values()) > 0
    assert stats["accepted"] == 40
    assert await sandbox.recipients() == {digits(n): 1 for n in numbers}


async def test_throttling_holds_the_whole_account_until_retry_after_and_is_not_a_failure(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """Every request answers 130429 with Retry-After: 1 until the whole first wave (one request
    per slot) has been refused; then the sandbox accepts again. No retry may arrive before the
    hold ends. `before_first_request` is a moment before the first refused request arrived, so
    every later arrival must be at least Retry-After past it: a bound, not a timing guess."""
    retry_after_s = 1.0
    concurrency = 5
    numbers = numbers_from(11_000_300, concurrency)
    await sandbox.configure(throttled_p=1.0, retry_after_s=retry_after_s)
    settings = make_settings(servers, sandbox.url, account={"concurrency": concurrency})
    with capture_logs() as logs:
        async with running_daemon(settings):
            pushed_at = time.monotonic()
            await redis.lpush(JOBS, blast_job("throttled", numbers))
            before_first_request = await moment_before_first_request(sandbox, pushed_at)
            await wait_until(lambda: _at_least(rejected(sandbox, "130429"), concurrency))
            await sandbox.configure(throttled_p=0.0)
            await wait_until(lambda: has_state(pool, "throttled", "done"))
    async with sandbox.http.get(f"{sandbox.url}/_sandbox/arrivals") as response:
        accepted_at: list[float] = await response.json()
    assert len(accepted_at) == concurrency
    assert min(accepted_at) >= before_first_request + retry_after_s
    rows = await recipient_rows(pool, "throttled")
    assert [(r["state"], r["error_class"]) for r in rows] == [("sent", None)] * concurrency
    assert await sandbox.recipients() == {digits(n): 1 for n in numbers}
    throttled = events_named(logs, "account_throttled")
    assert throttled
    assert throttled[0]["code"] == "130429"
    assert throttled[0]["hold_s"] == retry_after_s


async def test_pair_limit_puts_the_recipient_back_to_pending_for_later(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """Meta asks for 4^n seconds, so the resend comes 4 s later and this test takes ~4 s. The
    first daemon is drained once the others are sent: its campaign pass has then tried to
    finish the campaign, and must not have."""
    numbers = numbers_from(11_000_400, 4)
    limited = numbers[2]
    await sandbox.configure(fail_numbers={digits(limited): 131056})
    settings = make_settings(servers, sandbox.url)
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("pair", numbers))
        await wait_until(lambda: _counts_are(pool, "pair", {"sent": 3, "pending": 1}))
    row = await pool.fetchrow(
        "SELECT state, owner, error_class, error_code, next_attempt_at > now() AS is_later "
        "FROM recipients WHERE phone = $1",
        limited,
    )
    assert tuple(row) == ("pending", None, "pair_limit", "131056", True)
    assert await campaign_state(pool, "pair") == "running"
    await sandbox.configure(fail_numbers={})
    async with running_daemon(settings):
        await wait_until(lambda: has_state(pool, "pair", "done"), timeout_s=15)
    rows = await rows_by_phone(pool, "pair")
    assert (rows[limited]["state"], rows[limited]["error_class"]) == ("sent", None)
    assert await sandbox.recipients() == {digits(n): 1 for n in numbers}
    assert await rejected(sandbox, "131056") == 1, "not resent before it was due"


async def _counts_are(pool: ledger.Pool, campaign_id: str, counts: dict[str, int]) -> bool:
    return await ledger.count_states(pool, campaign_id) == counts


@pytest.mark.parametrize("code", [131048, 368])
async def test_quality_error_pauses_the_campaign_loudly_and_leaves_the_rest_pending(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle, code: int
) -> None:
    """One slot: the first recipient's answer pauses the campaign before another request."""
    numbers = numbers_from(11_000_500, 10)
    await sandbox.configure(fail_numbers={digits(numbers[0]): code})
    settings = make_settings(servers, sandbox.url, account={"concurrency": 1})
    with capture_logs() as logs:
        async with running_daemon(settings):
            await redis.lpush(JOBS, blast_job("quality", numbers))
            await wait_until(lambda: has_state(pool, "quality", "paused"))
    campaign = await ledger.load_campaign(pool, "quality")
    assert campaign is not None
    assert campaign.state_reason is not None
    assert str(code) in campaign.state_reason
    rows = await recipient_rows(pool, "quality")
    assert (rows[0]["state"], rows[0]["error_class"], rows[0]["error_code"]) == (
        "pending",
        "quality",
        str(code),
    )
    assert [(r["state"], r["owner"]) for r in rows] == [("pending", None)] * len(numbers)
    assert (await sandbox.stats())["requests"] == 1
    [stopping] = events_named(logs, "campaign_stopping")
    assert (stopping["log_level"], stopping["error_class"], stopping["code"]) == (
        "error",
        "quality",
        str(code),
    )
    assert stopping["state"] == "paused"


async def test_permanent_error_fails_the_recipient_without_a_retry(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    numbers = numbers_from(11_000_600, 4)
    bad = numbers[3]
    await sandbox.configure(fail_numbers={digits(bad): 131026})
    settings = make_settings(servers, sandbox.url, account=retry(5))
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("permanent", numbers))
        await wait_until(lambda: has_state(pool, "permanent", "done"))
    rows = await rows_by_phone(pool, "permanent")
    failed = rows[bad]
    assert (failed["state"], failed["error_class"], failed["error_code"]) == (
        "failed",
        "permanent",
        "131026",
    )
    assert failed["error_text"] == "failure configured for this recipient"
    assert [rows[n]["state"] for n in numbers[:3]] == ["sent"] * 3
    stats = await sandbox.stats()
    assert stats["rejected_by_code"] == {"131026": 1}
    assert stats["requests"] == 4


@pytest.mark.parametrize(
    ("code", "overrides", "message"),
    [
        ("132001", {}, {"template": {"name": "no_such_template", "language": "id"}}),
        ("190", {"account": {"token": "revoked-token"}}, {"text": "Halo {name}"}),
    ],
    ids=["template_missing", "bad_token"],
)
async def test_campaign_fatal_error_stops_the_campaign_at_the_first_occurrence(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    code: str,
    overrides: dict[str, Any],
    message: dict[str, Any],
) -> None:
    """Every request would fail the same way: only the first wave, already in flight when the
    first answer came back, may reach the sandbox."""
    concurrency = 5
    numbers = numbers_from(11_000_700, 40)
    account = {"concurrency": concurrency, **overrides.get("account", {})}
    settings = make_settings(servers, sandbox.url, account=account)
    with capture_logs() as logs:
        async with running_daemon(settings):
            await redis.lpush(JOBS, blast_job("fatal", numbers, message=message))
            await wait_until(lambda: has_state(pool, "fatal", "stopped"))
    stats = await sandbox.stats()
    first_wave = stats["requests"]
    assert 1 <= first_wave <= concurrency, "the first wave, and not one request more"
    assert stats["rejected_by_code"] == {code: first_wave}
    campaign = await ledger.load_campaign(pool, "fatal")
    assert campaign is not None
    assert campaign.state_reason is not None
    assert campaign.state_reason.startswith(f"{code}:")
    assert await ledger.count_states(pool, "fatal") == {"pending": len(numbers)}
    answered = await pool.fetch(
        "SELECT error_class, error_code FROM recipients WHERE error_class IS NOT NULL"
    )
    assert [tuple(r) for r in answered] == [("campaign_fatal", code)] * first_wave
    [stopping] = events_named(logs, "campaign_stopping")
    assert (stopping["error_class"], stopping["state"]) == ("campaign_fatal", "stopped")


async def test_unreadable_success_answer_leaves_the_recipient_uncertain_and_never_resent(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """The provider accepted the request but its answer cannot be read. A restart (which
    recovers the instance's claims) and a later campaign do not resend it either."""
    numbers = numbers_from(11_000_800, 6)
    await sandbox.configure(malformed_body_p=1.0)
    settings = make_settings(servers, sandbox.url)
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("garbled", numbers))
        await wait_until(lambda: has_state(pool, "garbled", "done"))
    rows = await recipient_rows(pool, "garbled")
    assert {(r["state"], r["error_class"], r["error_code"], r["owner"]) for r in rows} == {
        ("uncertain", "uncertain", "http_200", None)
    }
    await sandbox.configure(malformed_body_p=0.0)
    marker = numbers_from(11_000_900, 1)
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("marker", marker))
        await wait_until(lambda: has_state(pool, "marker", "done"))
    assert await ledger.count_states(pool, "garbled") == {"uncertain": len(numbers)}
    assert await sandbox.recipients() == {digits(n): 1 for n in [*numbers, *marker]}


async def test_async_failure_webhook_moves_a_sent_recipient_to_failed(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """The first daemon's admin port is not the webhook's, so the failure cannot arrive before
    the campaign is done; the sandbox keeps retrying it until a daemon listens there."""
    numbers = numbers_from(11_001_000, 3)
    bad = numbers[1]
    admin_port = free_port()
    await sandbox.configure(
        webhook_url=webhook_url(admin_port),
        webhook_statuses=["sent"],
        async_fail_numbers={digits(bad): 131026},
        webhook_attempts=12,
        webhook_retry_initial_ms=20,
    )
    async with running_daemon(make_settings(servers, sandbox.url)):
        await redis.lpush(JOBS, blast_job("async-fail", numbers))
        await wait_until(lambda: has_state(pool, "async-fail", "done"))
    assert await ledger.count_states(pool, "async-fail") == {"sent": 3}

    async with running_daemon(make_settings(servers, sandbox.url, admin_port=admin_port)):
        await wait_until(lambda: _state_of_phone(pool, bad, "failed"))
        await wait_until(lambda: _webhooks_settled(sandbox, 3))
    rows = await rows_by_phone(pool, "async-fail")
    failed = rows[bad]
    assert (failed["state"], failed["error_class"], failed["error_code"]) == (
        "failed",
        "permanent",
        "131026",
    )
    assert failed["error_text"] == "Message undeliverable"
    assert failed["provider_message_id"].startswith("wamid.")
    assert [rows[n]["state"] for n in numbers if n != bad] == ["sent", "sent"]
    assert await sandbox.recipients() == {digits(n): 1 for n in numbers}


async def _state_of_phone(pool: ledger.Pool, phone: str, state: str) -> bool:
    return await pool.fetchval("SELECT state FROM recipients WHERE phone = $1", phone) == state


async def _webhooks_settled(sandbox: SandboxHandle, count: int) -> bool:
    stats = await sandbox.stats()
    return bool(stats["webhook_statuses_delivered"] == count)
