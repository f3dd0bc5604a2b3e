"""Time from a job's LPUSH to its first send, and to the end of its intake, by campaign size.

    .venv/bin/python bench/first_send.py [--recipients 20000 100000 1000000] [--rate 50]
        [--env BLASTD_PROGRESS_INTERVAL_S=3600 ...]

For each size a fresh daemon takes a recipients_key job; the account is paced (`--rate`
messages a second), so the sandbox's arrivals stay few while the campaign is taken in. Printed:
the time from the LPUSH to the first request the sandbox stamped (its arrivals use the same
monotonic clock as this process), and to the end of the intake: when the ledger marks the
campaign's intake complete, or, for a daemon that commits a campaign whole, when its row
appears. The daemon is stopped (a drain) once both are known, and the campaign paused in the
ledger: it is not sent out, and the next size's daemon does not send it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass

import asyncpg
import uvloop
from rich.console import Console
from rich.table import Table
from stack import (
    Stack,
    account_settings,
    phone_numbers,
    push_job,
    push_recipients,
    recipients_key,
    running_stack,
    spawn_daemon,
)

POLL_S = 0.005
TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class FirstSend:
    recipients: int
    first_send_s: float
    intake_s: float


async def _has_intake_column(pool: asyncpg.Pool) -> bool:
    """Whether this ledger records the intake's end apart from the campaign row."""
    return bool(
        await pool.fetchval(
            "SELECT 1 FROM information_schema.columns "
            "WHERE table_name = 'campaigns' AND column_name = 'intake_complete'"
        )
    )


async def _intake_end(pool: asyncpg.Pool, campaign_id: str, pushed_at: float) -> float:
    column = await _has_intake_column(pool)
    query = (
        "SELECT intake_complete FROM campaigns WHERE id = $1"
        if column
        else "SELECT true FROM campaigns WHERE id = $1"
    )
    while time.monotonic() - pushed_at < TIMEOUT_S:
        if await pool.fetchval(query, campaign_id):
            return time.monotonic() - pushed_at
        await asyncio.sleep(POLL_S)
    raise RuntimeError(f"intake of {campaign_id} not over within {TIMEOUT_S} s")


async def _first_arrival(stack: Stack, pushed_at: float) -> float:
    while time.monotonic() - pushed_at < TIMEOUT_S:
        arrivals: list[float] = await stack.sandbox_get("arrivals")
        ours = [at for at in arrivals if at >= pushed_at]  # a reset keeps earlier arrivals
        if ours:
            return min(ours) - pushed_at
        await asyncio.sleep(POLL_S)
    raise RuntimeError(f"no send within {TIMEOUT_S} s")


async def measure(stack: Stack, recipients: int, rate: float, env: dict[str, str]) -> FirstSend:
    campaign_id = f"first-send-{recipients}"
    account = account_settings(stack.sandbox_url, rate_per_s=rate, concurrency=4)
    daemon = spawn_daemon(stack, account, extra_env=env)
    await daemon.wait_ready()
    await push_recipients(stack.redis, recipients_key(campaign_id), phone_numbers(recipients))
    pushed_at = await push_job(stack.redis, campaign_id)
    first_send_s, intake_s = await asyncio.gather(
        _first_arrival(stack, pushed_at), _intake_end(stack.pool, campaign_id, pushed_at)
    )
    exit_code = await daemon.stop()
    stack.daemons.remove(daemon)
    # Out of the way of the next size: its daemon would otherwise send this one's recipients.
    await stack.pool.execute("UPDATE campaigns SET state = 'paused' WHERE id = $1", campaign_id)
    if exit_code != 0:
        raise RuntimeError(f"blastd exited with {exit_code}; see {daemon.log_path}")
    return FirstSend(recipients, first_send_s, intake_s)


async def run(sizes: list[int], rate: float, env: dict[str, str]) -> list[FirstSend]:
    async with running_stack() as stack:
        await stack.sandbox_post("config", {"latency_ms": 0, "webhook_url": None})
        return [await measure(stack, recipients, rate, env) for recipients in sizes]


def render(results: list[FirstSend]) -> Table:
    table = Table(title="from the job's LPUSH")
    for column in ("recipients", "first send s", "intake over s"):
        table.add_column(column, justify="right")
    for result in results:
        table.add_row(
            f"{result.recipients:,}", f"{result.first_send_s:.3f}", f"{result.intake_s:.2f}"
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recipients",
        type=int,
        nargs="+",
        default=[20_000, 100_000, 1_000_000],
        help="campaign sizes, in order",
    )
    parser.add_argument("--rate", type=float, default=50.0, help="account messages per second")
    parser.add_argument(
        "--env", nargs="*", default=[], metavar="NAME=VALUE", help="more BLASTD_* for the daemon"
    )
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    Console(width=120).print(render(uvloop.run(run(args.recipients, args.rate, env))))


if __name__ == "__main__":
    main()
