"""The shared pacer's promise and price in one table, and what an idle daemon costs.

    .venv/bin/python bench/pacing_cost.py [--rates 80 1000] [--daemons 1 3] [--seconds 10]
                                          [--idle-s 30] [--concurrency 100]

For each R and daemon count, fresh `blastd run` processes share one account (rate_per_s = R,
paced through Redis) and split a campaign of R * seconds recipients sent to the sandbox process
(its own rate limit off, latency 0), which stamps every request on arrival. From the arrivals:
achieved/R ((n - 1) / (last - first) over R; the promise is >= 0.98) and the most arrivals in
any one-second window (the promise is <= R). Next to them, the daemons' CPU (user + system)
and the Redis commands (INFO commandstats, scripts' own commands included), per message.

For each R too, the floor: a bare aiohttp loop in this process sending the same requests paced
at R (each at its deadline, in a task of its own, no ledger, no Redis), and its CPU per message.
A request that leaves alone costs several times what it costs among thousands a second.

Last, one daemon with nothing to do: its CPU seconds per minute of idling, from psutil.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

import psutil
import redis.asyncio as aioredis
import throughput
import uvloop
from rich.console import Console
from rich.table import Table
from stack import (
    Stack,
    account_settings,
    cpu_s,
    phone_numbers,
    push_job,
    push_recipients,
    recipients_key,
    running_stack,
    start_daemons,
    wait_until_done,
)
from windows import max_in_window

PROMISED_SHARE = 0.98
SETTLE_S = 1.0  # start-up work (migrations, first polls) stays out of the samples


@dataclass(frozen=True, slots=True)
class PacedRun:
    rate_per_s: int
    daemons: int
    arrivals_s: list[float]  # sandbox monotonic clock, sorted
    cpu_s: float
    redis_commands: int

    @property
    def share(self) -> float:
        span_s = self.arrivals_s[-1] - self.arrivals_s[0]
        return (len(self.arrivals_s) - 1) / span_s / self.rate_per_s


async def redis_commands(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(entry["calls"]) for entry in stats.values())


async def run_paced(
    stack: Stack, rate_per_s: int, daemons: int, args: argparse.Namespace
) -> PacedRun:
    await stack.sandbox_post("reset", {})
    account = account_settings(
        stack.sandbox_url, rate_per_s=rate_per_s, concurrency=args.concurrency
    )
    started = await start_daemons(stack, account, daemons)
    processes = [psutil.Process(daemon.pid) for daemon in started]
    campaign_id = f"paced-{rate_per_s}-{daemons}"
    await push_recipients(
        stack.redis, recipients_key(campaign_id), phone_numbers(int(rate_per_s * args.seconds))
    )
    await asyncio.sleep(SETTLE_S)
    cpu_before, commands_before = cpu_s(*processes), await redis_commands(stack.redis)
    await push_job(stack.redis, campaign_id)
    await wait_until_done(stack.pool, campaign_id, timeout_s=args.seconds * 4 + 60, poll_s=0.1)
    cpu_used = cpu_s(*processes) - cpu_before
    # The two INFO calls and the bench's own polls are a handful of commands in thousands.
    commands = await redis_commands(stack.redis) - commands_before
    for daemon in started:
        await daemon.stop()
        stack.daemons.remove(daemon)
    arrivals_s = sorted(await stack.sandbox_get("arrivals"))
    return PacedRun(rate_per_s, daemons, arrivals_s, cpu_used, commands)


async def bare_paced_ms(stack: Stack, rate_per_s: int, seconds: float) -> float:
    """CPU ms per message of the bare loop paced at rate_per_s, in this process."""
    bodies = throughput.request_bodies(phone_numbers(int(rate_per_s * seconds)))
    run = await throughput.run_in_process(
        stack,
        "bare paced",
        len(bodies),
        lambda url: throughput.send_bare_paced(url, bodies, rate_per_s),
    )
    return run.cpu_us_per_message(run.sender_cpu_s) / 1000


async def idle_cpu_s_per_min(stack: Stack, idle_s: float) -> float:
    """One daemon, no campaign: CPU seconds it uses per minute of waiting for work."""
    account = account_settings(stack.sandbox_url, rate_per_s=80, concurrency=10)
    [daemon] = await start_daemons(stack, account, 1)
    process = psutil.Process(daemon.pid)
    await asyncio.sleep(SETTLE_S * 3)
    before = cpu_s(process)
    await asyncio.sleep(idle_s)
    used = cpu_s(process) - before
    await daemon.stop()
    stack.daemons.remove(daemon)
    return used / idle_s * 60


@dataclass(frozen=True, slots=True)
class PacingCosts:
    runs: list[PacedRun]
    bare_ms: dict[int, float]  # R: the bare loop's CPU ms per message paced at R
    idle_s_per_min: float


async def run_all(args: argparse.Namespace) -> PacingCosts:
    async with running_stack() as stack:
        await stack.sandbox_post("config", {"rate_per_s": 0, "latency_ms": 0, "webhook_url": None})
        runs = [
            await run_paced(stack, rate, daemons, args)
            for rate in args.rates
            for daemons in args.daemons
        ]
        bare_ms = {rate: await bare_paced_ms(stack, rate, args.seconds) for rate in args.rates}
        return PacingCosts(runs, bare_ms, await idle_cpu_s_per_min(stack, args.idle_s))


def render(costs: PacingCosts, idle_s: float) -> Table:
    table = Table(
        title="shared pacer, arrivals stamped by the sandbox; per message unless said",
        caption=f"idle daemon: {costs.idle_s_per_min:.3f} CPU s/min (over {idle_s:g} s)",
    )
    columns = (
        "R",
        "daemons",
        "arrivals",
        "achieved/R",
        "max in 1 s",
        "CPU ms",
        "bare loop CPU ms",
        "redis cmds",
    )
    for column in (*columns, "promise"):
        table.add_column(column, justify="right")
    for run in costs.runs:
        in_1_s = max_in_window(run.arrivals_s, 1.0)
        n = len(run.arrivals_s)
        holds = run.share >= PROMISED_SHARE and in_1_s <= run.rate_per_s
        table.add_row(
            str(run.rate_per_s),
            str(run.daemons),
            f"{n:,}",
            f"{run.share:.4f}",
            str(in_1_s),
            f"{run.cpu_s * 1000 / n:.3f}",
            f"{costs.bare_ms[run.rate_per_s]:.3f}",
            f"{run.redis_commands / n:.2f}",
            "holds" if holds else "missed",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[80, 1000], help="R per run")
    parser.add_argument("--daemons", type=int, nargs="+", default=[1, 3], help="daemon counts")
    parser.add_argument("--seconds", type=float, default=10.0, help="sending time per run")
    parser.add_argument("--idle-s", type=float, default=30.0, help="idle sample length")
    parser.add_argument("--concurrency", type=int, default=100, help="account concurrency")
    args = parser.parse_args()
    Console(width=120).print(render(uvloop.run(run_all(args)), args.idle_s))


if __name__ == "__main__":
    main()
