"""Every recipient's fate under real faults, counted against the sandbox's own tally.

A real `blastd run` process sends a blast through the sandbox while PostgreSQL is restarted
with a fast shutdown again and again (claims and intents whose commit answer is lost), or while
the daemon is SIGKILLed. Afterwards nobody is lost, stuck or messaged twice without a flag, and
a kill leaves in doubt no more recipients than the requests that were in flight.

The servers are this module's own: stopping the session's would break every later test's
connections.
"""

from __future__ import annotations

import asyncio
import math
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from blastd.campaigns import CLAIMED_AHEAD_S
from blastd.embedded import EmbeddedPostgres, free_port
from tests.harness import (
    SandboxHandle,
    Servers,
    accounts_env,
    blast_job,
    daemon_env,
    daemon_process,
    is_ready,
    numbers_from,
    wait_until,
)

RATE_PER_S = 100
CONCURRENCY = 5
RESTARTS = 10
FLUSH_INTERVAL_S = 0.05
# Answers already back but not yet in the ledger: outcomes are written in batches, one flush
# interval apart, and a flush may be under way while the next fills.
UNWRITTEN_ANSWERS = round(RATE_PER_S * 2 * FLUSH_INTERVAL_S)
# Requests claimed (their intent committed) ahead of their turn (CLAIMED_AHEAD_S of sending).
CLAIMED_AHEAD = math.ceil(RATE_PER_S * CLAIMED_AHEAD_S)


@pytest.fixture
async def ledger_pool(own_servers: Servers) -> AsyncIterator[asyncpg.Pool]:
    """A fresh connection per query: PostgreSQL restarts under it."""
    pool = await asyncpg.create_pool(own_servers.database_url, min_size=0, max_size=1)
    yield pool
    await pool.close()


def _env(servers: Servers, sandbox_url: str, admin_port: int) -> dict[str, str]:
    return daemon_env(
        servers,
        sandbox_url,
        admin_port,
        BLASTD_INSTANCE_ID="fate",
        BLASTD_ACCOUNTS=accounts_env(sandbox_url, rate_per_s=RATE_PER_S, concurrency=CONCURRENCY),
        BLASTD_DEPENDENCY_RETRY_S="0.1",
        BLASTD_DB_COMMAND_TIMEOUT_S="2",
        BLASTD_ORPHAN_SWEEP_INTERVAL_S="0.5",
        BLASTD_UNCERTAIN_POLICY="hold",
        BLASTD_OUTCOME_FLUSH_INTERVAL_S=str(FLUSH_INTERVAL_S),
    )


async def _fetch(servers: Servers, sql: str, *args: object) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(servers.database_url)
    try:
        return await connection.fetch(sql, *args)
    finally:
        await connection.close()


async def _campaign_is_done(servers: Servers, campaign_id: str) -> bool:
    try:
        rows = await _fetch(servers, "SELECT state FROM campaigns WHERE id = $1", campaign_id)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False  # restarting
    return bool(rows) and rows[0]["state"] == "done"


async def _push(servers: Servers, campaign_id: str, numbers: list[str]) -> None:
    client = aioredis.Redis.from_url(servers.redis_url)
    try:
        await client.lpush("blastd:jobs", blast_job(campaign_id, numbers))
    finally:
        await client.aclose()


def _fast_restart(postgres: EmbeddedPostgres) -> None:
    """SIGINT: PostgreSQL's fast shutdown cuts every session, then it starts again."""
    assert postgres.process is not None
    postgres.process.send_signal(signal.SIGINT)
    postgres.process.wait(30)
    postgres.start()


async def _accepted_count(sandbox: SandboxHandle) -> int:
    return sum((await sandbox.recipients()).values())


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_postgres_fast_restarts_leave_no_row_stuck_and_no_one_messaged_twice(
    own_servers: Servers, sandbox: SandboxHandle, tmp_path: Path
) -> None:
    """Claims whose commit answer is lost leave orphans: the live daemon frees
    them itself, so the campaign finishes with every recipient sent exactly once."""
    assert isinstance(own_servers.postgres, EmbeddedPostgres)
    await sandbox.configure(latency_ms=20)
    numbers = numbers_from(81_000_000, 1_000)
    admin_port = free_port()
    env = _env(own_servers, sandbox.url, admin_port)
    async with AsyncExitStack() as stack:
        process = await stack.enter_async_context(
            daemon_process(env, tmp_path / "daemon.log", tmp_path / "daemon.err")
        )
        await wait_until(lambda: is_ready(admin_port), timeout_s=30)
        await _push(own_servers, "pg-restarts", numbers)
        for restart in range(RESTARTS):
            target = (restart + 1) * len(numbers) // (RESTARTS + 2)
            await wait_until(lambda t=target: _reached(sandbox, t), timeout_s=60)
            await asyncio.to_thread(_fast_restart, own_servers.postgres)
        await wait_until(lambda: _campaign_is_done(own_servers, "pg-restarts"), timeout_s=120)
        assert process.returncode is None, "the daemon died"
    rows = await _fetch(
        own_servers,
        "SELECT phone, state, owner, flags FROM recipients WHERE campaign_id = 'pg-restarts'",
    )
    received = await sandbox.recipients()
    twice_unflagged = [
        r["phone"]
        for r in rows
        if received.get(r["phone"].lstrip("+"), 0) > 1 and "possible_duplicate" not in r["flags"]
    ]
    print(
        f"\n{RESTARTS} fast restarts: {len(rows)} recipients, states "
        f"{sorted({r['state'] for r in rows})}, accepted {sum(received.values())}, "
        f"unflagged duplicates {len(twice_unflagged)}"
    )
    assert sorted(received) == sorted(n.lstrip("+") for n in numbers), "a recipient was lost"
    assert twice_unflagged == []
    assert {r["state"] for r in rows} <= {"sent", "delivered", "read"}
    assert [r["phone"] for r in rows if r["owner"] is not None] == [], "a row is still owned"


async def _reached(sandbox: SandboxHandle, accepted: int) -> bool:
    try:
        return await _accepted_count(sandbox) >= accepted
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_kill_leaves_in_doubt_at_most_the_requests_in_flight(
    own_servers: Servers, sandbox: SandboxHandle, tmp_path: Path
) -> None:
    """Only requests that had left (at most the account's concurrency), those claimed ahead of
    their turn, and answers not yet written (outcomes are batched) become uncertain."""
    await sandbox.configure(latency_ms=50)
    numbers = numbers_from(82_000_000, 600)
    admin_port = free_port()
    env = _env(own_servers, sandbox.url, admin_port)
    doubts: list[int] = []
    for kill in range(3):
        async with daemon_process(env, tmp_path / "daemon.log", tmp_path / "daemon.err") as process:
            await wait_until(lambda: is_ready(admin_port), timeout_s=30)
            if kill == 0:
                await _push(own_servers, "kills", numbers)
            target = (kill + 1) * len(numbers) // 4
            await wait_until(lambda t=target: _reached(sandbox, t), timeout_s=60)
            process.send_signal(signal.SIGKILL)
            await process.wait()
        async with daemon_process(env, tmp_path / "daemon.log", tmp_path / "daemon.err"):
            await wait_until(lambda: is_ready(admin_port), timeout_s=30)  # after the recovery
            rows = await _fetch(
                own_servers,
                "SELECT count(*) AS n FROM recipients WHERE campaign_id = 'kills' "
                "AND state = 'uncertain'",
            )
            doubts.append(rows[0]["n"] - sum(doubts))
    bound = CONCURRENCY + CLAIMED_AHEAD + UNWRITTEN_ANSWERS
    print(f"\nin doubt after each kill: {doubts} (in flight <= {CONCURRENCY}, bound {bound})")
    assert all(0 <= n <= bound for n in doubts)
