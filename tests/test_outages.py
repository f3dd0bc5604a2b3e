"""Redis and PostgreSQL go away in the middle of a campaign; two real daemons wait them out.

One campaign, sent by two `blastd run` processes through one account whose rate is shared in
Redis. During it: the Redis server stops for OUTAGE_S, then the PostgreSQL server, then Redis
is wiped (FLUSHALL). Each daemon must keep its PID and its watchdog pings, say on /readyz and
in its STATUS= line what it waits for, resume on its own, and neither may take the other's
work for a dead instance's. Ground truth is the sandbox's count of requests per recipient:
nobody lost, nobody messaged twice.

The servers are this module's own: stopping the session's would break every later test's
connections.
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from blastd.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from tests.harness import (
    SandboxHandle,
    Servers,
    accounts_env,
    blast_job,
    daemon_env,
    daemon_process,
    log_events,
    numbers_from,
    readiness,
    wait_until,
)
from tests.systemd.notify import NotifySocket

OUTAGE_S = 30.0
RECIPIENTS = 300
RATE_PER_S = 10  # the account's, shared by both daemons: the campaign outlasts the outages
PROGRESS = 20  # sends between the faults, so each fault hits a campaign in motion


@dataclass
class Daemon:
    """One `blastd run` under test, with its stand-in notify socket and its admin port."""

    instance_id: str
    process: asyncio.subprocess.Process
    notify: NotifySocket
    admin_port: int
    log_path: Path

    async def readiness_is(self, status: int, unreachable: list[str]) -> bool:
        code, body = await readiness(self.admin_port)
        return code == status and body.get("unreachable", []) == unreachable

    def is_waiting_for(self, dependency: str) -> bool:
        """True once the daemon's STATUS= line has said it waits for `dependency`."""
        return f"waiting for {dependency}" in self.notify.statuses()


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_daemons_wait_out_redis_and_postgres_outages_and_a_redis_wipe(
    own_servers: Servers, sandbox: SandboxHandle, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        daemons = [
            await _start_daemon(stack, own_servers, sandbox.url, tmp_path, name)
            for name in ("outage-a", "outage-b")
        ]
        for daemon in daemons:
            await wait_until(partial(daemon.readiness_is, 200, []), timeout_s=30)
        numbers = numbers_from(60_000_000, RECIPIENTS)
        async with _redis(own_servers) as redis:
            await redis.lpush("blastd:jobs", blast_job("outages", numbers))
        pids = [d.process.pid for d in daemons]

        await _progress(sandbox, PROGRESS)
        await _outage(daemons, "redis", own_servers.redis)
        await _progress(sandbox, PROGRESS)
        await _outage(daemons, "postgres", own_servers.postgres)
        await _progress(sandbox, PROGRESS)
        async with _redis(own_servers) as redis:
            await redis.flushall()
            await wait_until(lambda: _are_registered(redis, daemons), timeout_s=30)
        await _progress(sandbox, PROGRESS)

        await wait_until(lambda: _is_done(own_servers.database_url), timeout_s=180)
        assert [d.process.pid for d in daemons if d.process.returncode is None] == pids
        for daemon in daemons:
            daemon.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(daemon.process.wait(), 30) == 0

    received = await sandbox.recipients()
    assert sorted(received) == sorted(n.lstrip("+") for n in numbers), "a recipient was lost"
    assert set(received.values()) == {1}, "a recipient was messaged twice"
    states = await _recipient_states(own_servers.database_url)
    assert states == {"sent": RECIPIENTS}
    for daemon in daemons:
        events = log_events(daemon.log_path)
        names = [e["event"] for e in events]
        waited_for = {e.get("dependency") for e in events if e["event"] == "dependency_unavailable"}
        assert waited_for == {"redis", "postgres"}
        assert "instance_lease_lapsed" in names  # Redis was away longer than a lease
        assert "instance_recovered" not in names, "a live daemon's work was taken"


async def _start_daemon(
    stack: AsyncExitStack, servers: Servers, sandbox_url: str, tmp_path: Path, name: str
) -> Daemon:
    notify = NotifySocket(tmp_path / f"{name}.sock")
    stack.callback(notify.close)
    admin_port = free_port()
    env = daemon_env(
        servers,
        sandbox_url,
        admin_port,
        BLASTD_INSTANCE_ID=name,
        BLASTD_ACCOUNTS=accounts_env(sandbox_url, rate_per_s=RATE_PER_S, concurrency=5),
        BLASTD_DEPENDENCY_RETRY_S="0.2",
        BLASTD_HEALTH_CHECK_INTERVAL_S="0.2",
        BLASTD_REDIS_SOCKET_TIMEOUT_S="2",
        BLASTD_DB_COMMAND_TIMEOUT_S="2",
        **notify.env,
    )
    log_path = tmp_path / f"{name}.log"
    process = await stack.enter_async_context(
        daemon_process(env, log_path, tmp_path / f"{name}.err")
    )
    return Daemon(name, process, notify, admin_port, log_path)


async def _outage(
    daemons: list[Daemon], dependency: str, server: EmbeddedRedis | EmbeddedPostgres | None
) -> None:
    """Stop `server` for OUTAGE_S: both daemons report it, keep pinging, and recover."""
    assert server is not None
    assert server.process is not None
    began = asyncio.get_running_loop().time()
    await _stop(server)
    for daemon in daemons:
        await wait_until(partial(daemon.readiness_is, 503, [dependency]), timeout_s=30)
        await wait_until(partial(daemon.is_waiting_for, dependency))
    pings = [d.notify.count("WATCHDOG=1") for d in daemons]
    await asyncio.sleep(OUTAGE_S - (asyncio.get_running_loop().time() - began))  # the outage
    for daemon, before in zip(daemons, pings, strict=True):
        assert daemon.process.returncode is None, f"{daemon.instance_id} exited"
        assert daemon.notify.count("WATCHDOG=1") > before, "the watchdog pings stopped"
    await asyncio.to_thread(server.start)
    for daemon in daemons:
        await wait_until(partial(daemon.readiness_is, 200, []), timeout_s=30)


def _redis(servers: Servers) -> aioredis.Redis:
    """A new client (use it with `async with`): an old one's connection died with the server."""
    return aioredis.Redis.from_url(servers.redis_url, decode_responses=True)


async def _stop(server: EmbeddedRedis | EmbeddedPostgres) -> None:
    """Redis: SIGTERM (it writes its AOF and exits). PostgreSQL: SIGINT, the fast shutdown;
    its default (SIGTERM, smart) would wait for the daemons to disconnect, forever."""
    process = server.process
    assert process is not None
    signum = signal.SIGINT if isinstance(server, EmbeddedPostgres) else signal.SIGTERM
    process.send_signal(signum)
    await asyncio.to_thread(process.wait, 30)


async def _progress(sandbox: SandboxHandle, sends: int) -> None:
    """Wait until `sends` more requests reached the sandbox: the campaign is moving."""
    target = sum((await sandbox.recipients()).values()) + sends

    async def has_reached() -> bool:
        return sum((await sandbox.recipients()).values()) >= target

    await wait_until(has_reached, timeout_s=60)


async def _are_registered(redis: aioredis.Redis, daemons: list[Daemon]) -> bool:
    """Every daemon holds its lease and is listed again, after the wipe took both."""
    listed = set(await redis.smembers("blastd:instances"))
    leases = [await redis.exists(f"blastd:instance:{d.instance_id}") for d in daemons]
    return listed == {d.instance_id for d in daemons} and all(leases)


async def _is_done(database_url: str) -> bool:
    return await _fetchval(database_url, "SELECT state FROM campaigns WHERE id = 'outages'") == (
        "done"
    )


async def _recipient_states(database_url: str) -> dict[str, int]:
    rows = await _fetch(database_url, "SELECT state, count(*) AS n FROM recipients GROUP BY state")
    return {r["state"]: r["n"] for r in rows}


async def _fetchval(database_url: str, sql: str) -> object:
    rows = await _fetch(database_url, sql)
    return rows[0][0] if rows else None


async def _fetch(database_url: str, sql: str) -> list[asyncpg.Record]:
    """A fresh connection per query: a pooled one would not survive the PostgreSQL restart."""
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()
