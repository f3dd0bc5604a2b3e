"""SIGKILL a real `blastd run` at random moments of a 5,000-recipient blast, restart it each time.

Ground truth is the sandbox's count of accepted requests per recipient. The promise: every
recipient ends in exactly one final state, none is lost, nobody is messaged twice, and the
only recipients the sandbox may have received without the ledger knowing are those the ledger
marks 'uncertain', each of which is resolved by its status webhook.
"""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from blastd import ledger
from blastd.embedded import free_port
from tests.harness import (
    ACCOUNT,
    SandboxHandle,
    Servers,
    daemon_env,
    finish_after_kills,
    spawn_daemon,
    webhook_url,
)

RECIPIENTS = 5_000
KILLS = 5
RATE_PER_S = 400  # slow enough that the kills land while the campaign is being sent


@pytest.mark.slow
async def test_sigkill_at_random_moments_loses_nobody_and_sends_nobody_twice(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> None:
    admin_port = free_port()
    # Webhooks must outlive a dead daemon: retry for ~25 s (0.1 s doubling, 8 attempts).
    await sandbox.configure(
        webhook_url=webhook_url(admin_port), webhook_statuses=["sent"], webhook_attempts=8
    )
    numbers = [f"+62813{n:08d}" for n in range(20_000_000, 20_000_000 + RECIPIENTS)]
    await redis.rpush("blastd:recipients:crash", *(orjson.dumps({"to": n}) for n in numbers))
    job = {
        "type": "blast",
        "id": "crash",
        "account": ACCOUNT,
        "message": {"text": "hi"},
        "recipients_key": "blastd:recipients:crash",
        "options": {"rate_per_s": RATE_PER_S},
    }
    await redis.lpush("blastd:jobs", orjson.dumps(job))

    env = daemon_env(servers, sandbox.url, admin_port)
    rng = random.Random(20261122)
    kill_moments = []
    for kill in range(KILLS):
        process = spawn_daemon(env, tmp_path / f"daemon-{kill}.log")
        moment_s = rng.uniform(0.8, 3.0)
        await asyncio.sleep(moment_s)
        process.send_signal(signal.SIGKILL)
        process.wait()
        kill_moments.append(round(moment_s, 2))

    final_log = tmp_path / "daemon-final.log"
    await finish_after_kills(env, final_log, admin_port, pool, sandbox, "crash", 120)

    rows = await pool.fetch("SELECT phone, state, flags FROM recipients")
    received = await sandbox.recipients()
    states = [r["state"] for r in rows]
    assert len(rows) == RECIPIENTS, "a recipient was lost"
    assert set(states) <= set(ledger.FINAL_STATES), f"not final: {set(states)}"
    duplicates = {to: n for to, n in received.items() if n > 1}
    assert duplicates == {}, f"messaged twice: {duplicates}"
    for row in rows:
        count = received.get(row["phone"].lstrip("+"), 0)
        if row["state"] == "uncertain":
            assert count == 0, "an uncertain recipient was received but never resolved"
        else:
            assert (row["state"], count) == ("sent", 1)
    resolved = sum(1 for r in rows if "delivered_after_failure" in r["flags"])
    print(
        f"\ncrash test: kills at {kill_moments} s; recipients {RECIPIENTS}; "
        f"sent {states.count('sent')}; uncertain {states.count('uncertain')} (never received); "
        f"resolved by webhook {resolved}; duplicates {len(duplicates)}"
    )
    assert await redis.llen("blastd:processing:test-process") == 0
