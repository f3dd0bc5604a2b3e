"""Status broadcasts through the daemon (docs/status.md): the batch-size table, the send
order, the anchor, retries of failed batches with the same id, the split on "too large", rate
limits, stops, and the resume after a SIGKILL. Faults come from the status sandbox's knobs;
deliveries per contact are the sandbox's counts."""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from blastd import ledger
from blastd.config import StatusBatchSizes, StatusGatewayAccount
from blastd.embedded import free_port
from blastd.jobs import StatusOptions
from blastd.sandbox.cloud_api import listening
from blastd.sandbox.status_gateway import StatusSandboxConfig, build_status_app
from blastd.status import broadcast as status_broadcast
from blastd.status.intake import send_order
from tests.harness import (
    TOKEN,
    SandboxHandle,
    Servers,
    daemon_env,
    has_state,
    is_ready,
    make_settings,
    numbers_from,
    recipient_rows,
    running_daemon,
    wait_until,
)

JOBS = "blastd:jobs"
ACCOUNT = "status-main"
INSTANCE = "sandbox"


class StatusSandbox(SandboxHandle):
    async def requests(self) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.url}/_sandbox/requests") as response:
            result: list[dict[str, Any]] = await response.json()
            return result

    async def statuses(self) -> dict[str, dict[str, int]]:
        async with self.http.get(f"{self.url}/_sandbox/statuses") as response:
            result: dict[str, dict[str, int]] = await response.json()
            return result


@contextlib.asynccontextmanager
async def status_sandbox(**knobs: Any) -> AsyncIterator[StatusSandbox]:
    """The status emulator mounted at /status, as `python -m blastd.sandbox` serves it."""
    root = web.Application()
    root.add_subapp("/status", build_status_app(StatusSandboxConfig.model_validate(knobs)))
    async with listening(root, "127.0.0.1", 0) as url, aiohttp.ClientSession() as http:
        yield StatusSandbox(url + "/status", http)


@pytest.fixture
async def gateway() -> AsyncIterator[StatusSandbox]:
    async with status_sandbox(seed=7) as handle:
        yield handle


def account_fields(url: str, **fields: Any) -> dict[str, Any]:
    return {
        "kind": "status_gateway",
        "base_url": url,
        "token": TOKEN,
        "instance": INSTANCE,
        "retry": {"attempts": 3, "initial_s": 0.01, "max_s": 0.02, "jitter_s": 0},
        **fields,
    }


def settings_for(servers: Servers, url: str, **fields: Any) -> Any:
    account = StatusGatewayAccount.model_validate(account_fields(url, **fields))
    return make_settings(servers, url, accounts={ACCOUNT: account})


def status_job(job_id: str, numbers: list[str], **fields: Any) -> bytes:
    job: dict[str, Any] = {
        "type": "status",
        "id": job_id,
        "account": ACCOUNT,
        "status": {"type": "text", "text": "Promo hari ini!", "background_color": "#315575"},
        "contacts": [{"to": n} for n in numbers],
        **fields,
    }
    return orjson.dumps(job)


def jid(number: str) -> str:
    return number.removeprefix("+") + "@s.whatsapp.net"


async def run_to_state(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, url: str, job: bytes, state: str
) -> str:
    """Run the daemon on one job until its campaign reaches `state`; return the campaign id."""
    campaign_id = orjson.loads(job)["id"]
    async with running_daemon(settings_for(servers, url)):
        await redis.lpush(JOBS, job)
        await wait_until(lambda: has_state(pool, campaign_id, state))
    return str(campaign_id)


# --- the batch-size table and the send order -------------------------------------------------


@pytest.mark.parametrize(
    ("contacts", "size"),
    [
        (1, 100),
        (499, 100),
        (500, 500),
        (1_999, 500),
        (2_000, 1_000),
        (4_999, 1_000),
        (5_000, 2_000),
        (9_999, 2_000),
        (10_000, 5_000),
        (19_999, 5_000),
        (20_000, 10_000),
        (1_000_000, 10_000),
    ],
)
def test_batch_size_follows_the_seed_table(contacts: int, size: int) -> None:
    assert status_broadcast.batch_size_for(contacts, StatusBatchSizes()) == size


def test_batch_size_is_overridden_by_settings_then_by_the_job_and_capped_by_the_gateway() -> None:
    sizes = StatusBatchSizes(medium=300)
    account = StatusGatewayAccount.model_validate(
        account_fields("http://gw", batch_sizes=sizes.model_dump(), max_batch_size=250)
    )
    unlimited = account.model_copy(update={"max_batch_size": None})
    assert status_broadcast.initial_batch_size(800, unlimited, StatusOptions()) == 300
    assert status_broadcast.initial_batch_size(800, unlimited, StatusOptions(batch_size=40)) == 40
    assert status_broadcast.initial_batch_size(800, account, StatusOptions()) == 250


def test_the_anchor_is_the_highest_priority_contact_and_the_rest_follow_by_priority() -> None:
    contacts = [("+6281200000001", 1.0), ("+6281200000002", 5.0), ("+6281200000003", 3.0)]
    contacts += [("+6281200000004", 5.0)]
    assert send_order(contacts, StatusOptions()) == [
        "+6281200000002",
        "+6281200000004",
        "+6281200000003",
        "+6281200000001",
    ]
    unordered = send_order(contacts, StatusOptions(order_by_priority=False))
    assert unordered == ["+6281200000002", "+6281200000001", "+6281200000003", "+6281200000004"]


def test_grouping_keeps_each_country_together_in_the_order_of_its_best_contact() -> None:
    contacts = [("+6281200000001", 9.0), ("+14155550101", 5.0), ("+6281200000002", 4.0)]
    contacts += [("+447700900123", 3.0), ("+14155550102", 2.0)]
    assert send_order(contacts, StatusOptions(group_by_country=True)) == [
        "+6281200000001",
        "+14155550101",
        "+14155550102",
        "+6281200000002",
        "+447700900123",
    ]


# --- through the daemon ----------------------------------------------------------------------


async def test_the_anchor_goes_first_then_its_id_to_the_rest_in_batches(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, gateway: StatusSandbox
) -> None:
    numbers = numbers_from(1, 250)
    job = orjson.loads(status_job("st-1", numbers))
    job["contacts"][120]["priority"] = 10  # the most active viewer anchors
    await run_to_state(servers, redis, pool, gateway.url, orjson.dumps(job), "done")

    requests = await gateway.requests()
    (message_id,) = await gateway.statuses()
    assert [(r["size"], r["message_id"]) for r in requests] == [(1, None)] + [
        (size, message_id) for size in (100, 100, 49)
    ]
    assert len(requests) == 1 + math.ceil(249 / 100)
    stats = await gateway.stats()
    assert stats["contacts"] == 250
    assert stats["contacts_by_deliveries"] == {"1": 250}
    rows = await recipient_rows(pool, "st-1")
    assert rows[0]["phone"] == numbers[120]
    assert {(r["state"], r["provider_message_id"]) for r in rows} == {("sent", message_id)}
    broadcast = await ledger.load_broadcast(pool, "st-1")
    assert broadcast is not None
    assert (broadcast.message_id, broadcast.batch_size, broadcast.batches_accepted) == (
        message_id,
        100,
        4,
    )


async def test_failed_batches_are_retried_later_with_the_same_message_id(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, gateway: StatusSandbox
) -> None:
    await gateway.configure(fail_requests={"2": 503, "3": 500})
    numbers = numbers_from(1, 301)
    await run_to_state(servers, redis, pool, gateway.url, status_job("st-2", numbers), "done")

    requests = await gateway.requests()
    (message_id,) = await gateway.statuses()
    statuses = [r["status"] for r in requests]
    # The two failed batches are resent when their backoff (with jitter) is due; their
    # contacts may come due a moment apart and go out as two smaller batches instead of one.
    assert statuses[:3] == [201, 503, 500]
    assert set(statuses[3:]) == {201}
    assert sum(r["size"] for r in requests if r["status"] == 201) == 301
    assert {r["message_id"] for r in requests[1:]} == {message_id}
    stats = await gateway.stats()
    assert stats["contacts_by_deliveries"] == {"1": 301}
    result = await status_broadcast.load_result(pool, "st-2")
    assert result is not None
    document = result.document()
    assert document["sentSuccessfully"] == 301
    batches = document["batches"]
    assert batches["failed"] == 2
    assert batches["total"] == batches["successful"] + 2 == len(requests)
    assert document["failedRecipients"] == []


async def test_a_batch_that_keeps_failing_ends_failed_and_is_listed_in_the_result(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, gateway: StatusSandbox
) -> None:
    await gateway.configure(fail_requests={"2": 503, "3": 503, "4": 503})
    numbers = numbers_from(1, 51)
    job = status_job("st-3", numbers, options={"batch_size": 50})
    await run_to_state(servers, redis, pool, gateway.url, job, "done")

    result = await status_broadcast.load_result(pool, "st-3")
    assert result is not None
    assert result.sent == [jid(numbers[0])]
    assert result.failed == [jid(n) for n in numbers[1:]]
    rows = {r["phone"]: r for r in await recipient_rows(pool, "st-3")}
    failed = rows[numbers[1]]
    assert (failed["state"], failed["error_class"], failed["error_code"], failed["attempts"]) == (
        "failed",
        "transient",
        "http_503",
        3,
    )


async def test_a_batch_refused_as_too_large_is_split_and_later_batches_stay_smaller(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, gateway: StatusSandbox
) -> None:
    await gateway.configure(max_batch_size=40)
    numbers = numbers_from(1, 301)
    job = status_job("st-4", numbers, options={"batch_size": 100})
    await run_to_state(servers, redis, pool, gateway.url, job, "done")

    requests = await gateway.requests()
    refused = [r["size"] for r in requests if r["status"] == 413]
    accepted = [r["size"] for r in requests if r["status"] == 201]
    assert refused == [100, 50]
    assert accepted == [1] + [25] * 12
    stats = await gateway.stats()
    assert stats["contacts_by_deliveries"] == {"1": 301}
    broadcast = await ledger.load_broadcast(pool, "st-4")
    assert broadcast is not None
    assert broadcast.batch_size == 25


async def test_a_rate_limit_holds_the_broadcast_and_sends_the_same_batch_again(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, gateway: StatusSandbox
) -> None:
    await gateway.configure(fail_requests={"2": 429, "3": 429}, retry_after_s=0)
    numbers = numbers_from(1, 150)
    await run_to_state(servers, redis, pool, gateway.url, status_job("st-5", numbers), "done")

    requests = await gateway.requests()
    assert [(r["status"], r["size"]) for r in requests] == [
        (201, 1),
        (429, 100),
        (429, 100),
        (201, 100),
        (201, 49),
    ]
    broadcast = await ledger.load_broadcast(pool, "st-5")
    assert broadcast is not None
    assert broadcast.batches_failed == 0  # a throttled request is not a failure


async def test_a_transient_anchor_failure_retries_the_same_contact(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, gateway: StatusSandbox
) -> None:
    await gateway.configure(fail_requests={"1": 502})
    numbers = numbers_from(1, 20)
    await run_to_state(servers, redis, pool, gateway.url, status_job("st-6", numbers), "done")

    requests = await gateway.requests()
    assert [(r["status"], r["size"], r["message_id"]) for r in requests[:2]] == [
        (502, 1, None),
        (201, 1, None),
    ]
    recipients = await gateway.recipients()
    assert recipients[jid(numbers[0])] == 1
    assert len(await gateway.statuses()) == 1


async def test_a_disconnected_session_stops_the_broadcast_with_every_contact_pending(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, gateway: StatusSandbox
) -> None:
    await gateway.configure(session_connected=False)
    numbers = numbers_from(1, 20)
    await run_to_state(servers, redis, pool, gateway.url, status_job("st-7", numbers), "stopped")

    assert await ledger.count_states(pool, "st-7") == {"pending": 20}
    reason = await pool.fetchval("SELECT state_reason FROM campaigns WHERE id = 'st-7'")
    assert reason.startswith("anchor refused: session")


async def test_a_story_gateway_gets_an_image_status_with_its_caption(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, gateway: StatusSandbox
) -> None:
    numbers = numbers_from(1, 120)
    status = {"type": "image", "url": "https://cdn.example.com/p.jpg", "caption": "Baru!"}
    job = status_job("st-8", numbers, status=status, options={"batch_size": 60})
    settings = settings_for(servers, gateway.url, flavour="story", auth_style="bearer")
    async with running_daemon(settings):
        await redis.lpush(JOBS, job)
        await wait_until(lambda: has_state(pool, "st-8", "done"))

    assert [r["size"] for r in await gateway.requests()] == [1, 60, 59]
    assert (await gateway.stats())["contacts_by_deliveries"] == {"1": 120}


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"status": {"type": "text"}}, "a text status needs text"),
        ({"status": {"type": "video", "text": "x"}}, "needs url"),
        ({"account": "cloud-main"}, "is not a status_gateway"),
        ({"contacts": [{"to": "12"}]}, "no valid contact"),
    ],
)
async def test_a_status_job_that_cannot_be_sent_is_dead_lettered(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    gateway: StatusSandbox,
    fields: dict[str, Any],
    reason: str,
) -> None:
    settings = settings_for(servers, gateway.url)
    cloud = make_settings(servers, gateway.url).accounts
    settings = settings.model_copy(update={"accounts": {**settings.accounts, **cloud}})
    async with running_daemon(settings):
        await redis.lpush(JOBS, status_job("st-bad", numbers_from(1, 3), **fields))
        dead = await wait_until(lambda: redis.lrange("blastd:dead", 0, -1))
    assert reason in orjson.loads(dead[0])["reason"]
    assert not await ledger.campaign_exists(pool, "st-bad")


async def test_contacts_key_entries_carry_their_priority(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, gateway: StatusSandbox
) -> None:
    numbers = numbers_from(1, 30)
    entries = [orjson.dumps({"to": n, "priority": i % 7}) for i, n in enumerate(numbers)]
    await redis.rpush("contacts:st-9", *entries, b"not a number")
    job = orjson.loads(status_job("st-9", numbers))
    del job["contacts"]
    job["contacts_key"] = "contacts:st-9"
    await run_to_state(servers, redis, pool, gateway.url, orjson.dumps(job), "done")

    rows = await recipient_rows(pool, "st-9")
    assert rows[0]["phone"] == numbers[6]  # the first of the priority-6 contacts
    assert [r["state"] for r in rows].count("sent") == 30
    assert rows[-1]["state"] == "skipped"
    assert not await redis.exists("contacts:st-9")


# --- crash and resume ------------------------------------------------------------------------


def process_env(servers: Servers, url: str, admin_port: int) -> dict[str, str]:
    env = daemon_env(servers, url, admin_port)
    account = account_fields(url)
    env["BLASTD_ACCOUNTS"] = orjson.dumps({ACCOUNT: account}).decode()
    return env


async def start_process(env: dict[str, str], log_path: Path) -> asyncio.subprocess.Process:
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "blastd", "run", env=env, stdout=log, stderr=log
        )
    return process


async def test_a_broadcast_killed_midway_resumes_with_the_same_id_and_resends_no_accepted_batch(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, tmp_path: Path
) -> None:
    """SIGKILL while batches go out, then a restart: one status id in all, the anchor posted
    once, no contact delivered twice; a batch in flight at the kill ends 'uncertain' (the
    default policy holds those)."""
    async with status_sandbox(latency_ms=100) as gateway:
        admin_port = free_port()
        env = process_env(servers, gateway.url, admin_port)
        numbers = numbers_from(1, 601)
        await redis.lpush(JOBS, status_job("st-crash", numbers, options={"batch_size": 25}))
        first = await start_process(env, tmp_path / "first.log")
        try:
            await wait_until(lambda: has_accepted(pool, "st-crash", 6))
        finally:
            first.send_signal(signal.SIGKILL)
            await first.wait()
        killed_at = await accepted_batches(pool, "st-crash")

        second = await start_process(env, tmp_path / "second.log")
        try:
            await wait_until(lambda: is_ready(admin_port))
            await wait_until(lambda: has_state(pool, "st-crash", "done"))
        finally:
            second.send_signal(signal.SIGTERM)
            await second.wait()

        requests = await gateway.requests()
        statuses = await gateway.statuses()
        stats = await gateway.stats()
    assert len(statuses) == 1
    assert [r["message_id"] for r in requests].count(None) == 1  # one anchor post
    assert stats["max_deliveries_per_contact"] == 1
    counts = await ledger.count_states(pool, "st-crash")
    assert counts["sent"] + counts.get("uncertain", 0) == 601
    assert counts.get("uncertain", 0) <= 25
    assert await accepted_batches(pool, "st-crash") > killed_at


async def accepted_batches(pool: ledger.Pool, campaign_id: str) -> int:
    broadcast = await ledger.load_broadcast(pool, campaign_id)
    return broadcast.batches_accepted if broadcast else 0


async def has_accepted(pool: ledger.Pool, campaign_id: str, at_least: int) -> bool:
    return await accepted_batches(pool, campaign_id) >= at_least
