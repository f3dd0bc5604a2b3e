"""SIGKILL a real `blastd run` during a video blast's submission, and again during its polling.

Ground truth is the sandbox: D-ID's count of clips created per reference (the ledger id) and
the Cloud API's count of messages per number. The promise: no clip submitted twice, no video
delivered twice, every recipient in one final state. Submissions a kill cut off are looked up
at D-ID by their user_data after the restart, and submitted only if D-ID never got them.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from blastd import ledger
from blastd.embedded import free_port
from tests.harness import (
    ACCOUNT,
    TOKEN,
    Servers,
    daemon_env,
    is_done,
    is_ready,
    spawn_daemon,
    wait_until,
    webhook_url,
)
from tests.video_harness import DID_ACCOUNT, PRESENTER, VideoSandbox, video_sandbox

RECIPIENTS = 300


def _env(
    servers: Servers, sandbox: VideoSandbox, admin_port: int, compression: float
) -> dict[str, str]:
    env = daemon_env(servers, sandbox.url, admin_port)
    accounts = orjson.loads(env["BLASTD_ACCOUNTS"])
    accounts[DID_ACCOUNT] = {
        "kind": "did",
        "base_url": sandbox.did.url,
        "token": TOKEN,
        "presenter_id": PRESENTER,
        "retry": {"attempts": 3, "initial_s": 0.01, "max_s": 0.05, "jitter_s": 0.01},
    }
    env["BLASTD_ACCOUNTS"] = orjson.dumps(accounts).decode()
    schedule = {"FIRST_POLL_S": 5, "POLL_INTERVAL_S": 10, "TIMEOUT_S": 300, "BACKOFF_MAX_S": 60}
    for name, seconds in schedule.items():
        env[f"BLASTD_VIDEO__{name}"] = str(seconds / compression)
    env["BLASTD_VIDEO__RECOVERY_INTERVAL_S"] = "0.5"
    return env


async def _push_blast(redis: aioredis.Redis, job_id: str) -> None:
    numbers = [f"+62814{n:08d}" for n in range(RECIPIENTS)]
    job = {
        "type": "video_blast",
        "id": job_id,
        "account": ACCOUNT,
        "video": {"account": DID_ACCOUNT, "script": "Halo pelanggan {n}"},
        "message": {"caption": "Video {n}"},
        "recipients": [{"to": to, "vars": {"n": str(i)}} for i, to in enumerate(numbers)],
    }
    await redis.lpush("blastd:jobs", orjson.dumps(job))


async def _run_with_kills(
    sandbox: VideoSandbox,
    pool: ledger.Pool,
    env: dict[str, str],
    tmp_path: Path,
    job_id: str,
    kill_when: list[Any],
) -> None:
    """Start the daemon, SIGKILL it as each condition comes true, then run it to the end."""
    for index, condition in enumerate(kill_when):
        process = spawn_daemon(env, tmp_path / f"daemon-{index}.log")
        try:
            await wait_until(condition, timeout_s=60, interval_s=0.01)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    admin_port = int(env["BLASTD_ADMIN__PORT"])
    final = spawn_daemon(env, tmp_path / "daemon-final.log")
    try:
        await wait_until(lambda: is_ready(admin_port), timeout_s=30)
        await wait_until(lambda: is_done(pool, job_id), timeout_s=120)
    finally:
        final.send_signal(signal.SIGTERM)
        assert final.wait(timeout=30) == 0


async def _check(sandbox: VideoSandbox, pool: ledger.Pool, job_id: str) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT id, phone, state FROM recipients WHERE campaign_id = $1", job_id
    )
    jobs = await sandbox.jobs()
    created = [job["reference"] for job in jobs]
    received = await sandbox.cloud.recipients()
    states = [r["state"] for r in rows]
    assert len(rows) == RECIPIENTS, "a recipient was lost"
    assert set(states) <= set(ledger.FINAL_STATES), f"not final: {set(states)}"
    assert len(created) == len(set(created)), "a clip was submitted twice"
    assert {str(r["id"]) for r in rows} <= set(created), "a render was never submitted"
    duplicates = {to: n for to, n in received.items() if n > 1}
    assert duplicates == {}, f"a video was delivered twice: {duplicates}"
    for row in rows:
        count = received.get(row["phone"].lstrip("+"), 0)
        if row["state"] == "sent":
            assert count == 1, "sent in the ledger, never received"
        else:
            # 'uncertain': a kill came after its request left; it is never resent
            assert row["state"] == "uncertain", row["state"]
            assert count <= 1
    return {state: states.count(state) for state in set(states)}


async def _blast_with_kills(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    tmp_path: Path,
    job_id: str,
    figure: Callable[[VideoSandbox], Awaitable[int]],
    kill_at: list[int],
    **did_knobs: Any,
) -> tuple[dict[str, int], dict[str, Any]]:
    """Run a video blast, SIGKILL the daemon as `figure` reaches each of `kill_at`, run it to
    the end; the recipients' states (checked by _check) and D-ID's stats."""
    async with video_sandbox(**did_knobs) as sandbox:
        admin_port = free_port()
        await sandbox.cloud.configure(
            webhook_url=webhook_url(admin_port), webhook_statuses=["sent"], webhook_attempts=8
        )
        env = _env(servers, sandbox, admin_port, did_knobs["time_compression"])
        await _push_blast(redis, job_id)

        async def reached(count: int) -> bool:
            return await figure(sandbox) >= count

        kills = [functools.partial(reached, count) for count in kill_at]
        await _run_with_kills(sandbox, pool, env, tmp_path, job_id, kills)
        return await _check(sandbox, pool, job_id), await sandbox.did.stats()


async def _clips_created(sandbox: VideoSandbox) -> int:
    return int((await sandbox.did.stats())["created"])


async def _videos_delivered(sandbox: VideoSandbox) -> int:
    return int((await sandbox.cloud.stats())["accepted"])


@pytest.mark.slow
async def test_sigkill_during_submission_submits_no_clip_twice(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, tmp_path: Path
) -> None:
    # Creates take 40 ms each, ten at a time: about 1.2 s to submit them all.
    counts, did_stats = await _blast_with_kills(
        servers,
        redis,
        pool,
        tmp_path,
        "vcrash-submit",
        _clips_created,
        [45, 160],
        latency_ms=40.0,
        time_compression=200.0,
    )
    print(f"\nvideo crash during submission: {counts}; clips created {did_stats['created']}")


@pytest.mark.slow
async def test_sigkill_during_polling_delivers_no_video_twice(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, tmp_path: Path
) -> None:
    # Renders of about 3 s: every clip is submitted before the first one is done, and the
    # kills land while some are delivered and the rest are still being polled.
    counts, _ = await _blast_with_kills(
        servers,
        redis,
        pool,
        tmp_path,
        "vcrash-poll",
        _videos_delivered,
        [40, 150],
        time_compression=20.0,
    )
    print(f"\nvideo crash during polling: {counts}")
    assert counts.get("sent", 0) >= RECIPIENTS - 20
