"""What one campaign costs Redis and PostgreSQL per message, and one daemon's CPU per message.

    .venv/bin/python bench/backend_cost.py [--recipients 20000] [--concurrency 64]
                                           [--latency-ms 50] [--rates 0 1000]

For each account rate (0: unlimited, paced locally with no Redis round trip; >0: paced through
Redis by the shared pacer, as every daemon sharing a number is), one `blastd run` sends a
text blast to the sandbox at the given answer latency. Read before and after the campaign:

- Redis: INFO commandstats (calls and server microseconds per command) and the server's CPU;
- PostgreSQL: pg_stat_database (commits, rows written and read), the WAL written
  (pg_current_wal_lsn), and the CPU of the postmaster and its backends;
- the daemon: its CPU (user + system).

Everything divides by the messages sent. All the processes share this machine's two cores,
so the figures are costs, not capacities; docs/scaling.md turns them into capacities.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True, slots=True)
class Sample:
    redis_calls: dict[str, tuple[int, int]]  # command -> (calls, usec)
    redis_cpu_s: float
    pg: dict[str, int]
    pg_cpu_s: float
    daemon_cpu_s: float


@dataclass(frozen=True, slots=True)
class Cost:
    rate_per_s: float
    messages: int
    seconds: float
    redis_calls: int
    redis_usec: int
    redis_cpu_s: float
    top_commands: str
    pg: dict[str, int]
    pg_cpu_s: float
    daemon_cpu_s: float


async def sample(stack: Stack, daemon_pid: int) -> Sample:
    stats = await stack.redis.info("commandstats")
    calls = {name: (int(v["calls"]), int(v["usec"])) for name, v in stats.items()}
    server = await stack.redis.info("server")
    row = await stack.pool.fetchrow(
        "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted, tup_fetched,"
        " pg_current_wal_lsn() - '0/0'::pg_lsn AS wal_bytes"
        " FROM pg_stat_database WHERE datname = current_database()"
    )
    return Sample(
        calls,
        cpu_s(psutil.Process(int(server["process_id"]))),
        {key: int(value) for key, value in dict(row).items()},
        postgres_cpu_s(stack.root),
        cpu_s(psutil.Process(daemon_pid)),
    )


def difference(before: Sample, after: Sample) -> tuple[dict[str, tuple[int, int]], Any]:
    calls = {}
    for name, (count, usec) in after.redis_calls.items():
        old_count, old_usec = before.redis_calls.get(name, (0, 0))
        if count > old_count:
            calls[name.removeprefix("cmdstat_")] = (count - old_count, usec - old_usec)
    pg = {key: after.pg[key] - before.pg[key] for key in after.pg}
    return calls, pg


async def run_one(stack: Stack, rate_per_s: float, recipients: int, concurrency: int) -> Cost:
    account = account_settings(stack.sandbox_url, rate_per_s=rate_per_s, concurrency=concurrency)
    daemon = await start_daemon(stack, account)
    campaign = f"cost-{rate_per_s:g}"
    await push_recipients(stack.redis, recipients_key(campaign), phone_numbers(recipients))
    await asyncio.sleep(1)  # let start-up work settle out of the sample
    before = await sample(stack, daemon.pid)
    pushed_at = await push_job(stack.redis, campaign)
    times = await wait_until_done(stack.pool, campaign, timeout_s=600, poll_s=0.2)
    after = await sample(stack, daemon.pid)
    await daemon.stop()
    stack.daemons.remove(daemon)
    await stack.sandbox_post("reset", {})
    calls, pg = difference(before, after)
    top = sorted(calls.items(), key=lambda item: -item[1][0])[:4]
    return Cost(
        rate_per_s,
        recipients,
        times.done_at - pushed_at,
        sum(c for c, _ in calls.values()),
        sum(u for _, u in calls.values()),
        after.redis_cpu_s - before.redis_cpu_s,
        ", ".join(f"{name} {count / recipients:.3f}" for name, (count, _) in top),
        pg,
        after.pg_cpu_s - before.pg_cpu_s,
        after.daemon_cpu_s - before.daemon_cpu_s,
    )


async def run_all(args: argparse.Namespace) -> list[Cost]:
    costs = []
    async with running_stack() as stack:
        await stack.sandbox_post("config", {"latency_ms": args.latency_ms, "webhook_url": None})
        for rate in args.rates:
            costs.append(await run_one(stack, rate, args.recipients, args.concurrency))
    return costs


def render(costs: list[Cost], args: argparse.Namespace) -> Table:
    table = Table(
        title=f"{args.recipients:,} recipients, concurrency {args.concurrency}, "
        f"sandbox latency {args.latency_ms:g} ms; per message unless said"
    )
    for column in (
        "rate/s",
        "msgs/s",
        "daemon CPU ms",
        "redis cmds",
        "redis server µs",
        "redis CPU µs",
        "busiest commands",
        "pg commits",
        "pg rows written",
        "pg WAL bytes",
        "pg CPU µs",
    ):
        table.add_column(column)
    for cost in costs:
        n = cost.messages
        written = cost.pg["tup_inserted"] + cost.pg["tup_updated"] + cost.pg["tup_deleted"]
        table.add_row(
            "unlimited" if not cost.rate_per_s else f"{cost.rate_per_s:g}",
            f"{n / cost.seconds:,.0f}",
            f"{cost.daemon_cpu_s * 1000 / n:.3f}",
            f"{cost.redis_calls / n:.3f}",
            f"{cost.redis_usec / n:.2f}",
            f"{cost.redis_cpu_s * 1e6 / n:.1f}",
            cost.top_commands,
            f"{cost.pg['xact_commit'] / n:.3f}",
            f"{written / n:.2f}",
            f"{cost.pg['wal_bytes'] / n:,.0f}",
            f"{cost.pg_cpu_s * 1e6 / n:.0f}",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipients", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 1000.0])
    args = parser.parse_args()
    costs = uvloop.run(run_all(args))
    Console(width=200).print(render(costs, args))


if __name__ == "__main__":
    main()
