"""Peak memory of a `blastd run` process over one large campaign.

    .venv/bin/python bench/memory.py [--recipients 100000 [1000000 ...]] [--concurrency 64]

The promise: a 100,000-recipient campaign runs in bounded memory (recipients streamed, not
held). The recipients list and the job are pushed to a daemon with its account at rate 0
(unlimited), and the daemon's RSS is sampled every 50 ms from its start until the ledger shows
the campaign 'done'. Printed: RSS once ready (the baseline), the peak, their difference, and
the time from the job's LPUSH until done. Several sizes run one after the other on the same
servers, each with a fresh daemon; the last line compares the largest campaign's peak with the
smallest's (issue goal: 1M within 1.5 times 100k). Bounded memory means it stays flat.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from dataclasses import dataclass

import psutil
import uvloop
from rich.console import Console
from rich.table import Table
from stack import (
    Stack,
    account_settings,
    phone_numbers,
    push_job,
    push_recipients,
    recipient_states,
    recipients_key,
    running_stack,
    spawn_daemon,
    wait_until_done,
)

SAMPLE_INTERVAL_S = 0.05
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class MemoryRun:
    recipients: int
    ready_rss: int
    peak_rss: int
    intake_s: float
    total_s: float
    ledger_sent: int
    samples: int


class RssSampler:
    """Samples one process's RSS every SAMPLE_INTERVAL_S while running."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.peak = 0
        self.samples = 0

    def sample(self) -> int:
        rss: int = self._process.memory_info().rss
        self.peak = max(self.peak, rss)
        self.samples += 1
        return rss

    async def run(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            while True:
                self.sample()
                await asyncio.sleep(SAMPLE_INTERVAL_S)


PEAK_RATIO_GOAL = 1.5


async def measure(stack: Stack, recipients: int, concurrency: int) -> MemoryRun:
    campaign_id = f"memory-{recipients}"
    numbers = phone_numbers(recipients)
    account = account_settings(stack.sandbox_url, rate_per_s=0, concurrency=concurrency)
    daemon = spawn_daemon(stack, account)
    sampler = RssSampler(daemon.pid)
    async with asyncio.TaskGroup() as group:
        sampling = group.create_task(sampler.run())
        await daemon.wait_ready()
        ready_rss = sampler.sample()
        await push_recipients(stack.redis, recipients_key(campaign_id), numbers)
        pushed_at = await push_job(stack.redis, campaign_id)
        times = await wait_until_done(stack.pool, campaign_id, timeout_s=3600)
        sampler.sample()
        sampling.cancel()
    exit_code = await daemon.stop()
    if exit_code != 0:
        raise RuntimeError(f"blastd exited with {exit_code}; see {daemon.log_path}")
    states = await recipient_states(stack.pool, campaign_id)
    return MemoryRun(
        recipients,
        ready_rss,
        sampler.peak,
        times.created_at - pushed_at,
        times.done_at - pushed_at,
        states.get("sent", 0),
        sampler.samples,
    )


async def run(sizes: list[int], concurrency: int) -> list[MemoryRun]:
    async with running_stack() as stack:
        await stack.sandbox_post("config", {"latency_ms": 0, "webhook_url": None})
        return [await measure(stack, recipients, concurrency) for recipients in sizes]


def render(results: list[MemoryRun]) -> Table:
    table = Table(title=f"blastd run RSS, sampled every {SAMPLE_INTERVAL_S * 1000:.0f} ms")
    columns = (
        "recipients",
        "ledger sent",
        "RSS ready",
        "RSS peak",
        "peak - ready",
        "intake s",
        "total s",
        "msgs/s",
        "samples",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for result in results:
        table.add_row(
            f"{result.recipients:,}",
            f"{result.ledger_sent:,}",
            f"{result.ready_rss / MIB:.1f} MiB",
            f"{result.peak_rss / MIB:.1f} MiB",
            f"{(result.peak_rss - result.ready_rss) / MIB:.1f} MiB",
            f"{result.intake_s:.2f}",
            f"{result.total_s:.2f}",
            f"{result.recipients / result.total_s:,.0f}",
            str(result.samples),
        )
    return table


def peak_ratio(results: list[MemoryRun]) -> str:
    smallest = min(results, key=lambda r: r.recipients)
    largest = max(results, key=lambda r: r.recipients)
    ratio = largest.peak_rss / smallest.peak_rss
    verdict = "meets" if ratio <= PEAK_RATIO_GOAL else "misses"
    return (
        f"peak RSS at {largest.recipients:,} is {ratio:.2f} times the peak at "
        f"{smallest.recipients:,} ({verdict} the goal of {PEAK_RATIO_GOAL})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recipients", type=int, nargs="+", default=[100_000], help="campaign sizes, in order"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="account concurrency")
    args = parser.parse_args()
    started = time.monotonic()
    results = uvloop.run(run(args.recipients, args.concurrency))
    console = Console(width=120)
    console.print(render(results))
    if len(results) > 1:
        console.print(peak_ratio(results))
    console.print(f"whole benchmark, servers included: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
