"""The operator's controls: pause, resume, cancel and retry_failed, from Python, Redis and the CLI.

A campaign is kept running long enough to act on by the account's rate (100 requests/s). That
a paused or cancelled campaign sends nothing more is shown with a barrier, not a sleep: a
second campaign on the same daemon runs to completion, and the first got no request meanwhile.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from blastd import controls, ledger
from tests.harness import (
    SandboxHandle,
    Servers,
    blast_job,
    campaign_counts,
    campaign_state,
    digits,
    events_named,
    has_state,
    make_settings,
    numbers_from,
    recipient_rows,
    run_cli,
    running_daemon,
    wait_until,
)

JOBS = "blastd:jobs"
DEAD = "blastd:dead"
SLOW = {"rate_per_s": 100}  # 300 recipients take 3 s: time to pause, cancel or resume them
TINY_RETRIES = {"retry": {"attempts": 2, "initial_s": 0.001, "max_s": 0.005, "jitter_s": 0}}


def control_job(job_id: str, action: str, campaign_id: str, **fields: Any) -> bytes:
    return orjson.dumps(
        {"type": "control", "id": job_id, "action": action, "campaign_id": campaign_id, **fields}
    )


async def has_sent(pool: ledger.Pool, campaign_id: str, minimum: int) -> bool:
    return (await campaign_counts(pool, campaign_id)).get("sent", 0) >= minimum


async def is_settled(pool: ledger.Pool, campaign_id: str) -> bool:
    """Nothing claimed or in flight: every answer is written, every unsent claim released."""
    return "sending" not in await campaign_counts(pool, campaign_id)


async def accepted_for(sandbox: SandboxHandle, numbers: list[str]) -> dict[str, int]:
    """Messages the sandbox accepted for each of `numbers` that got any."""
    accepted = await sandbox.recipients()
    return {n: accepted[digits(n)] for n in numbers if digits(n) in accepted}


async def run_barrier_campaign(
    redis: aioredis.Redis, pool: ledger.Pool, campaign_id: str, first: int
) -> None:
    """A small campaign through the same daemon and account, run to completion."""
    await redis.lpush(JOBS, blast_job(campaign_id, numbers_from(first, 10)))
    await wait_until(lambda: has_state(pool, campaign_id, "done"))


async def test_pause_stops_sending_and_resume_completes_without_duplicates(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    numbers = numbers_from(40_000_000, 300)
    settings = make_settings(servers, sandbox.url, account=SLOW)
    with capture_logs() as logs:
        async with running_daemon(settings):
            await redis.lpush(JOBS, blast_job("paused", numbers))
            await wait_until(lambda: has_sent(pool, "paused", 20))
            result = await controls.apply_control(pool, "paused", "pause")
            assert result is not None
            assert (result.applied, result.state) == (True, "paused")
            await wait_until(lambda: is_settled(pool, "paused"))
            at_pause = await accepted_for(sandbox, numbers)
            counts = await campaign_counts(pool, "paused")
            assert counts["sent"] == len(at_pause), "every accepted message is in the ledger"
            assert counts["pending"] > 0, "paused mid-campaign"

            await run_barrier_campaign(redis, pool, "barrier", 40_100_000)
            assert await accepted_for(sandbox, numbers) == at_pause
            assert await campaign_counts(pool, "paused") == counts

            resumed = await controls.apply_control(pool, "paused", "resume")
            assert resumed is not None
            assert (resumed.applied, resumed.state) == (True, "running")
            await wait_until(lambda: has_state(pool, "paused", "done"))
    assert await campaign_counts(pool, "paused") == {"sent": 300}
    assert await accepted_for(sandbox, numbers) == {n: 1 for n in numbers}
    campaign = await ledger.load_campaign(pool, "paused")
    assert campaign is not None
    assert campaign.state_reason is None, "resume clears the operator's reason"
    assert [e["state"] for e in events_named(logs, "campaign_paused")] == ["paused"]
    assert len(events_named(logs, "campaign_resumed")) == 1


async def test_pause_and_resume_are_idempotent_and_say_why_when_nothing_changes(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    settings = make_settings(servers, sandbox.url)
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("finished", numbers_from(40_200_000, 3)))
        await wait_until(lambda: has_state(pool, "finished", "done"))
    outcomes = {}
    for action in ("pause", "resume", "cancel", "retry_failed"):
        result = await controls.apply_control(pool, "finished", action)
        assert result is not None
        outcomes[action] = (result.applied, result.state, result.message)
    assert outcomes == {
        "pause": (False, "done", "campaign is done, not running"),
        "resume": (False, "done", "campaign is done: only paused or stopped resume"),
        "cancel": (False, "done", "campaign is done already"),
        "retry_failed": (False, "done", "no failed recipients of class transient, throttled"),
    }
    assert await controls.apply_control(pool, "no-such-campaign", "pause") is None


async def test_cancel_leaves_pending_recipients_cancelled_and_sends_nothing_more(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    numbers = numbers_from(40_300_000, 300)
    settings = make_settings(servers, sandbox.url, account=SLOW)
    with capture_logs() as logs:
        async with running_daemon(settings):
            await redis.lpush(JOBS, blast_job("cancelled", numbers))
            await wait_until(lambda: has_sent(pool, "cancelled", 20))
            result = await controls.apply_control(pool, "cancelled", "cancel")
            assert result is not None
            assert (result.applied, result.state) == (True, "cancelled")
            assert result.recipients > 0
            await wait_until(lambda: is_settled(pool, "cancelled"))
            at_cancel = await accepted_for(sandbox, numbers)
            await run_barrier_campaign(redis, pool, "barrier", 40_400_000)
            assert await accepted_for(sandbox, numbers) == at_cancel
            again = await controls.apply_control(pool, "cancelled", "cancel")
            assert again is not None
            assert not again.applied
    counts = await campaign_counts(pool, "cancelled")
    assert set(counts) == {"sent", "cancelled"}, "released claims were cancelled too"
    assert counts["sent"] == len(at_cancel)
    assert counts["cancelled"] >= result.recipients
    campaign = await ledger.load_campaign(pool, "cancelled")
    assert campaign is not None
    assert (campaign.state, campaign.state_reason) == ("cancelled", "operator")
    assert campaign.finished_at is not None
    [event] = events_named(logs, "campaign_cancelled")
    assert event["count"] == result.recipients


async def test_retry_of_transient_failures_resends_only_those_and_never_a_sent_one(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    numbers = numbers_from(40_500_000, 6)
    flaky, gone = numbers[1:3], numbers[4]
    await sandbox.configure(
        fail_numbers={digits(flaky[0]): 131000, digits(flaky[1]): 131000, digits(gone): 131026}
    )
    settings = make_settings(servers, sandbox.url, account=TINY_RETRIES)
    with capture_logs() as logs:
        async with running_daemon(settings):
            await redis.lpush(JOBS, blast_job("retried", numbers))
            await wait_until(lambda: has_state(pool, "retried", "done"))
            await sandbox.configure(fail_numbers={})
            result = await controls.apply_control(pool, "retried", "retry_failed", ["transient"])
            assert result is not None
            assert (result.applied, result.state, result.recipients) == (True, "running", 2)
            await wait_until(lambda: has_state(pool, "retried", "done"))
    rows = {row["phone"]: row for row in await recipient_rows(pool, "retried")}
    assert [rows[n]["state"] for n in flaky] == ["sent", "sent"]
    assert [rows[n]["attempts"] for n in flaky] == [3, 3], "attempts are kept across a retry"
    assert (rows[gone]["state"], rows[gone]["error_class"]) == ("failed", "permanent")
    assert await accepted_for(sandbox, numbers) == {n: 1 for n in numbers if n != gone}
    campaign = await ledger.load_campaign(pool, "retried")
    assert campaign is not None
    assert campaign.finished_at is not None
    [event] = events_named(logs, "recipients_requeued")
    assert (event["count"], event["classes"]) == (2, ["transient"])


async def test_uncertain_recipients_are_resent_only_when_the_operator_names_their_class(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """An unreadable 2xx leaves a recipient uncertain: it may have arrived, so resending it is
    the operator's explicit choice, never part of the default classes."""
    numbers = numbers_from(40_600_000, 3)
    await sandbox.configure(malformed_body_p=1.0)
    settings = make_settings(servers, sandbox.url)
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("unsure", numbers))
        await wait_until(lambda: has_state(pool, "unsure", "done"))
        await sandbox.configure(malformed_body_p=0.0)
        by_default = await controls.apply_control(pool, "unsure", "retry_failed")
        assert by_default is not None
        assert not by_default.applied
        assert await campaign_counts(pool, "unsure") == {"uncertain": 3}
        chosen = await controls.apply_control(pool, "unsure", "retry_failed", ["uncertain"])
        assert chosen is not None
        assert chosen.recipients == 3
        await wait_until(lambda: has_state(pool, "unsure", "done"))
    assert await campaign_counts(pool, "unsure") == {"sent": 3}
    assert await accepted_for(sandbox, numbers) == {n: 2 for n in numbers}


# --- control jobs through Redis ----------------------------------------------------------------


async def test_control_jobs_pause_and_resume_and_one_pushed_twice_is_applied_once(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    numbers = numbers_from(40_700_000, 300)
    settings = make_settings(servers, sandbox.url, account=SLOW)
    with capture_logs() as logs:
        async with running_daemon(settings):
            await redis.lpush(JOBS, blast_job("remote", numbers))
            await wait_until(lambda: has_sent(pool, "remote", 20))
            await redis.lpush(JOBS, control_job("pause-1", "pause", "remote"))
            await wait_until(lambda: has_state(pool, "remote", "paused"))
            await wait_until(lambda: is_settled(pool, "remote"))
            # Resume, then the same pause job again: it must not pause the campaign twice.
            await redis.lpush(JOBS, control_job("resume-1", "resume", "remote"))
            await redis.lpush(JOBS, control_job("pause-1", "pause", "remote"))
            await wait_until(lambda: has_state(pool, "remote", "done"))
    assert await accepted_for(sandbox, numbers) == {n: 1 for n in numbers}
    assert len(events_named(logs, "campaign_paused")) == 1
    [duplicate] = events_named(logs, "control_not_applied")
    assert duplicate["reason"] == "this control job was applied before"
    recorded = await pool.fetch("SELECT id, action FROM controls ORDER BY applied_at")
    assert [(r["id"], r["action"]) for r in recorded] == [
        ("pause-1", "pause"),
        ("resume-1", "resume"),
    ]
    assert await redis.llen(DEAD) == 0


async def test_control_jobs_retry_the_named_class_and_a_late_cancel_changes_nothing(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    numbers = numbers_from(40_800_000, 4)
    await sandbox.configure(fail_numbers={digits(numbers[0]): 131000})
    settings = make_settings(servers, sandbox.url, account=TINY_RETRIES)
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("remote-retry", numbers))
        await wait_until(lambda: has_state(pool, "remote-retry", "done"))
        await sandbox.configure(fail_numbers={})
        retry = control_job("retry-1", "retry_failed", "remote-retry", classes=["transient"])
        await redis.lpush(JOBS, retry)
        await wait_until(lambda: _sent_all(pool, "remote-retry", 4))
        await redis.lpush(JOBS, control_job("cancel-1", "cancel", "remote-retry"))
        await wait_until(lambda: _control_recorded(pool, "cancel-1"))
    assert await campaign_counts(pool, "remote-retry") == {"sent": 4}
    assert await campaign_state(pool, "remote-retry") == "done", "a done campaign is not cancelled"
    assert await accepted_for(sandbox, numbers) == {n: 1 for n in numbers}


async def _sent_all(pool: ledger.Pool, campaign_id: str, count: int) -> bool:
    is_done = await campaign_state(pool, campaign_id) == "done"
    return is_done and await campaign_counts(pool, campaign_id) == {"sent": count}


async def _control_recorded(pool: ledger.Pool, control_id: str) -> bool:
    return bool(await pool.fetchval("SELECT 1 FROM controls WHERE id = $1", control_id))


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"campaign_id": "never-created"}, "unknown campaign 'never-created'"),
        (
            {"campaign_id": "x", "scope": "images"},
            "scope: scope 'images' is not supported (supported: messages, videos)",
        ),
        (
            {"campaign_id": "x", "action": "stop"},
            "action: Input should be 'pause', 'resume', 'cancel' or 'retry_failed'",
        ),
        (
            {"campaign_id": "x", "classes": ["transient"]},
            "classes: only retry_failed takes classes",
        ),
        ({}, "missing campaign_id"),
    ],
)
async def test_a_control_job_that_cannot_be_applied_is_dead_lettered_with_its_reason(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    fields: dict[str, Any],
    reason: str,
) -> None:
    job = {"type": "control", "id": "bad-control", "action": "pause", **fields}
    settings = make_settings(servers, sandbox.url)
    async with running_daemon(settings):
        await redis.lpush(JOBS, orjson.dumps(job))
        raw = await wait_until(lambda: redis.lindex(DEAD, 0))
    entry = orjson.loads(raw)
    assert (entry["reason"], entry["job_id"]) == (reason, "bad-control")
    assert orjson.loads(entry["payload"]) == job


# --- the CLI -----------------------------------------------------------------------------------


async def test_cli_pause_then_cancel_a_running_campaign(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    cli_env: dict[str, str],
) -> None:
    # Ten seconds of sending: the pause must land while it runs, and a CLI process can take
    # seconds to start on a loaded machine. The test ends at the pause, not after the sends.
    numbers = numbers_from(40_900_000, 1_000)
    settings = make_settings(servers, sandbox.url, account=SLOW)
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("cli-paused", numbers))
        await wait_until(lambda: has_sent(pool, "cli-paused", 10))
        paused = await run_cli(cli_env, "pause", "cli-paused")
        assert (paused.code, paused.stdout) == (0, "cli-paused: paused\n")
        await wait_until(lambda: is_settled(pool, "cli-paused"))
        again = await run_cli(cli_env, "pause", "cli-paused")
        assert (again.code, again.stdout) == (0, "cli-paused: campaign is paused, not running\n")
        cancelled = await run_cli(cli_env, "cancel", "cli-paused")
        assert cancelled.code == 0
        assert cancelled.stdout.startswith("cli-paused: cancelled; ")
    counts = await campaign_counts(pool, "cli-paused")
    assert set(counts) == {"sent", "cancelled"}
    assert await campaign_state(pool, "cli-paused") == "cancelled"
    resumed = await run_cli(cli_env, "resume", "cli-paused")
    assert (resumed.code, resumed.stdout) == (
        0,
        "cli-paused: campaign is cancelled: only paused or stopped resume\n",
    )


async def test_cli_retry_resends_the_failed_class_and_resume_restarts_a_paused_campaign(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    cli_env: dict[str, str],
) -> None:
    numbers = numbers_from(41_000_000, 3)
    await sandbox.configure(fail_numbers={digits(numbers[2]): 131000})
    settings = make_settings(servers, sandbox.url, account=TINY_RETRIES)
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("cli-retry", numbers))
        await wait_until(lambda: has_state(pool, "cli-retry", "done"))
        await sandbox.configure(fail_numbers={})
        nothing = await run_cli(cli_env, "retry", "cli-retry", "--class", "permanent")
        assert nothing.stdout == "cli-retry: no failed recipients of class permanent\n"
        retried = await run_cli(cli_env, "retry", "cli-retry", "--class", "transient")
        assert (retried.code, retried.stdout) == (
            0,
            "cli-retry: 1 recipients back to pending; campaign running\n",
        )
        await wait_until(lambda: has_state(pool, "cli-retry", "done"))
    assert await campaign_counts(pool, "cli-retry") == {"sent": 3}
    assert await accepted_for(sandbox, numbers) == {n: 1 for n in numbers}
    bad_class = await run_cli(cli_env, "retry", "cli-retry", "--class", "bogus")
    assert bad_class.code == 2
    missing = await run_cli(cli_env, "pause", "no-such-campaign")
    assert (missing.code, missing.stderr.strip().splitlines()[-1]) == (
        1,
        "blastd: no campaign 'no-such-campaign'",
    )
