"""Several real `blastd run` processes sharing Redis, PostgreSQL and one account.

They split one campaign's recipients between them (each claims its own with SKIP LOCKED) and
pace the account together through the shared limiter in Redis. Ground truth is the sandbox's
count of accepted requests per recipient; each daemon's share comes from its own log line
`campaign_batch_sent`. The rate of their sum is measured by bench/multi_rate.py, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from blastd import ledger
from blastd.embedded import free_port
from blastd.shared_pacing import rate_state_key
from tests.harness import (
    ACCOUNT,
    SandboxHandle,
    Servers,
    accounts_env,
    blast_job,
    daemon_env,
    is_done,
    is_ready,
    make_settings,
    numbers_from,
    running_daemon,
    spawn_daemon,
    wait_until,
)

JOBS = "blastd:jobs"
DAEMONS = 3


@contextlib.asynccontextmanager
async def running_daemons(
    servers: Servers, sandbox: SandboxHandle, tmp_path: Path, accounts_json: str
) -> AsyncIterator[list[Path]]:
    """DAEMONS `blastd run` processes, each its own instance id; yields their log paths.
    SIGTERM on the way out, and each must exit cleanly (its logs are then complete)."""
    processes: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / f"daemon-{index}.log" for index in range(DAEMONS)]
    try:
        for index, log_path in enumerate(logs):
            admin_port = free_port()
            env = daemon_env(
                servers,
                sandbox.url,
                admin_port,
                BLASTD_INSTANCE_ID=f"daemon-{index}",
                BLASTD_ACCOUNTS=accounts_json,
                BLASTD_CAMPAIGN_POLL_INTERVAL_S="0.1",
                BLASTD_INTAKE_BLOCK_S="0.1",
            )
            processes.append(spawn_daemon(env, log_path))
            await wait_until(lambda port=admin_port: is_ready(port), timeout_s=60)
        yield logs
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        exit_codes = [await asyncio.to_thread(process.wait, 30) for process in processes]
    assert exit_codes == [0] * DAEMONS


def events_in(log_path: Path, event: str) -> list[dict[str, Any]]:
    lines = log_path.read_bytes().splitlines()
    parsed = [orjson.loads(line) for line in lines if line.startswith(b"{")]
    return [entry for entry in parsed if entry.get("event") == event]


@pytest.mark.slow
async def test_three_daemons_split_one_campaign_and_message_nobody_twice(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> None:
    recipients = 3_000
    numbers = numbers_from(30_000_000, recipients)
    accounts = accounts_env(sandbox.url, rate_per_s=600, concurrency=20)
    async with running_daemons(servers, sandbox, tmp_path, accounts) as logs:
        await redis.lpush(JOBS, blast_job("split", numbers))
        await wait_until(lambda: is_done(pool, "split"), timeout_s=120)
        assert await redis.exists(rate_state_key("blastd:", ACCOUNT)), "not paced in Redis"

    shares = [
        sum(event["counts"].get("sent", 0) for event in events_in(log, "campaign_batch_sent"))
        for log in logs
    ]
    print(f"\nrecipients sent by each daemon: {shares}")
    assert sum(shares) == recipients
    assert min(shares) >= recipients * 0.1, f"a daemon took too little part: {shares}"
    assert await ledger.count_states(pool, "split") == {"sent": recipients}
    assert await sandbox.recipients() == {n.lstrip("+"): 1 for n in numbers}


@pytest.mark.slow
async def test_a_throttling_episode_seen_by_several_daemons_cuts_the_rate_once(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> None:
    """Every request answers 130429 (Retry-After: 2) after 300 ms, so the daemons' first
    requests are all in flight when the first answer comes: each daemon is told to slow down,
    and the shared limiter must count one episode, not one per daemon."""
    numbers = numbers_from(31_000_000, 60)
    await sandbox.configure(throttled_p=1.0, retry_after_s=2.0, latency_ms=300)
    accounts = accounts_env(sandbox.url, rate_per_s=40, concurrency=5)
    async with running_daemons(servers, sandbox, tmp_path, accounts) as logs:
        await redis.lpush(JOBS, blast_job("throttled", numbers))
        await wait_until(lambda: _rejected_at_least(sandbox, 6), interval_s=0.01)
        await sandbox.configure(throttled_p=0.0, latency_ms=0)
        await wait_until(lambda: is_done(pool, "throttled"), timeout_s=60)

    throttled = [event for log in logs for event in events_in(log, "account_throttled")]
    assert len(throttled) == 1, throttled
    assert throttled[0]["rate_per_s"] == 20
    assert await ledger.count_states(pool, "throttled") == {"sent": len(numbers)}
    assert await sandbox.recipients() == {n.lstrip("+"): 1 for n in numbers}


async def _rejected_at_least(sandbox: SandboxHandle, count: int) -> bool:
    stats = await sandbox.stats()
    return bool(stats["rejected_by_code"].get("130429", 0) >= count)


async def test_an_unlimited_account_keeps_its_pacing_out_of_redis(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """Rate 0 is the throughput path: no Redis round trip per request, so no limiter keys."""
    settings = make_settings(servers, sandbox.url)
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("unlimited", numbers_from(32_000_000, 50)))
        await wait_until(lambda: is_done(pool, "unlimited"))

    assert await redis.keys("blastd:rate:*") == []
