"""Pacer against aiolimiter's token buckets, on a real clock under uvloop.

    .venv/bin/python bench/rate_pacer.py [--seconds 10] [--consumers 50]

For each rate, each limiter is run in turn: `consumers` tasks loop on acquire() for
`seconds`, and every release is stamped with time.perf_counter(), a clock the limiters do
not read. The table shows the achieved rate, the most releases any sliding window of 1 s
and of 100 ms held (the promise: at least 0.98 R, and never more than R in 1 s), and the
CPU the run cost as a share of its wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import uvloop
from aiolimiter import AsyncLimiter
from rich.console import Console
from rich.table import Table
from windows import max_in_window

from blastd.pacing import Pacer

RATES_PER_S = (80, 1000)

Acquire = Callable[[], Awaitable[object]]

# Built by name inside the running loop, as the daemon builds its limiters.
LIMITERS: dict[str, Callable[[float], Acquire]] = {
    "Pacer(R)": lambda rate: Pacer(rate).acquire,
    "AsyncLimiter(R, 1), obvious": lambda rate: AsyncLimiter(rate, 1).acquire,
    "AsyncLimiter(1, 1/R), tiny bucket": lambda rate: AsyncLimiter(1, 1 / rate).acquire,
}


@dataclass(frozen=True, slots=True)
class Run:
    limiter: str
    rate_per_s: int
    releases_s: list[float]  # since the start of the run, sorted
    cpu_s: float


async def record_releases(acquire: Acquire, seconds: float, consumers: int) -> list[float]:
    """Loop `consumers` tasks on acquire() for `seconds`; return release times since start."""
    stamps: list[float] = []

    async def consume() -> None:
        while True:
            await acquire()
            stamps.append(time.perf_counter())

    started = time.perf_counter()
    async with asyncio.TaskGroup() as consumers_group:
        tasks = [consumers_group.create_task(consume()) for _ in range(consumers)]
        await asyncio.sleep(seconds)
        for task in tasks:
            task.cancel()
    return [stamp - started for stamp in stamps if stamp - started < seconds]


async def run_all(seconds: float, consumers: int) -> list[Run]:
    runs = []
    for rate_per_s in RATES_PER_S:
        for name, build in LIMITERS.items():
            cpu_started = time.process_time()
            releases_s = await record_releases(build(rate_per_s), seconds, consumers)
            cpu_s = time.process_time() - cpu_started
            runs.append(Run(name, rate_per_s, releases_s, cpu_s))
    return runs


def render(runs: list[Run], seconds: float) -> Table:
    table = Table(title=f"{seconds:g} s per run, real clock, uvloop")
    for column in ("limiter", "R", "achieved/R", "max in 1 s", "max in 100 ms", "CPU"):
        table.add_column(column, justify="left" if column == "limiter" else "right", no_wrap=True)
    for run in runs:
        table.add_row(
            run.limiter,
            str(run.rate_per_s),
            f"{len(run.releases_s) / (run.rate_per_s * seconds):.4f}",
            str(max_in_window(run.releases_s, 1.0)),
            str(max_in_window(run.releases_s, 0.1)),
            f"{run.cpu_s / seconds:.1%}",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--consumers", type=int, default=50, help="tasks looping on acquire()")
    args = parser.parse_args()
    runs = uvloop.run(run_all(args.seconds, args.consumers))
    Console(width=120).print(render(runs, args.seconds))


if __name__ == "__main__":
    main()
