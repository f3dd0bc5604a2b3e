"""UltraMsg end to end: campaigns through the daemon and the UltraMsg sandbox, docs/errors.md class
by class, and the message_ack webhooks through the admin endpoint.

Faults come from the sandbox's knobs: `fail_numbers` gives one recipient the same fault every
time, the `*_p` probabilities draw one per request. Request counts are the sandbox's.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from structlog.testing import capture_logs

from blastd import ledger
from blastd.config import Settings, UltraMsgAccount
from blastd.embedded import free_port
from blastd.sandbox.cloud_api import listening
from blastd.sandbox.ultramsg import UltraMsgSandboxConfig, build_ultramsg_app
from tests.harness import (
    SandboxHandle,
    Servers,
    blast_job,
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
    sandbox_json,
    wait_until,
)

JOBS = "blastd:jobs"
ACCOUNT = "ultra-main"
TOKEN = "sandbox-token"
WEBHOOK_SECRET = "ultramsg-hook-secret"
VIDEO_LINK = "https://cdn.example.com/v/123.mp4"


@pytest.fixture
async def ultramsg() -> AsyncIterator[SandboxHandle]:
    """The UltraMsg emulator mounted at /ultramsg, as `python -m blastd.sandbox` serves it."""
    root = web.Application()
    root.add_subapp("/ultramsg", build_ultramsg_app(UltraMsgSandboxConfig(seed=7)))
    async with listening(root, "127.0.0.1", 0) as url, aiohttp.ClientSession() as http:
        yield SandboxHandle(url + "/ultramsg", http)


def settings_for(
    servers: Servers, sandbox: SandboxHandle, admin_port: int = 0, **account: Any
) -> Settings:
    """One UltraMsg account on the sandbox; transient retries with tiny delays and no jitter."""
    fields = {
        "kind": "ultramsg",
        "base_url": sandbox.url,
        "instance_id": "instance1150",
        "token": TOKEN,
        "webhook_secret": WEBHOOK_SECRET,
        "rate_per_s": 0,
        "concurrency": 20,
        "retry": {"attempts": 3, "initial_s": 0.001, "max_s": 0.005, "jitter_s": 0},
        **account,
    }
    accounts = {ACCOUNT: UltraMsgAccount.model_validate(fields)}
    return make_settings(servers, sandbox.url, admin_port=admin_port, accounts=accounts)


def job(job_id: str, numbers: list[str], **fields: Any) -> bytes:
    return blast_job(job_id, numbers, account=ACCOUNT, **fields)


def webhook_url(admin_port: int, secret: str = WEBHOOK_SECRET) -> str:
    return f"http://127.0.0.1:{admin_port}/webhooks/ultramsg/{ACCOUNT}?secret={secret}"


async def counts_are(pool: ledger.Pool, campaign_id: str, counts: dict[str, int]) -> bool:
    return await ledger.count_states(pool, campaign_id) == counts


@pytest.mark.parametrize(
    ("message", "sent_fields"),
    [
        ({"text": "Halo {name}"}, {"type": "chat", "body": "Halo N0"}),
        (
            {"video": {"link": VIDEO_LINK, "caption": "Video untuk {name}"}},
            {"type": "video", "video": VIDEO_LINK, "caption": "Video untuk N0"},
        ),
    ],
    ids=["text", "video"],
)
async def test_campaign_completes_with_each_recipient_received_once(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    ultramsg: SandboxHandle,
    message: dict[str, Any],
    sent_fields: dict[str, str],
) -> None:
    numbers = numbers_from(21_000_000, 30)
    async with running_daemon(settings_for(servers, ultramsg)):
        await redis.lpush(JOBS, job("ultra", numbers, message=message))
        await wait_until(lambda: has_state(pool, "ultra", "done"))
    rows = await recipient_rows(pool, "ultra")
    assert [r["state"] for r in rows] == ["sent"] * len(numbers)
    assert await ultramsg.recipients() == {digits(n): 1 for n in numbers}
    sent = {m["to"]: m for m in await sandbox_json(ultramsg.http, ultramsg.url, "messages")}
    first = sent[numbers[0]]
    assert {key: first[key] for key in sent_fields} == sent_fields
    assert first["referenceId"] == f"blastd:{rows[0]['id']}"
    assert rows[0]["provider_message_id"] == str(first["id"])


async def test_transient_error_is_retried_then_fails_with_the_last_answer(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, ultramsg: SandboxHandle
) -> None:
    """The sandbox rotates 500, 502 and 503: the fourth and last attempt gets 500 again."""
    numbers = numbers_from(21_000_100, 4)
    bad = numbers[1]
    await ultramsg.configure(fail_numbers={digits(bad): "transient"})
    async with running_daemon(settings_for(servers, ultramsg, **retry(4))):
        await redis.lpush(JOBS, job("transient", numbers))
        await wait_until(lambda: has_state(pool, "transient", "done"))
    rows = await rows_by_phone(pool, "transient")
    failed = rows[bad]
    assert (failed["state"], failed["error_class"], failed["error_code"]) == (
        "failed",
        "transient",
        "http_500",
    )
    assert (failed["error_text"], failed["attempts"]) == ("HTTP 500", 4)
    assert [rows[n]["state"] for n in numbers if n != bad] == ["sent"] * 3
    stats = await ultramsg.stats()
    assert stats["rejected_by_code"] == {"http_500": 2, "http_502": 1, "http_503": 1}
    assert stats["requests"] == 4 + 3


async def test_transient_errors_drawn_at_random_are_retried_until_sent(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, ultramsg: SandboxHandle
) -> None:
    """Half the requests fail; 20 attempts make a final failure a 1e-6 chance."""
    numbers = numbers_from(21_000_200, 30)
    await ultramsg.configure(transient_p=0.5)
    async with running_daemon(settings_for(servers, ultramsg, **retry(20))):
        await redis.lpush(JOBS, job("flaky", numbers))
        await wait_until(lambda: has_state(pool, "flaky", "done"))
    assert await ledger.count_states(pool, "flaky") == {"sent": 30}
    assert sum((await ultramsg.stats())["rejected_by_code"].values()) > 0
    assert await ultramsg.recipients() == {digits(n): 1 for n in numbers}


async def test_throttling_holds_the_account_until_retry_after_and_is_not_a_failure(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, ultramsg: SandboxHandle
) -> None:
    """Every request answers 429 with Retry-After: 1 until the whole first wave has been
    refused; then the sandbox accepts again. `before_first_request` is a moment before the
    first refused request arrived, so every acceptance must be at least Retry-After past it."""
    retry_after_s = 1.0
    concurrency = 5
    numbers = numbers_from(21_000_300, concurrency)
    await ultramsg.configure(throttled_p=1.0, retry_after_s=retry_after_s)
    settings = settings_for(servers, ultramsg, concurrency=concurrency)
    with capture_logs() as logs:
        async with running_daemon(settings):
            pushed_at = time.monotonic()
            await redis.lpush(JOBS, job("throttled", numbers))
            before_first_request = await moment_before_first_request(ultramsg, pushed_at)
            await wait_until(lambda: rejected_at_least(ultramsg, "http_429", concurrency))
            await ultramsg.configure(throttled_p=0.0)
            await wait_until(lambda: has_state(pool, "throttled", "done"))
    accepted_at: list[float] = await sandbox_json(ultramsg.http, ultramsg.url, "arrivals")
    assert len(accepted_at) == concurrency
    assert min(accepted_at) >= before_first_request + retry_after_s
    rows = await recipient_rows(pool, "throttled")
    assert [(r["state"], r["error_class"]) for r in rows] == [("sent", None)] * concurrency
    assert await ultramsg.recipients() == {digits(n): 1 for n in numbers}
    throttled = events_named(logs, "account_throttled")
    assert (throttled[0]["code"], throttled[0]["hold_s"]) == ("http_429", retry_after_s)


async def rejected_at_least(sandbox: SandboxHandle, code: str, minimum: int) -> bool:
    return int((await sandbox.stats())["rejected_by_code"].get(code, 0)) >= minimum


@pytest.mark.parametrize(
    ("code", "account", "knobs"),
    [
        ("wrong_token", {"token": "revoked-token"}, {}),
        ("wrong_token", {"token": "revoked-token"}, {"error_http_status": 401}),
        ("instance_not_found", {"instance_id": "instance404"}, {}),
        ("not_authenticated", {}, {"instance_status": "qr"}),
    ],
    ids=["wrong-token-behind-200", "wrong-token-behind-401", "unknown-instance", "qr-lost"],
)
async def test_campaign_fatal_error_stops_the_campaign_at_the_first_occurrence(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    ultramsg: SandboxHandle,
    code: str,
    account: dict[str, Any],
    knobs: dict[str, Any],
) -> None:
    """Every request would fail the same way: only the first wave, already in flight when the
    first answer came back, may reach the sandbox."""
    concurrency = 5
    numbers = numbers_from(21_000_400, 40)
    if knobs:
        await ultramsg.configure(**knobs)
    settings = settings_for(servers, ultramsg, concurrency=concurrency, **account)
    with capture_logs() as logs:
        async with running_daemon(settings):
            await redis.lpush(JOBS, job("fatal", numbers))
            await wait_until(lambda: has_state(pool, "fatal", "stopped"))
    stats = await ultramsg.stats()
    first_wave = stats["requests"]
    assert 1 <= first_wave <= concurrency, "the first wave, and not one request more"
    assert stats["rejected_by_code"] == {code: first_wave}
    campaign = await ledger.load_campaign(pool, "fatal")
    assert campaign is not None
    assert campaign.state_reason is not None
    assert campaign.state_reason.startswith(f"{code}:")
    assert TOKEN not in campaign.state_reason
    assert await ledger.count_states(pool, "fatal") == {"pending": len(numbers)}
    answered = await pool.fetch(
        "SELECT error_class, error_code FROM recipients WHERE error_class IS NOT NULL"
    )
    assert [tuple(r) for r in answered] == [("campaign_fatal", code)] * first_wave
    [stopping] = events_named(logs, "campaign_stopping")
    assert (stopping["error_class"], stopping["state"]) == ("campaign_fatal", "stopped")


@pytest.mark.parametrize(
    ("fault", "code", "text"),
    [
        ("invalid_number", "invalid_number", "Invalid number: not registered on WhatsApp"),
        ("field_error", "field_error", "to: is invalid"),
    ],
)
async def test_permanent_error_fails_only_that_recipient_without_a_retry(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    ultramsg: SandboxHandle,
    fault: str,
    code: str,
    text: str,
) -> None:
    numbers = numbers_from(21_000_500, 4)
    bad = numbers[3]
    await ultramsg.configure(fail_numbers={digits(bad): fault})
    async with running_daemon(settings_for(servers, ultramsg, **retry(5))):
        await redis.lpush(JOBS, job("permanent", numbers))
        await wait_until(lambda: has_state(pool, "permanent", "done"))
    rows = await rows_by_phone(pool, "permanent")
    failed = rows[bad]
    assert (failed["state"], failed["error_class"], failed["error_code"], failed["error_text"]) == (
        "failed",
        "permanent",
        code,
        text,
    )
    assert [rows[n]["state"] for n in numbers[:3]] == ["sent"] * 3
    stats = await ultramsg.stats()
    assert (stats["rejected_by_code"], stats["requests"]) == ({code: 1}, 4)


async def test_template_campaign_fails_every_recipient_without_a_request(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, ultramsg: SandboxHandle
) -> None:
    numbers = numbers_from(21_000_600, 3)
    message = {"template": {"name": "promo_nov", "language": "id", "params": ["{name}"]}}
    async with running_daemon(settings_for(servers, ultramsg)):
        await redis.lpush(JOBS, job("template", numbers, message=message))
        await wait_until(lambda: has_state(pool, "template", "done"))
    rows = await recipient_rows(pool, "template")
    assert {(r["state"], r["error_class"], r["error_code"]) for r in rows} == {
        ("failed", "permanent", "template_unsupported")
    }
    assert (await ultramsg.stats())["requests"] == 0


async def test_unreadable_success_answer_leaves_the_recipient_uncertain_and_never_resent(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, ultramsg: SandboxHandle
) -> None:
    """UltraMsg accepted the request but its answer cannot be read. A restart (which recovers
    the instance's claims) and a later campaign do not resend it either."""
    numbers = numbers_from(21_000_700, 6)
    await ultramsg.configure(malformed_body_p=1.0)
    settings = settings_for(servers, ultramsg)
    async with running_daemon(settings):
        await redis.lpush(JOBS, job("garbled", numbers))
        await wait_until(lambda: has_state(pool, "garbled", "done"))
    rows = await recipient_rows(pool, "garbled")
    assert {(r["state"], r["error_class"], r["error_code"], r["owner"]) for r in rows} == {
        ("uncertain", "uncertain", "http_200", None)
    }
    await ultramsg.configure(malformed_body_p=0.0)
    marker = numbers_from(21_000_800, 1)
    async with running_daemon(settings):
        await redis.lpush(JOBS, job("marker", marker))
        await wait_until(lambda: has_state(pool, "marker", "done"))
    assert await ledger.count_states(pool, "garbled") == {"uncertain": len(numbers)}
    assert await ultramsg.recipients() == {digits(n): 1 for n in [*numbers, *marker]}


@pytest.mark.parametrize(
    ("acks", "final_state"),
    [(["server", "device"], "delivered"), (["server", "device", "read"], "read")],
)
async def test_acks_move_recipients_to_delivered_and_read(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    ultramsg: SandboxHandle,
    acks: list[str],
    final_state: str,
) -> None:
    """Acks are sent twice each, numeric, after a delay: repeats change nothing."""
    numbers = numbers_from(21_000_900, 10)
    admin_port = free_port()
    await ultramsg.configure(
        webhook_url=webhook_url(admin_port),
        webhook_acks=acks,
        webhook_numeric_acks=True,
        webhook_repeats=2,
        webhook_delay_ms=5,
    )
    async with running_daemon(settings_for(servers, ultramsg, admin_port=admin_port)):
        await redis.lpush(JOBS, job("acked", numbers))
        await wait_until(lambda: counts_are(pool, "acked", {final_state: len(numbers)}))
        await wait_until(lambda: webhooks_settled(ultramsg, 2 * len(acks) * len(numbers)))
    rows = await recipient_rows(pool, "acked")
    assert {(r["state"], r["error_class"]) for r in rows} == {(final_state, None)}
    assert all(r["provider_message_id"] for r in rows)
    assert await ultramsg.recipients() == {digits(n): 1 for n in numbers}


async def webhooks_settled(sandbox: SandboxHandle, count: int) -> bool:
    stats = await sandbox.stats()
    return bool(stats["webhook_events_delivered"] == count)


async def test_an_uncertain_recipient_is_resolved_by_its_ack(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, ultramsg: SandboxHandle
) -> None:
    """The first daemon's admin port is not the webhook's, so the acks cannot arrive before the
    recipients are uncertain; the sandbox keeps retrying them until a daemon listens there."""
    numbers = numbers_from(21_001_000, 3)
    admin_port = free_port()
    await ultramsg.configure(
        malformed_body_p=1.0,
        webhook_url=webhook_url(admin_port),
        webhook_acks=["server", "device"],
        webhook_attempts=12,
        webhook_retry_initial_ms=20,
    )
    async with running_daemon(settings_for(servers, ultramsg)):
        await redis.lpush(JOBS, job("resolved", numbers))
        await wait_until(lambda: has_state(pool, "resolved", "done"))
    assert await ledger.count_states(pool, "resolved") == {"uncertain": 3}

    async with running_daemon(settings_for(servers, ultramsg, admin_port=admin_port)):
        await wait_until(lambda: counts_are(pool, "resolved", {"delivered": 3}))
    rows = await recipient_rows(pool, "resolved")
    # The doubt is over: its error is gone, and the flag says how the fate was learnt.
    assert {r["error_class"] for r in rows} == {None}
    assert all(r["flags"] == ["delivered_after_failure"] for r in rows)
    assert all(r["provider_message_id"].startswith("true_") for r in rows), "the ack's id"
    assert await ultramsg.recipients() == {digits(n): 1 for n in numbers}


async def post_webhook(
    http: aiohttp.ClientSession, admin_port: int, event: dict[str, Any], secret: str | None
) -> int:
    url = f"http://127.0.0.1:{admin_port}/webhooks/ultramsg/{ACCOUNT}"
    params = {"secret": secret} if secret is not None else {}
    async with http.post(url, params=params, json=event) as response:
        return response.status


def ack_event(ledger_id: int, ack: str, event_type: str = "message_ack") -> dict[str, Any]:
    return {
        "event_type": event_type,
        "instanceId": "1150",
        "referenceId": f"blastd:{ledger_id}",
        "data": {"id": "58431", "ack": ack, "to": "6281200000001@c.us"},
    }


async def phone_state(pool: ledger.Pool, phone: str) -> str:
    state: str = await pool.fetchval("SELECT state FROM recipients WHERE phone = $1", phone)
    return state


async def test_acks_out_of_order_or_repeated_never_move_a_recipient_back(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, ultramsg: SandboxHandle
) -> None:
    """The endpoint answers 200 only once the ack is in the ledger: each state is read at once."""
    [number] = numbers_from(21_001_100, 1)
    admin_port = free_port()
    async with running_daemon(settings_for(servers, ultramsg, admin_port=admin_port)):
        await redis.lpush(JOBS, job("ordered", [number]))
        await wait_until(lambda: has_state(pool, "ordered", "done"))
        [row] = await recipient_rows(pool, "ordered")
        states = []
        for ack in ("device", "server", "read", "device", "read", "server"):
            status = await post_webhook(
                ultramsg.http, admin_port, ack_event(row["id"], ack), WEBHOOK_SECRET
            )
            states.append((ack, status, await phone_state(pool, number)))
    assert states == [
        ("device", 200, "delivered"),
        ("server", 200, "delivered"),
        ("read", 200, "read"),
        ("device", 200, "read"),
        ("read", 200, "read"),
        ("server", 200, "read"),
    ]


async def test_bad_secret_is_refused_and_other_events_are_ignored(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, ultramsg: SandboxHandle
) -> None:
    [number] = numbers_from(21_001_200, 1)
    admin_port = free_port()
    async with running_daemon(settings_for(servers, ultramsg, admin_port=admin_port)):
        await redis.lpush(JOBS, job("guarded", [number]))
        await wait_until(lambda: has_state(pool, "guarded", "done"))
        [row] = await recipient_rows(pool, "guarded")
        read = ack_event(row["id"], "read")
        answers = [
            await post_webhook(ultramsg.http, admin_port, read, "wrong-secret"),
            await post_webhook(ultramsg.http, admin_port, read, None),
            await post_webhook(ultramsg.http, admin_port, read, WEBHOOK_SECRET[:-1]),
        ]
        state_after_refusals = await phone_state(pool, number)
        created = ack_event(row["id"], "read", event_type="message_create")
        ignored = await post_webhook(ultramsg.http, admin_port, created, WEBHOOK_SECRET)
        state_after_other_event = await phone_state(pool, number)
    assert answers == [401, 401, 401]
    assert state_after_refusals == "sent"
    assert (ignored, state_after_other_event) == (200, "sent")
