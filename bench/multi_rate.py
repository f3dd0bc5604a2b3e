"""Achieved rate and the busiest windows of several daemons sharing one account.

    .venv/bin/python bench/multi_rate.py [--rates 80 1000] [--daemons 1 3] [--seconds 15]
                                         [--concurrency 100]

The promise: with several daemons sharing an account at rate R, achieved rate >= 0.98 R and no
one-second window above R, for their sum. For each R and each daemon count, fresh `blastd run`
processes (their own instance ids) share Redis, PostgreSQL and the account (rate_per_s = R,
paced by the shared pacer in Redis) and split one campaign of R * seconds recipients. The
sandbox process (its own rate limit off, latency 0) stamps each accepted request on arrival,
whichever daemon sent it. From those arrivals, as in bench/rate.py:

- achieved/R: (n - 1) / (last - first) over R;
- max in 1 s / max in 100 ms: the most arrivals any sliding window of that width holds;
- split: recipients each daemon sent (its `campaign_batch_sent` log lines);
- daemon CPU us/msg: the daemons' CPU time (user + system), summed, per recipient.

For comparison, each R also runs one daemon with the account's shared_rate off (the local
Pacer, no Redis round trip).

A last table measures one acquire() in this process, against the stack's Redis: the CPU a
daemon spends on the shared limiter per request, next to the local Pacer's.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import orjson
import psutil
import redis.asyncio as aioredis
import uvloop
from rich.console import Console
from rich.table import Table
from stack import (
    Daemon,
    Stack,
    account_settings,
    cpu_s,
    phone_numbers,
    push_job,
    push_recipients,
    recipient_states,
    recipients_key,
    running_stack,
    start_daemons,
    wait_until_done,
)
from windows import max_in_window

from blastd.pacing import Pacer
from blastd.shared_pacing import SharedPacer

P = ParamSpec("P")
T = TypeVar("T")

PROMISED_SHARE = 0.98
ACQUIRES = 5_000  # per pacer in the cost table
COST_RATE_PER_S = 1000  # leases of five slots, as a daemon at R = 1000 takes them


@dataclass(frozen=True, slots=True)
class MultiRun:
    rate_per_s: int
    daemons: int
    is_shared: bool
    arrivals_s: list[float]  # sandbox monotonic clock, sorted
    ledger_sent: int
    split: list[int]
    cpu_s: float

    @property
    def achieved_per_s(self) -> float:
        span_s = self.arrivals_s[-1] - self.arrivals_s[0]
        return (len(self.arrivals_s) - 1) / span_s

    @property
    def share(self) -> float:
        return self.achieved_per_s / self.rate_per_s


async def run_shared(
    stack: Stack,
    campaign_id: str,
    rate_per_s: int,
    daemons: int,
    args: argparse.Namespace,
    *,
    is_shared: bool = True,
) -> MultiRun:
    """`daemons` processes at rate R on one account, R * seconds recipients, then the arrivals."""
    await stack.sandbox_post("reset", {})
    account = account_settings(
        stack.sandbox_url, rate_per_s=rate_per_s, concurrency=args.concurrency
    )
    account["shared_rate"] = is_shared
    started = await start_daemons(stack, account, daemons)
    processes = [psutil.Process(daemon.pid) for daemon in started]
    cpu_at_start_s = cpu_s(*processes)  # start-up (imports, migrations) is not sending
    numbers = phone_numbers(int(rate_per_s * args.seconds))
    await push_recipients(stack.redis, recipients_key(campaign_id), numbers)
    await push_job(stack.redis, campaign_id)
    await wait_until_done(stack.pool, campaign_id, timeout_s=args.seconds * 4 + 60)
    sending_cpu_s = cpu_s(*processes) - cpu_at_start_s
    for daemon in started:
        exit_code = await daemon.stop()
        if exit_code != 0:
            raise RuntimeError(f"blastd exited with {exit_code}; see {daemon.log_path}")
    arrivals_s = sorted(await stack.sandbox_get("arrivals"))
    states = await recipient_states(stack.pool, campaign_id)
    split = [_sent_by(daemon, campaign_id) for daemon in started]
    sent = states.get("sent", 0)
    return MultiRun(rate_per_s, daemons, is_shared, arrivals_s, sent, split, sending_cpu_s)


def _sent_by(daemon: Daemon, campaign_id: str) -> int:
    """Recipients this daemon sent, from its `campaign_batch_sent` lines for the campaign."""
    sent = 0
    for line in daemon.log_path.read_bytes().splitlines():
        if not line.startswith(b"{"):
            continue
        entry = orjson.loads(line)
        if entry.get("event") == "campaign_batch_sent" and entry["campaign_id"] == campaign_id:
            sent += entry["counts"].get("sent", 0)
    return sent


async def call_directly(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    return await fn(*args, **kwargs)


async def acquire_cost_us(acquire: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    """CPU and wall microseconds per acquire() in this process."""
    for _ in range(200):  # warm up the connection and the script cache
        await acquire()
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    for _ in range(ACQUIRES):
        await acquire()
    cpu_us = (time.process_time() - cpu_started) / ACQUIRES * 1e6
    return cpu_us, (time.perf_counter() - wall_started) / ACQUIRES * 1e6


async def measure_costs(stack: Stack) -> dict[str, tuple[float, float]]:
    client = aioredis.Redis.from_url(stack.redis_url)
    try:
        shared = SharedPacer(
            client,
            call_directly,
            prefix="bench-cost:",
            account="cost",
            rate_per_s=COST_RATE_PER_S,
        )
        return {
            "Pacer (local)": await acquire_cost_us(Pacer(COST_RATE_PER_S).acquire),
            "SharedPacer (Redis)": await acquire_cost_us(shared.acquire),
        }
    finally:
        await client.aclose()


async def run_all(
    args: argparse.Namespace,
) -> tuple[list[MultiRun], dict[str, tuple[float, float]]]:
    async with running_stack() as stack:
        await stack.sandbox_post("config", {"rate_per_s": 0, "latency_ms": 0, "webhook_url": None})
        runs = []
        for rate in args.rates:
            for daemons in args.daemons:
                campaign_id = f"multi-{rate}-{daemons}"
                runs.append(await run_shared(stack, campaign_id, rate, daemons, args))
            campaign_id = f"multi-{rate}-local"
            runs.append(await run_shared(stack, campaign_id, rate, 1, args, is_shared=False))
        return runs, await measure_costs(stack)


COLUMNS = (
    "R",
    "daemons",
    "pacer",
    "arrivals",
    "ledger sent",
    "split",
    "seconds",
    "achieved/s",
    "achieved/R",
    "max in 1 s",
    "max in 100 ms",
    "daemon CPU us/msg",
    "promise",
)


def render_runs(runs: list[MultiRun]) -> Table:
    table = Table(title="N x blastd run -> sandbox process; one account shared through Redis")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for run in runs:
        in_1_s = max_in_window(run.arrivals_s, 1.0)
        holds = run.share >= PROMISED_SHARE and in_1_s <= run.rate_per_s
        table.add_row(
            str(run.rate_per_s),
            str(run.daemons),
            "shared" if run.is_shared else "local",
            f"{len(run.arrivals_s):,}",
            f"{run.ledger_sent:,}",
            "/".join(str(sent) for sent in run.split),
            f"{run.arrivals_s[-1] - run.arrivals_s[0]:.2f}",
            f"{run.achieved_per_s:.1f}",
            f"{run.share:.4f}",
            str(in_1_s),
            str(max_in_window(run.arrivals_s, 0.1)),
            f"{run.cpu_s / run.ledger_sent * 1e6:.0f}",
            "holds" if holds else "missed",
        )
    return table


def render_costs(costs: dict[str, tuple[float, float]]) -> Table:
    title = f"one acquire() at R = {COST_RATE_PER_S}, {ACQUIRES:,} in a row, in this process"
    table = Table(title=title)
    for column in ("pacer", "CPU us", "wall us"):
        table.add_column(column, justify="right")
    for name, (cpu_us, wall_us) in costs.items():
        table.add_row(name, f"{cpu_us:.0f}", f"{wall_us:.0f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[80, 1000], help="R per run")
    parser.add_argument("--daemons", type=int, nargs="+", default=[1, 3], help="daemon counts")
    parser.add_argument("--seconds", type=float, default=15.0, help="sending time per run")
    parser.add_argument("--concurrency", type=int, default=100, help="account concurrency")
    args = parser.parse_args()
    runs, costs = uvloop.run(run_all(args))
    console = Console(width=170)
    console.print(render_runs(runs))
    console.print(render_costs(costs))


if __name__ == "__main__":
    main()
