"""Reconciliation end to end: a daemon sends through a sandbox that withholds answers it
accepted; every recipient ends sent (flagged when it was sent again) or held, never stuck, and
the sandbox's own tally of what it accepted is the independent record."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from blastd import ledger, reports
from blastd.embedded import free_port
from tests.conftest import Servers
from tests.harness import (
    SandboxHandle,
    blast_job,
    campaign_state,
    make_settings,
    numbers_from,
    running_daemon,
    wait_until,
    webhook_url,
)

JOBS = "blastd:jobs"
# A short client timeout, so a withheld answer is a lost one quickly.
ACCOUNT = {"request_timeout_s": 0.3}


def _settings(servers: Servers, sandbox: SandboxHandle, **overrides: Any) -> Any:
    return make_settings(
        servers,
        sandbox.url,
        account=ACCOUNT,
        reconcile_window_s=0.5,
        reconcile_interval_s=0.1,
        **overrides,
    )


async def _rows(pool: ledger.Pool, campaign_id: str) -> list[Any]:
    return await pool.fetch(
        "SELECT phone, state, flags, doubt_since, error_class FROM recipients "
        "WHERE campaign_id = $1 ORDER BY seq",
        campaign_id,
    )


async def _done(pool: ledger.Pool, campaign_id: str) -> bool:
    return await campaign_state(pool, campaign_id) == "done"


async def test_resend_policy_sends_doubts_again_once_flagged_and_holds_a_second_doubt(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    numbers = numbers_from(41_000_000, 60)
    await sandbox.configure(withhold_answer_p=0.3, seed=11)
    async with running_daemon(_settings(servers, sandbox, uncertain_policy="resend")):
        await redis.lpush(JOBS, blast_job("doubts", numbers))
        await wait_until(lambda: _done(pool, "doubts"), timeout_s=60)
    rows = await _rows(pool, "doubts")
    accepted = await sandbox.recipients()
    stats = await sandbox.stats()

    assert len(rows) == len(numbers), "nobody lost"
    assert stats["answers_withheld"] > 0, "the knob withheld answers"
    resent = [r for r in rows if "possible_duplicate" in r["flags"]]
    assert resent, "a withheld answer was resent"
    for row in rows:
        times = accepted.get(row["phone"].lstrip("+"), 0)
        flagged = "possible_duplicate" in row["flags"]
        # The sandbox took every request: once, or twice exactly when we say so.
        assert times == (2 if flagged else 1), (row["phone"], times, row["flags"])
        assert row["doubt_since"] is None, "nothing waits for reconciliation once done"
        if row["state"] == "uncertain":
            assert flagged, "only a second doubt is held: the first is always resent"
        else:
            assert row["state"] == "sent"
            assert row["error_class"] is None
    assert sum(accepted.values()) == stats["accepted"] == len(numbers) + len(resent)
    report = await reports.campaign_status(pool, "doubts")
    assert report is not None
    assert report["flags"] == {"possible_duplicate": len(resent)}, "the report says so"


async def test_hold_policy_resolves_doubts_by_their_webhooks_and_never_resends(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """The statuses come after the client gave up on the answers: they resolve the doubts
    (flagged delivered_after_failure), and nothing is sent twice."""
    numbers = numbers_from(41_100_000, 40)
    admin_port = free_port()
    await sandbox.configure(
        withhold_answer_p=0.4, seed=12, webhook_url=webhook_url(admin_port), webhook_delay_ms=800
    )
    settings = _settings(servers, sandbox, uncertain_policy="hold", admin_port=admin_port)
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("held", numbers))
        await wait_until(lambda: _done(pool, "held"), timeout_s=60)
        await wait_until(lambda: _all_read(pool, "held"), timeout_s=30)
    rows = await _rows(pool, "held")
    accepted = await sandbox.recipients()
    assert (await sandbox.stats())["answers_withheld"] > 0
    assert all(accepted.get(r["phone"].lstrip("+")) == 1 for r in rows), "never sent twice"
    resolved = [r for r in rows if "delivered_after_failure" in r["flags"]]
    assert resolved, "a receipt resolved a recipient whose answer was lost"
    assert all("possible_duplicate" not in r["flags"] for r in rows)


async def _all_read(pool: ledger.Pool, campaign_id: str) -> bool:
    return await ledger.count_states(pool, campaign_id) == {"read": 40}


async def test_doubts_wait_their_window_and_hold_keeps_them_for_an_operator(
    pool: ledger.Pool,
) -> None:
    """The statement under the service: nothing is decided inside the window; after it, hold
    keeps the recipient uncertain and lets its campaign finish, and a cancelled campaign's
    doubts are never sent again."""
    async with ledger.transaction(pool) as conn:
        for campaign_id in ("kept", "gone"):
            await conn.execute(
                "INSERT INTO campaigns (id, type, account, message) "
                "VALUES ($1, 'blast', 'cloud-main', '{}')",
                campaign_id,
            )
            await conn.execute(
                "INSERT INTO recipients (campaign_id, seq, phone, state) "
                "VALUES ($1, 0, '+6281200000001', 'sending')",
                campaign_id,
            )
    await pool.execute("UPDATE recipients SET state = 'uncertain'")
    await pool.execute("UPDATE campaigns SET state = 'cancelled' WHERE id = 'gone'")
    assert not await ledger.finish_campaign_if_done(pool, "kept"), "it waits for the decision"

    assert await ledger.reconcile_doubts(pool, 3600.0, resend=True, limit=10) == []
    decisions = await ledger.reconcile_doubts(pool, 0.0, resend=True, limit=10)

    assert sorted((d.campaign_id, d.state) for d in decisions) == [
        ("gone", "uncertain"),
        ("kept", "pending"),
    ]
    assert await ledger.reconcile_doubts(pool, 0.0, resend=False, limit=10) == []
    await pool.execute("UPDATE recipients SET state = 'sending' WHERE campaign_id = 'kept'")
    await pool.execute("UPDATE recipients SET state = 'uncertain' WHERE campaign_id = 'kept'")
    held = await ledger.reconcile_doubts(pool, 0.0, resend=False, limit=10)
    assert [(d.campaign_id, d.state) for d in held] == [("kept", "uncertain")]
    assert await ledger.finish_campaign_if_done(pool, "kept")
