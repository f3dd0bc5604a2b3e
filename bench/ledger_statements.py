"""What the ledger costs PostgreSQL per message, statement by statement, in one campaign.

    .venv/bin/python bench/ledger_statements.py [--recipients 100000] [--concurrency 64]
                                                [--top 12]

PostgreSQL runs with pg_stat_statements. One `blastd run` sends a campaign of `recipients`
to the sandbox (no latency, no rate limit), as bench/throughput.py does; the statistics are
reset when the job is pushed, so they hold its intake, claims, outcome writes and progress
counts (and this script's own polling of the campaign's state). Printed per message: each
statement's execution time (wall time inside PostgreSQL, so it grows when the machine is
loaded), its calls and rows; and the CPU of PostgreSQL (its postmaster and backends), the
daemon and the sandbox over the campaign.

Run it on a new database at a size where the table grows during the campaign (100,000):
plans made while the table still looked small showed here first, as statements whose time
per message grew with the campaign.
"""

from __future__ import annotations

import argparse

import psutil
import uvloop
from rich.console import Console
from rich.table import Table
from stack import (
    Stack,
    account_settings,
    cpu_s,
    phone_numbers,
    postgres_cpu_s,
    push_job,
    push_recipients,
    recipients_key,
    running_stack,
    start_daemon,
    wait_until_done,
)

PROFILED = ("shared_preload_libraries=pg_stat_statements", "pg_stat_statements.track=all")
CAMPAIGN = "ledger-statements"


async def statements(stack: Stack, top: int) -> list[tuple[float, int, int, str]]:
    """(total ms, calls, rows, query) of the costliest statements since the reset."""
    rows = await stack.pool.fetch(
        "SELECT total_exec_time, calls, rows, query FROM pg_stat_statements "
        "WHERE query NOT LIKE '%pg_stat_statements%' ORDER BY total_exec_time DESC LIMIT $1",
        top,
    )
    return [
        (r["total_exec_time"], r["calls"], r["rows"], " ".join(r["query"].split())) for r in rows
    ]


async def run(recipients: int, concurrency: int, top: int) -> None:
    numbers = phone_numbers(recipients)
    async with running_stack(postgres_settings=PROFILED) as stack:
        await stack.pool.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        account = account_settings(stack.sandbox_url, rate_per_s=0, concurrency=concurrency)
        daemon = await start_daemon(stack, account)
        await stack.sandbox_post("config", {"latency_ms": 0, "webhook_url": None})
        await push_recipients(stack.redis, recipients_key(CAMPAIGN), numbers)
        processes = {
            "blastd run": psutil.Process(daemon.pid),
            "sandbox": psutil.Process(stack.sandbox_pid),
        }
        before = {name: cpu_s(p) for name, p in processes.items()}
        postgres_before = postgres_cpu_s(stack.root)
        await stack.pool.execute("SELECT pg_stat_statements_reset()")
        pushed_at = await push_job(stack.redis, CAMPAIGN)
        times = await wait_until_done(stack.pool, CAMPAIGN, timeout_s=1800)
        cpu = {name: (cpu_s(p) - before[name]) for name, p in processes.items()}
        cpu["PostgreSQL (postmaster and backends)"] = postgres_cpu_s(stack.root) - postgres_before
        costliest = await statements(stack, top)
        await daemon.stop()
    seconds = times.done_at - pushed_at
    console = Console(width=160)
    console.print(_statements_table(costliest, recipients, seconds))
    for name, cpu_used in cpu.items():
        console.print(f"{name}: {cpu_used / recipients * 1e6:,.0f} us of CPU per message")


def _statements_table(
    costliest: list[tuple[float, int, int, str]], recipients: int, seconds: float
) -> Table:
    title = (
        f"ledger statements, {recipients:,} recipients at 0 ms "
        f"({recipients / seconds:,.0f} msg/s, intake to done)"
    )
    table = Table(title=title)
    for column in ("us/msg", "calls", "rows", "statement"):
        table.add_column(column, justify="left" if column == "statement" else "right")
    for total_ms, calls, rows, query in costliest:
        table.add_row(f"{total_ms / recipients * 1000:.1f}", f"{calls:,}", f"{rows:,}", query[:100])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=100_000, help="campaign size")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--top", type=int, default=12, help="statements shown")
    args = parser.parse_args()
    uvloop.run(run(args.recipients, args.concurrency, args.top))


if __name__ == "__main__":
    main()
