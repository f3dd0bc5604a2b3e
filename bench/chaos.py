"""Chaos: the exact fate of every recipient of a blast under real faults, counted by the sandbox.

    .venv/bin/python bench/chaos.py [--recipients 20000] [--kills 20] [--restarts 20]
                                    [--withheld 0.02] [--scenarios kills restarts withheld]

Each scenario runs one blast through a real `blastd run` against real Valkey, PostgreSQL and
the Cloud API sandbox (20-50 ms per answer, status webhooks signed and posted back to the
daemon), with a short reconcile window so doubts are settled within the run:

- kills: the daemon is SIGKILLed `--kills` times at random moments, restarted 2 s later.
- restarts: PostgreSQL is stopped with a fast shutdown (SIGINT) `--restarts` times, just
  after a claim, and started again 1 s later.
- withheld: the sandbox accepts every message but withholds the answer of `--withheld` of them
  past the account's request timeout.

The independent record is the sandbox's tally of what it accepted, per number. Printed per
scenario: lost (accepted by nobody, yet not recorded failed), duplicates (accepted twice),
unflagged duplicates (accepted twice without `possible_duplicate` on the row), in doubt at the
end, stuck (still pending or sending at the end), and the largest number of recipients put in
doubt by one kill beside its bound: the requests in flight (the account's concurrency), the
requests whose intent was committed ahead of their turn, and the answers back but not yet
written (outcomes are written in batches 50 ms apart). Goals: 0,
-, 0, 0, 0 and in doubt after a kill within that bound.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import signal
import time
from dataclasses import dataclass, field

import asyncpg
import uvloop
from rich.console import Console
from rich.table import Table
from stack import (
    ACCOUNT,
    Daemon,
    Stack,
    account_settings,
    phone_numbers,
    push_job,
    push_recipients,
    recipients_key,
    running_stack,
    spawn_daemon,
)

from blastd.campaigns import CLAIMED_AHEAD_S

RATE_PER_S = 400
CONCURRENCY = 20
APP_SECRET = "sandbox-app-secret"
REQUEST_TIMEOUT_S = 2.0
DONE_TIMEOUT_S = 600.0
SETTLE_ENV = {
    "BLASTD_RECONCILE_WINDOW_S": "5",
    "BLASTD_RECONCILE_INTERVAL_S": "1",
    "BLASTD_ORPHAN_SWEEP_INTERVAL_S": "2",
    "BLASTD_INSTANCE_TTL_S": "2",
    "BLASTD_HEARTBEAT_INTERVAL_S": "0.5",
}
FLUSH_INTERVAL_S = 0.05  # the outcome writer's default
# The requests claimed (their intent committed) ahead of their turn (blastd.campaigns.BlastRun's
# claimed_ahead for this rate).
CLAIMED_AHEAD = math.ceil(RATE_PER_S * CLAIMED_AHEAD_S)
# A kill puts in doubt the requests in flight, those claimed ahead, and the answers back but not
# yet written (the outcomes go in batches, one flush interval apart, one flush possibly under
# way).
DOUBT_BOUND = CONCURRENCY + CLAIMED_AHEAD + round(RATE_PER_S * 2 * FLUSH_INTERVAL_S)


@dataclass
class Fate:
    """What became of the campaign's recipients, by the ledger and by the sandbox."""

    scenario: str
    faults: int
    recipients: int
    lost: int = 0
    duplicates: int = 0
    unflagged_duplicates: int = 0
    in_doubt: int = 0
    stuck: int = 0
    doubt_after_kill: list[int] = field(default_factory=list)
    seconds: float = 0.0


def account(stack: Stack) -> dict[str, object]:
    settings = account_settings(stack.sandbox_url, rate_per_s=RATE_PER_S, concurrency=CONCURRENCY)
    settings.update({"app_secret": APP_SECRET, "request_timeout_s": REQUEST_TIMEOUT_S})
    return settings


async def configure_sandbox(stack: Stack, admin_port: int, **knobs: object) -> None:
    webhook_url = f"http://127.0.0.1:{admin_port}/webhooks/cloud_api/{ACCOUNT}"
    await stack.sandbox_post(
        "config",
        {
            "latency_ms": 20,
            "latency_jitter_ms": 30,
            "app_secret": APP_SECRET,
            "webhook_url": webhook_url,
            "webhook_statuses": ["sent", "delivered"],
            "seed": 7,
            **knobs,
        },
    )


async def start_campaign(stack: Stack, campaign_id: str, count: int) -> list[str]:
    numbers = phone_numbers(count)
    await push_recipients(stack.redis, recipients_key(campaign_id), numbers)
    await push_job(stack.redis, campaign_id)
    return numbers


async def doubts(stack: Stack, campaign_id: str) -> int:
    count: int = await stack.pool.fetchval(
        "SELECT count(*) FROM recipients WHERE campaign_id = $1 AND state = 'uncertain'",
        campaign_id,
    )
    return count


async def sent_count(stack: Stack) -> int:
    stats = await stack.sandbox_get("stats")
    return int(stats.get("accepted", 0))


async def wait_for_progress(stack: Stack, at_least: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await sent_count(stack) < at_least:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the sandbox accepted fewer than {at_least} in {timeout_s} s")
        await asyncio.sleep(0.05)


async def is_done(stack: Stack, campaign_id: str) -> bool:
    state = await stack.pool.fetchval("SELECT state FROM campaigns WHERE id = $1", campaign_id)
    return state == "done"


async def wait_done(stack: Stack, campaign_id: str) -> None:
    """Until the campaign is done, or DONE_TIMEOUT_S: then its rows are counted as they are."""
    deadline = time.monotonic() + DONE_TIMEOUT_S
    while True:
        if await is_done(stack, campaign_id) or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.2)


async def count_fate(stack: Stack, fate: Fate, campaign_id: str, numbers: list[str]) -> None:
    accepted: dict[str, int] = await stack.sandbox_get("recipients")
    rows = await stack.pool.fetch(
        "SELECT phone, state, flags FROM recipients WHERE campaign_id = $1", campaign_id
    )
    by_phone = {row["phone"]: row for row in rows}
    for number in numbers:
        times = accepted.get(number.removeprefix("+"), 0)
        row = by_phone.get(number)
        state = row["state"] if row is not None else None
        if times == 0 and state not in ("failed", "skipped", "cancelled", "expired"):
            fate.lost += 1
        if times > 1:
            fate.duplicates += 1
            if row is None or "possible_duplicate" not in (row["flags"] or []):
                fate.unflagged_duplicates += 1
    fate.in_doubt = sum(1 for row in rows if row["state"] == "uncertain")
    fate.stuck = sum(1 for row in rows if row["state"] in ("pending", "sending"))


async def start_scenario(
    stack: Stack, campaign_id: str, count: int, **knobs: object
) -> tuple[Daemon, list[str], float]:
    """A ready daemon, the sandbox posting webhooks to it, and the campaign pushed."""
    daemon = spawn_daemon(stack, account(stack), extra_env=SETTLE_ENV)
    await daemon.wait_ready()
    await configure_sandbox(stack, daemon.admin_port, **knobs)
    started = time.monotonic()
    return daemon, await start_campaign(stack, campaign_id, count), started


async def run_kills(stack: Stack, count: int, kills: int) -> Fate:
    fate = Fate("SIGKILL x daemon", kills, count)
    daemon, numbers, started = await start_scenario(stack, "chaos-kills", count)
    step = count // (kills + 2)
    for kill in range(kills):
        await wait_for_progress(stack, step * (kill + 1))
        await asyncio.sleep(random.uniform(0.0, 0.3))
        before = await doubts(stack, "chaos-kills")
        daemon.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(daemon.process.wait)
        stack.daemons.remove(daemon)
        await asyncio.sleep(2.0)
        daemon = spawn_daemon(stack, account(stack), daemon.admin_port, extra_env=SETTLE_ENV)
        await daemon.wait_ready()  # ready after the recovery put the dead run's sends in doubt
        fate.doubt_after_kill.append(max(0, await doubts(stack, "chaos-kills") - before))
    await wait_done(stack, "chaos-kills")
    fate.seconds = time.monotonic() - started
    await count_fate(stack, fate, "chaos-kills", numbers)
    return fate


async def run_restarts(stack: Stack, count: int, restarts: int) -> Fate:
    fate = Fate("PostgreSQL fast restart", restarts, count)
    daemon, numbers, started = await start_scenario(stack, "chaos-restarts", count)
    step = count // (restarts + 2)
    await stack.pool.close()  # the bench's own pool would hold the fast shutdown's clients
    for restart in range(restarts):
        await wait_for_progress(stack, step * (restart + 1))
        await asyncio.to_thread(fast_restart, stack)
    stack.pool = await reopen_pool(stack)
    await wait_done(stack, "chaos-restarts")
    fate.seconds = time.monotonic() - started
    await count_fate(stack, fate, "chaos-restarts", numbers)
    await daemon.stop()
    return fate


def fast_restart(stack: Stack) -> None:
    """Fast shutdown (SIGINT: sessions cut, in-flight transactions rolled back), then start."""
    process = stack.postgres.process
    assert process is not None
    process.send_signal(signal.SIGINT)
    process.wait(timeout=30)
    time.sleep(1.0)
    stack.postgres.start()


async def reopen_pool(stack: Stack) -> asyncpg.Pool:
    return await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2)


async def run_withheld(stack: Stack, count: int, share: float) -> Fate:
    fate = Fate(f"{share:.0%} answers withheld", round(count * share), count)
    daemon, numbers, started = await start_scenario(
        stack, "chaos-withheld", count, withhold_answer_p=share
    )
    await wait_done(stack, "chaos-withheld")
    fate.seconds = time.monotonic() - started
    await count_fate(stack, fate, "chaos-withheld", numbers)
    await daemon.stop()
    return fate


def render(fates: list[Fate]) -> Table:
    table = Table(title=f"The fate of every recipient under faults (concurrency {CONCURRENCY})")
    for column in (
        "fault",
        "faults",
        "recipients",
        "lost",
        "duplicates",
        "unflagged dup.",
        "in doubt at end",
        "stuck",
        "max doubt per kill",
        "seconds",
    ):
        table.add_column(column, justify="left" if column == "fault" else "right")
    for fate in fates:
        worst = str(max(fate.doubt_after_kill)) if fate.doubt_after_kill else "-"
        table.add_row(
            fate.scenario,
            str(fate.faults),
            f"{fate.recipients:,}",
            str(fate.lost),
            str(fate.duplicates),
            str(fate.unflagged_duplicates),
            str(fate.in_doubt),
            str(fate.stuck),
            f"{worst} (bound {DOUBT_BOUND})",
            f"{fate.seconds:.0f}",
        )
    return table


async def run_all(args: argparse.Namespace) -> list[Fate]:
    fates = []
    for scenario in args.scenarios:
        async with running_stack(fsync=False) as stack:
            try:
                fates.append(await run_scenario(stack, scenario, args))
            except RuntimeError:
                for daemon in stack.daemons:  # what the daemon saw, before the stack goes
                    print(daemon.log_path.read_text()[-4000:])
                raise
            Console(width=140).print(render(fates[-1:]))
    return fates


async def run_scenario(stack: Stack, scenario: str, args: argparse.Namespace) -> Fate:
    if scenario == "kills":
        return await run_kills(stack, args.recipients, args.kills)
    if scenario == "restarts":
        return await run_restarts(stack, args.recipients, args.restarts)
    return await run_withheld(stack, args.recipients, args.withheld)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=20_000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--restarts", type=int, default=20)
    parser.add_argument("--withheld", type=float, default=0.02)
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=("kills", "restarts", "withheld"),
        default=["kills", "restarts", "withheld"],
    )
    random.seed(7)
    fates = uvloop.run(run_all(parser.parse_args()))
    Console(width=140).print(render(fates))


if __name__ == "__main__":
    main()
