"""A blast claims the next requests' recipients from above its last claim; what became due
behind it (a retry's time came) is still reached while the campaign goes on."""

from __future__ import annotations

import redis.asyncio as aioredis

from blastd import ledger
from blastd.campaigns import RESCAN_S
from tests.harness import (
    SandboxHandle,
    Servers,
    blast_job,
    make_settings,
    numbers_from,
    running_daemon,
    wait_until,
)

JOBS = "blastd:jobs"
RATE_PER_S = 100
# Long enough that the campaign is still sending well after the retry is due and a rescan
# came: the first retry of a pair-limited recipient is due 4 s after its first answer.
RECIPIENTS = round(RATE_PER_S * (4 + RESCAN_S) * 2)


async def test_a_retry_due_behind_the_claims_goes_out_before_the_campaign_ends(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    numbers = numbers_from(49_000_000, RECIPIENTS)
    # Always refused as pair-limited (131056): it is retried 4 s later, then 16 s later.
    await sandbox.configure(fail_numbers={numbers[0].lstrip("+"): 131056})
    settings = make_settings(servers, sandbox.url, account={"rate_per_s": RATE_PER_S})
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("behind", numbers))
        await wait_until(lambda: _attempts_of(pool, numbers[0], 2), timeout_s=60)
        still_pending = await pool.fetchval(
            "SELECT count(*) FROM recipients WHERE campaign_id = 'behind' AND state = 'pending' "
            "AND phone <> $1",
            numbers[0],
        )
    print(f"\nretry sent with {still_pending} of {RECIPIENTS} still pending")
    # Reached by a rescan, not only when the claims came to the campaign's last recipient.
    assert still_pending >= RECIPIENTS // 4


async def _attempts_of(pool: ledger.Pool, phone: str, attempts: int) -> bool:
    found = await pool.fetchval("SELECT attempts FROM recipients WHERE phone = $1", phone)
    return found is not None and found >= attempts
