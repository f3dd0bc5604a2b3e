"""SIGTERM to a real `blastd run` in the middle of a campaign: the graceful drain, and the
second signal that cuts it short.

Ground truth is the sandbox's count of requests per recipient (counted when a request
arrives, before its latency): the ledger must agree with it for every recipient.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from blastd import ledger
from blastd.embedded import free_port
from tests.harness import (
    SandboxHandle,
    Servers,
    blast_job,
    campaign_state,
    daemon_env,
    daemon_process,
    is_done,
    is_ready,
    log_events,
    numbers_from,
    readiness,
    recipient_rows,
    wait_until,
)

LATENCY_MS = 500  # every request is in flight this long, so SIGTERM always finds some
RATE_PER_S = 40  # the campaign lasts a few seconds: SIGTERM lands in the middle
PROCESSING = "blastd:processing:test-process"


async def test_sigterm_drains_in_flight_sends_and_exits_0(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> None:
    """Intake stops, in-flight sends finish and are written, exit 0; nobody is left 'sending'
    or 'uncertain', and every recipient was sent exactly once or is still pending."""
    await sandbox.configure(latency_ms=LATENCY_MS)
    admin_port = free_port()
    env = daemon_env(servers, sandbox.url, admin_port)
    numbers = numbers_from(30_000_000, 200)
    await redis.lpush(
        "blastd:jobs", blast_job("drain", numbers, options={"rate_per_s": RATE_PER_S})
    )
    log_path = tmp_path / "daemon.log"
    async with daemon_process(env, log_path, tmp_path / "daemon.err") as process:
        await wait_until(lambda: is_ready(admin_port), timeout_s=30)
        await wait_until(lambda: _accepted_at_least(sandbox, 20), timeout_s=30)
        process.send_signal(signal.SIGTERM)
        draining = await wait_until(lambda: _is_draining(admin_port), timeout_s=10, interval_s=0.01)
        await redis.lpush("blastd:jobs", blast_job("late", numbers_from(31_000_000, 5)))
        assert await asyncio.wait_for(process.wait(), 30) == 0

    assert draining == {"status": "draining"}
    events = [e["event"] for e in log_events(log_path)]
    assert events.index("drain_started") < events.index("drain_finished")
    received = await sandbox.recipients()
    states = await _states_and_receipts(pool, "drain", received)
    assert set(states) == {("sent", 1), ("pending", 0)}, states
    await _assert_late_job_kept_and_unsent(redis, pool, received)
    assert await redis.llen(PROCESSING) == 0

    # The next start sends what the drain left pending, and nobody twice.
    await sandbox.configure(latency_ms=0)
    async with daemon_process(env, tmp_path / "again.log", tmp_path / "again.err"):
        await wait_until(lambda: is_done(pool, "drain"), timeout_s=60)
    received = await sandbox.recipients()
    assert set(await _states_and_receipts(pool, "drain", received)) == {("sent", 1)}


async def test_second_signal_cuts_the_drain_short_and_exits_1(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> None:
    """The second SIGTERM stops at once (exit 1): the sends it cut short stay 'sending' and the
    next start makes them 'uncertain', never sending them again."""
    await sandbox.configure(latency_ms=3_000)  # in flight until the second signal, surely
    admin_port = free_port()
    env = daemon_env(servers, sandbox.url, admin_port)
    await redis.lpush("blastd:jobs", blast_job("cut", numbers_from(32_000_000, 100)))
    log_path = tmp_path / "daemon.log"
    async with daemon_process(env, log_path, tmp_path / "daemon.err") as process:
        await wait_until(lambda: is_ready(admin_port), timeout_s=30)
        await wait_until(lambda: _accepted_at_least(sandbox, 20), timeout_s=30)
        process.send_signal(signal.SIGTERM)
        await wait_until(lambda: _is_draining(admin_port), timeout_s=10, interval_s=0.01)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 1

    assert "drain_cut_short" in [e["event"] for e in log_events(log_path)]
    rows = await recipient_rows(pool, "cut")
    cut_short = {r["id"] for r in rows if r["state"] == "sending"}
    assert cut_short, "the second signal found no send in flight"

    await sandbox.configure(latency_ms=0)
    async with daemon_process(env, tmp_path / "again.log", tmp_path / "again.err"):
        await wait_until(lambda: is_done(pool, "cut"), timeout_s=60)
    rows = await recipient_rows(pool, "cut")
    assert {r["id"] for r in rows if r["state"] == "uncertain"} == cut_short
    received = await sandbox.recipients()
    counts = {r["id"]: received.get(r["phone"].lstrip("+"), 0) for r in rows}
    # An uncertain recipient's request may or may not have left (the next claim was taken
    # ahead of the sends): never resent either way. Everyone else got exactly one message.
    assert {counts[i] for i in cut_short} <= {0, 1}
    assert any(counts[i] for i in cut_short), "no cut-short request had reached the provider"
    assert {(r["state"], counts[r["id"]]) for r in rows if r["id"] not in cut_short} == {
        ("sent", 1)
    }


async def _accepted_at_least(sandbox: SandboxHandle, count: int) -> bool:
    return sum((await sandbox.recipients()).values()) >= count


async def _is_draining(admin_port: int) -> dict[str, Any] | None:
    status, body = await readiness(admin_port)
    return body if status == 503 else None


async def _states_and_receipts(
    pool: ledger.Pool, campaign_id: str, received: dict[str, int]
) -> list[tuple[str, int]]:
    """(ledger state, requests the sandbox received) for every recipient of the campaign."""
    rows = await recipient_rows(pool, campaign_id)
    assert rows, "the campaign has no recipients"
    return [(r["state"], received.get(r["phone"].lstrip("+"), 0)) for r in rows]


async def _assert_late_job_kept_and_unsent(
    redis: aioredis.Redis, pool: ledger.Pool, received: dict[str, int]
) -> None:
    """A job pushed during the drain is either still queued or accepted, and never sent: a
    BLMOVE already waiting when SIGTERM came may take it, then intake stops."""
    if await campaign_state(pool, "late") is None:
        assert await redis.llen("blastd:jobs") == 1
        return
    states = await _states_and_receipts(pool, "late", received)
    assert set(states) == {("pending", 0)}


async def test_sigterm_while_waiting_for_redis_at_start_up_exits_at_once(
    servers: Servers, sandbox: SandboxHandle, tmp_path: Path
) -> None:
    """Start-up waits for Redis without end; a SIGTERM meanwhile must stop that wait, or
    `systemctl stop` would sit out TimeoutStopSec and end in SIGKILL."""
    env = daemon_env(servers, sandbox.url, free_port())
    env["BLASTD_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    log_path = tmp_path / "daemon.log"
    async with daemon_process(env, log_path, tmp_path / "daemon.err") as process:
        await wait_until(lambda: _has_event(log_path, "dependency_unavailable"), timeout_s=30)
        process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.wait_for(process.wait(), timeout=20)
    assert exit_code == 0
    assert not _has_event(log_path, "daemon_ready")


def _has_event(log_path: Path, name: str) -> bool:
    return any(event.get("event") == name for event in log_events(log_path))
