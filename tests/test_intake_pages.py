"""A campaign taken in page by page, through a real daemon, real Redis and PostgreSQL and the
sandbox: it is committed with its first page and sends while the rest is taken in, it is
never done before its last page, and the rules of a campaign committed whole still hold
across pages (duplicates, opt-outs, bad entries, no valid recipient).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from blastd import ledger, reports
from blastd.embedded import free_port
from tests.harness import (
    SandboxHandle,
    Servers,
    daemon_env,
    digits,
    finish_after_kills,
    is_done,
    key_job,
    make_settings,
    numbers_from,
    push_numbers,
    running_daemon,
    spawn_daemon,
    wait_until,
    webhook_url,
)

JOBS = "blastd:jobs"
DEAD = "blastd:dead"


async def sends_while_taking_in(pool: ledger.Pool, campaign_id: str) -> dict[str, Any] | None:
    """The campaign's status once some recipient is sent while its intake is not complete."""
    status = await reports.campaign_status(pool, campaign_id)
    if status is None or status["intake_complete"] or not status["counts"].get("sent"):
        return None
    return status


async def intake_complete(pool: ledger.Pool, campaign_id: str) -> bool:
    campaign = await ledger.load_campaign(pool, campaign_id)
    return campaign is not None and campaign.intake_complete


async def test_a_large_campaign_sends_before_its_intake_is_complete_and_is_done_only_after(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    count = 40_000
    numbers = numbers_from(50_000_000, count)
    await push_numbers(redis, "blastd:recipients:large", numbers)
    settings = make_settings(servers, sandbox.url, recipients_page_size=500)
    async with running_daemon(settings):
        await redis.lpush(JOBS, key_job("large", "blastd:recipients:large"))
        early = await wait_until(lambda: sends_while_taking_in(pool, "large"), interval_s=0.005)
        await wait_until(lambda: is_done(pool, "large"), timeout_s=120)
    final = await reports.campaign_status(pool, "large")
    assert final is not None
    print(
        f"\nwhile taken in: {early['counts']} of {early['total']} taken in so far; "
        f"at the end: {final['counts']} of {final['total']}"
    )
    assert early["state"] == "running"
    assert early["total"] < count
    assert final["intake_complete"] is True
    assert final["total"] == count
    assert final["counts"] == {"sent": count}
    assert await sandbox.recipients() == {digits(n): 1 for n in numbers}
    assert await redis.keys("blastd:recipients:*") == []
    assert await redis.keys("blastd:intake:*") == []


async def test_duplicates_opt_outs_and_bad_entries_are_skipped_across_pages(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """Pages of two: the first two pages have nothing to send, so the campaign is first
    committed with its third page; repeats of a number in later pages are duplicates."""
    a, b, c, opted = numbers_from(51_000_000, 4)
    await pool.execute("INSERT INTO optouts (phone, source) VALUES ($1, 'operator')", opted)
    entries = [b"{broken", opted, "12", a, b, a, opted, c, b, "+62"]
    await redis.rpush("blastd:recipients:mixed", *entries)
    settings = make_settings(servers, sandbox.url, recipients_page_size=2)
    async with running_daemon(settings):
        await redis.lpush(JOBS, key_job("mixed", "blastd:recipients:mixed"))
        await wait_until(lambda: is_done(pool, "mixed"))
    rows = await pool.fetch(
        "SELECT seq, phone, state, error_text FROM recipients WHERE campaign_id = 'mixed' "
        "ORDER BY seq"
    )
    assert [r["seq"] for r in rows] == list(range(len(entries)))
    assert [(r["state"], r["error_text"]) for r in rows if r["state"] != "skipped"] == [
        ("sent", None)
    ] * 3
    skipped = {r["seq"]: r["error_text"] for r in rows if r["state"] == "skipped"}
    assert skipped[0].startswith("invalid JSON")
    assert skipped[1] == "opted_out"
    assert skipped[2].startswith("invalid number")
    assert (skipped[5], skipped[6], skipped[8]) == ("duplicate", "opted_out", "duplicate")
    assert skipped[9].startswith("invalid number")
    assert [r["phone"] for r in rows if r["state"] == "sent"] == [a, b, c]
    assert await sandbox.recipients() == {digits(a): 1, digits(b): 1, digits(c): 1}
    assert (await reports.campaign_status(pool, "mixed") or {})["total"] == len(entries)


async def test_pages_without_a_valid_recipient_admit_nothing(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    [opted] = numbers_from(52_000_000, 1)
    await pool.execute("INSERT INTO optouts (phone, source) VALUES ($1, 'operator')", opted)
    await redis.rpush("blastd:recipients:none", b"{broken", opted, "12", opted, "+62")
    settings = make_settings(servers, sandbox.url, recipients_page_size=2)
    async with running_daemon(settings):
        await redis.lpush(JOBS, key_job("none", "blastd:recipients:none"))
        [raw] = await wait_until(lambda: redis.lrange(DEAD, 0, -1))
    entry = orjson.loads(raw)
    assert (entry["reason"], entry["job_id"]) == ("no valid recipient", "none")
    assert await ledger.load_campaign(pool, "none") is None
    assert await redis.keys("blastd:recipients:*") == []
    assert await redis.keys("blastd:intake:*") == []
    assert (await sandbox.stats())["requests"] == 0


@pytest.mark.slow
async def test_sigkill_in_the_middle_of_the_intake_then_restart_sends_everyone_once(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> None:
    count = 30_000
    admin_port = free_port()
    # Webhooks outlive the dead daemon: a request in flight at the kill is resolved by its
    # status, as in tests/test_crash.py.
    await sandbox.configure(
        webhook_url=webhook_url(admin_port), webhook_statuses=["sent"], webhook_attempts=8
    )
    numbers = numbers_from(54_000_000, count)
    await push_numbers(redis, "blastd:recipients:killed", numbers)
    await redis.lpush(JOBS, key_job("killed", "blastd:recipients:killed"))
    env = daemon_env(servers, sandbox.url, admin_port, BLASTD_RECIPIENTS_PAGE_SIZE="500")
    process = spawn_daemon(env, tmp_path / "daemon-killed.log")
    taking_in = await wait_until(lambda: sends_while_taking_in(pool, "killed"), interval_s=0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    left = await reports.campaign_status(pool, "killed")
    assert left is not None

    final_log = tmp_path / "daemon-final.log"
    await finish_after_kills(env, final_log, admin_port, pool, sandbox, "killed", 180)
    rows = await pool.fetch("SELECT phone, state FROM recipients WHERE campaign_id = 'killed'")
    received = await sandbox.recipients()
    print(
        f"\nkilled while taken in: {taking_in['total']} taken in when first seen sending, "
        f"{left['total']} at the kill; recipients {count}; rows {len(rows)}"
    )
    assert left["intake_complete"] is False
    assert sorted(r["phone"] for r in rows) == sorted(numbers)
    assert {to: n for to, n in received.items() if n > 1} == {}
    for row in rows:
        sent = received.get(digits(row["phone"]), 0)
        assert (row["state"], sent) in {("sent", 1), ("uncertain", 0)}
    assert await redis.lrange(DEAD, 0, -1) == []
    assert await redis.keys("blastd:intake:*") == []
    assert await intake_complete(pool, "killed")
