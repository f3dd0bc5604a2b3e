"""A Redis Sentinel failover and a PostgreSQL promotion in the middle of a campaign.

Each test runs a real `blastd run` against servers started from the pip wheels, kills the
server it depends on while the campaign is being sent, and lets the standby take over as an
operator's setup would (Sentinel promotes the replica; `pg_ctl promote` the standby). The
campaign must finish with nobody lost and nobody messaged twice without the ledger saying so.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from blastd import ledger
from blastd.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedSentinel, EmbeddedStandby
from tests.failover_harness import (
    SENT_BEFORE_FAILURE,
    RunningDaemon,
    admin_port,
    blast,
    figures,
    now,
    paced_env,
    wait_done,
    wait_for_sends,
)
from tests.harness import SandboxHandle, Servers, wait_until

SERVICE = "blastd"


@pytest.mark.slow
async def test_sentinel_failover_mid_campaign_loses_nobody(
    servers: Servers, pool: ledger.Pool, sandbox: SandboxHandle, tmp_path: Path
) -> None:
    master = EmbeddedRedis(tmp_path / "master")
    master.start()
    replica = EmbeddedRedis(
        tmp_path / "replica", extra_args=["--replicaof", "127.0.0.1", str(master.port)]
    )
    replica.start()
    sentinel = EmbeddedSentinel(tmp_path / "sentinel", master.port, service=SERVICE)
    sentinel.start()
    sentinel_client = aioredis.Redis(port=sentinel.port)
    try:
        await wait_until(lambda: _knows_replica(sentinel_client), timeout_s=30, interval_s=0.2)
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/{SERVICE}/0"
        env = paced_env(servers, sandbox, admin_port(), BLASTD_REDIS_URL=url)
        async with RunningDaemon(env, tmp_path / "daemon.log"):
            master_client = aioredis.Redis(port=master.port)
            await master_client.lpush("blastd:jobs", blast("sentinel"))
            await master_client.aclose()
            await wait_for_sends(sandbox, SENT_BEFORE_FAILURE)
            failed_at = now()
            master.kill()
            await wait_done(pool, "sentinel")
        promoted = await sentinel_client.sentinel_get_master_addr_by_name(SERVICE)
        result = await figures(pool, sandbox, "sentinel", failed_at)
    finally:
        await sentinel_client.aclose()
        for server in (sentinel, replica, master):
            server.kill()
    print(result.report("sentinel failover (master SIGKILLed, replica promoted)"))
    assert promoted[1] == replica.port
    assert (result.lost, result.unflagged_duplicates) == (0, 0)


async def _knows_replica(sentinel_client: aioredis.Redis) -> bool:
    """Sentinel learns the replica from the master's INFO: only then can it promote it."""
    replicas = await sentinel_client.sentinel_slaves(SERVICE)
    return any(r.get("master-link-status") == "ok" for r in replicas)


@pytest.mark.slow
async def test_postgres_promotion_mid_campaign_loses_nobody(
    servers: Servers, redis: aioredis.Redis, sandbox: SandboxHandle, tmp_path: Path
) -> None:
    primary = EmbeddedPostgres(tmp_path / "primary", fsync=False)
    primary.start()
    standby = EmbeddedStandby(tmp_path / "standby", primary)
    try:
        standby.start()
        await _replicate_synchronously(primary)
        dsn = (
            f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}"
            "/blastd?target_session_attrs=read-write"
        )
        env = paced_env(servers, sandbox, admin_port(), BLASTD_DATABASE_URL=dsn)
        async with RunningDaemon(env, tmp_path / "daemon.log"):
            await redis.lpush("blastd:jobs", blast("promotion"))
            await wait_for_sends(sandbox, SENT_BEFORE_FAILURE)
            failed_at = now()
            primary.pg_ctl("stop", "-m", "immediate")
            standby.pg_ctl("promote", "-w")
            promoted_at = now()
            ledger_pool = await ledger.open_pool(standby.url, command_timeout_s=10)
            try:
                await wait_done(ledger_pool, "promotion")
                result = await figures(ledger_pool, sandbox, "promotion", failed_at)
            finally:
                await ledger_pool.close()
    finally:
        standby.stop()
        primary.stop()
    print(
        result.report("postgres promotion (primary stopped -m immediate, standby promoted)")
        + f"; promote took {promoted_at - failed_at:.2f} s"
    )
    assert (result.lost, result.unflagged_duplicates) == (0, 0)


async def _replicate_synchronously(primary: EmbeddedPostgres) -> None:
    """A commit returns once the standby has it: what blastd records before a send then
    survives the promotion (docs/scaling.md says why asynchronous replication would not)."""
    connection = await asyncpg.connect(primary.url)
    try:
        await connection.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        await connection.execute("SELECT pg_reload_conf()")

        async def standby_is_synchronous() -> bool:
            state = await connection.fetchval("SELECT sync_state FROM pg_stat_replication")
            return state == "sync"

        await wait_until(standby_is_synchronous, timeout_s=30, interval_s=0.2)
    finally:
        await connection.close()
