"""Faults while a large job is taken in, through a real `blastd run` and real Redis.

The campaign is committed with its first page and the rest page by page. A daemon SIGKILLed
while it takes a valid job in must not hold that against the job, and the next take carries
the intake on; a job that dies at the same point every time must still end as poison, its
campaign stopped; the daemon's copy of the list vanishing mid-way (FLUSHALL) stops the
campaign with what it has and says why; a list read where it is (a Redis Cluster) that
vanishes or grows while it is read is reported with how much was read.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from blastd import ledger
from blastd.embedded import free_port
from blastd.errors import InvalidJobError
from blastd.queues import readable_job_id
from blastd.recipients import stream_recipients_key
from tests.harness import (
    SandboxHandle,
    Servers,
    daemon_env,
    is_ready,
    key_job,
    log_events,
    numbers_from,
    push_numbers,
    spawn_daemon,
    wait_until,
)

DEAD = "blastd:dead"
PROCESSING = "blastd:processing:test-process"
PAGE_SIZE = 1_000  # recipients per staged page: many pages, so a kill lands between two
MAX_JOB_DELIVERIES = 3  # the setting's default


async def queue_large_job(redis: aioredis.Redis, job_id: str, count: int) -> tuple[str, bytes]:
    """Push `count` recipients to the job's own list, then the job; its key and raw bytes."""
    key = f"blastd:recipients:{job_id}"
    await push_numbers(redis, key, numbers_from(30_000_000, count))
    # Held back for a year, so the test only sees its admission.
    raw = key_job(job_id, key, options={"not_before": "2027-12-01T00:00:00Z"})
    await redis.lpush("blastd:jobs", raw)
    return key, raw


async def pages_staged(redis: aioredis.Redis, raw: bytes) -> int:
    """The pages the job's current take has staged, as blastd records them."""
    value = await redis.get(f"blastd:progress:{hashlib.sha1(raw).hexdigest()}")
    return int(value.split(b":")[0]) if value else 0


async def deliveries(redis: aioredis.Redis, raw: bytes) -> int:
    """The takes counted against the job, as blastd records them."""
    value = await redis.get(f"blastd:deliveries:{hashlib.sha1(raw).hexdigest()}")
    return int(value or 0)


async def dead_entries(redis: aioredis.Redis) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in reversed(await redis.lrange(DEAD, 0, -1))]


async def recipients_committed(pool: ledger.Pool, campaign_id: str) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM recipients WHERE campaign_id = $1", campaign_id
    )
    return count


def env_for(servers: Servers, sandbox: SandboxHandle, admin_port: int) -> dict[str, str]:
    return daemon_env(servers, sandbox.url, admin_port, BLASTD_RECIPIENTS_PAGE_SIZE=str(PAGE_SIZE))


def has_retaken(log_path: Path) -> bool:
    """True once this daemon took the job a dead predecessor held (the progress it finds
    before then is the predecessor's)."""
    return any(event["event"] == "job_taken_again" for event in log_events(log_path))


async def stop_at_page(
    process: subprocess.Popen[bytes], redis: aioredis.Redis, raw: bytes, page: int
) -> int:
    """Freeze the daemon once its take has staged `page` pages; the pages it had staged."""
    await wait_until(lambda: _has_staged(redis, raw, page), timeout_s=60, interval_s=0.005)
    process.send_signal(signal.SIGSTOP)
    await asyncio.sleep(0.05)  # a command already on the wire lands before we read
    return await pages_staged(redis, raw)


async def _has_staged(redis: aioredis.Redis, raw: bytes, page: int) -> bool:
    return await pages_staged(redis, raw) >= page


def kill(process: subprocess.Popen[bytes]) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


async def take_in(
    process: subprocess.Popen[bytes], log_path: Path, first: bool, admin_port: int
) -> None:
    """Wait until this daemon took the job, not just found its predecessor's progress."""
    await wait_until(lambda: is_ready(admin_port), timeout_s=30)
    if not first:
        await wait_until(lambda: has_retaken(log_path), timeout_s=30, interval_s=0.005)


@pytest.mark.slow
async def test_a_valid_job_killed_three_times_while_read_is_committed_whole(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> None:
    """Each kill lands later in the read than the one before: an outside kill, not the job."""
    recipients = 30_000
    key, raw = await queue_large_job(redis, "big", recipients)
    admin_port = free_port()
    env = env_for(servers, sandbox, admin_port)
    killed_at = []
    for kill_number in range(3):
        log_path = tmp_path / f"daemon-{kill_number}.log"
        process = spawn_daemon(env, log_path)
        await take_in(process, log_path, kill_number == 0, admin_port)
        pages = await stop_at_page(process, redis, raw, 2 + 3 * kill_number)
        assert await redis.lrange(PROCESSING, 0, -1) == [raw]
        assert not await intake_complete(pool, "big")
        kill(process)
        killed_at.append(pages)

    final = spawn_daemon(env, tmp_path / "daemon-final.log")
    try:
        await wait_until(lambda: intake_complete(pool, "big"), timeout_s=120)
        await wait_until(lambda: _processing_is_empty(redis))
    finally:
        final.send_signal(signal.SIGTERM)
        assert final.wait(timeout=30) == 0
    committed = await recipients_committed(pool, "big")
    dead = await dead_entries(redis)
    print(
        f"\nkilled while read: kills at pages {killed_at} of {recipients // PAGE_SIZE}; "
        f"recipients pushed {recipients}; committed {committed}; dead entries {len(dead)}"
    )
    seqs = await pool.fetchval(
        "SELECT count(DISTINCT seq) FROM recipients WHERE campaign_id = 'big'"
    )
    assert (committed, seqs) == (recipients, recipients)
    assert dead == []
    assert await redis.exists(key) == 0
    assert await redis.keys("blastd:intake:*") == []
    assert await redis.keys("blastd:deliveries:*") == []
    assert await redis.keys("blastd:progress:*") == []


async def intake_complete(pool: ledger.Pool, campaign_id: str) -> bool:
    campaign = await ledger.load_campaign(pool, campaign_id)
    return campaign is not None and campaign.intake_complete


@pytest.mark.slow
async def test_flushall_in_the_middle_of_the_intake_stops_the_campaign_and_says_why(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> None:
    recipients = 30_000
    _, raw = await queue_large_job(redis, "wiped", recipients)
    admin_port = free_port()
    process = spawn_daemon(env_for(servers, sandbox, admin_port), tmp_path / "daemon.log")
    try:
        pages = await stop_at_page(process, redis, raw, 3)
        assert not await intake_complete(pool, "wiped")
        await redis.flushall()
        process.send_signal(signal.SIGCONT)
        [entry] = await wait_until(lambda: dead_entries(redis), timeout_s=60)
        await wait_until(lambda: _processing_is_empty(redis))
    finally:
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    committed = await recipients_committed(pool, "wiped")
    campaign = await ledger.load_campaign(pool, "wiped")
    print(
        f"\nFLUSHALL after page {pages}: recipients pushed {recipients}; committed "
        f"{committed}; dead entries 1: {entry['reason']!r}"
    )
    assert campaign is not None
    assert (campaign.state, campaign.state_reason) == ("stopped", entry["reason"])
    assert not campaign.intake_complete
    assert 0 < committed < recipients
    assert entry["job_id"] == "wiped"
    assert entry["payload"].encode() == raw
    assert entry["reason"].startswith("recipients_key changed while it was read: ")
    assert f"of {recipients} read, the list holds 0 now; " in entry["reason"]
    assert entry["reason"].endswith(f"; stopped with {committed} taken in")


async def _processing_is_empty(redis: aioredis.Redis) -> bool:
    return await redis.llen(PROCESSING) == 0


async def _is_dead_or_has_staged(redis: aioredis.Redis, raw: bytes, page: int) -> bool:
    return bool(await redis.exists(DEAD)) or await _has_staged(redis, raw, page)


@pytest.mark.slow
async def test_a_job_killed_at_the_same_point_every_time_is_poison_with_its_id(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> None:
    """What a job that itself kills the daemon at its fourth page looks like from outside: the
    first take commits three pages and dies, every later take dies before it commits another.
    The first take counts, the second is free (it got further than nothing), the later ones
    count: with max_job_deliveries 3 the fifth take dead-letters it, and stops the campaign
    its first take committed. A kill that happens to land a page later is progress and costs
    one more take, hence the loop."""
    recipients = 20_000
    _, raw = await queue_large_job(redis, "deadly", recipients)
    admin_port = free_port()
    env = env_for(servers, sandbox, admin_port)
    killed_at: list[int] = []
    while not await redis.exists(DEAD):
        assert len(killed_at) < 10, f"still not poison after kills at pages {killed_at}"
        log_path = tmp_path / f"daemon-{len(killed_at)}.log"
        process = spawn_daemon(env, log_path)
        await take_in(process, log_path, not killed_at, admin_port)
        # A later take carries on after the pages in the ledger: it dies as it starts, unless
        # its count is over the limit (taken the job is dead-lettered: let that land).
        page = 3 if not killed_at else 0
        if await deliveries(redis, raw) > MAX_JOB_DELIVERIES:
            await wait_until(lambda: redis.exists(DEAD))
        await wait_until(
            functools.partial(_is_dead_or_has_staged, redis, raw, page), interval_s=0.005
        )
        if await redis.exists(DEAD):  # dead-lettered on this take: nothing left to kill
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
            break
        killed_at.append(await stop_at_page(process, redis, raw, page))
        kill(process)
    [entry] = await dead_entries(redis)
    committed = await recipients_committed(pool, "deadly")
    print(
        f"\nkilled at the same point: kills at pages {killed_at}; recipients pushed "
        f"{recipients}; committed {committed}; dead entries 1: {entry['reason']!r}"
    )
    assert entry["job_id"] == "deadly"
    assert "taken 3 times without finishing" in entry["reason"]
    assert entry["payload"].encode() == raw
    campaign = await ledger.load_campaign(pool, "deadly")
    assert campaign is not None
    assert (campaign.state, campaign.state_reason) == ("stopped", entry["reason"])
    assert not campaign.intake_complete
    assert 0 < committed < recipients
    assert await redis.keys("blastd:intake:*") == []
    assert len(killed_at) >= 4


async def test_a_list_that_vanishes_between_two_pages_is_reported_with_how_much_was_read(
    redis: aioredis.Redis,
) -> None:
    await push_numbers(redis, "blastd:recipients:gone", numbers_from(30_000_000, 25))
    pages = stream_recipients_key(redis, "blastd:recipients:gone", 10)
    assert len(await anext(pages)) == 10
    await redis.delete("blastd:recipients:gone")
    with pytest.raises(InvalidJobError) as caught:
        await anext(pages)
    assert caught.value.reason == (
        "recipients_key changed while it was read: 10 of 25 read, the list holds 0 now"
    )


async def test_a_list_appended_to_while_read_is_reported_after_the_last_page(
    redis: aioredis.Redis,
) -> None:
    """A producer still filling the list: every page comes back whole, the length does not."""
    await push_numbers(redis, "blastd:recipients:growing", numbers_from(30_000_000, 20))
    pages = stream_recipients_key(redis, "blastd:recipients:growing", 10)
    assert len(await anext(pages)) == 10
    await redis.rpush("blastd:recipients:growing", b"+6281300000001")
    assert len(await anext(pages)) == 10
    with pytest.raises(InvalidJobError) as caught:
        await anext(pages)
    assert caught.value.reason == (
        "recipients_key changed while it was read: 20 of 20 read, the list holds 21 now"
    )


@pytest.mark.parametrize(
    ("raw", "job_id"),
    [
        (b'{"type": "blast", "id": "promo-7", "account": 5}', "promo-7"),
        (b'{"id": "promo-7", "type": "blast"', None),  # cut short: not JSON
        (b'["promo-7"]', None),
        (b'{"id": 7}', None),
        (b'{"id": "bell\\u0007"}', None),  # an id the dead list could not print on one line
        (b'{"id": "promo-7", "pad": "' + b"x" * 100 + b'"}', None),  # over the size limit
    ],
)
def test_a_dead_entry_reads_the_id_from_the_payload_only_when_it_is_a_valid_one(
    raw: bytes, job_id: str | None
) -> None:
    assert readable_job_id(raw, max_bytes=100) == job_id
