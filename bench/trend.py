"""Every performance figure beside its goal, in one table from one run: `make bench`.

    .venv/bin/python bench/trend.py [--rounds 3] [--sizes 20000 100000 1000000]

Runs, one after the other on this machine, the benchmarks that hold blastd's performance
promises, at sizes that keep the whole run to about 8 minutes, and prints one table a
later change can be set beside:

- bench/throughput.py at 0 and 50 ms provider latency (20,000 recipients, concurrency 64):
  blastd and the chunked loop as a share of a bare aiohttp loop, and the whole machine's CPU
  per message at 0 ms, blastd's beside the bare loop's; once more at 0 ms with 100,000
  recipients, where the ledger's table grows under the statements that send.
- bench/pacing_cost.py: the daemon's CPU per message paced at 80/s and 1,000/s (against the
  same daemon unpaced, from the 50 ms throughput run, and a bare aiohttp loop paced at the
  same rate in the same run), an idle daemon's CPU per minute, and
  the shared pacer's achieved rate and busiest second at the sandbox, for one and three
  daemons.
- bench/first_send.py: from a job's LPUSH to the sandbox's first arrival, by campaign size.

Speed figures are ratios within the same run; the machine is shared, so a figure read on a
loaded machine says more about the load than about blastd.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import first_send
import pacing_cost
import throughput
import uvloop
from rich.console import Console
from rich.table import Table
from windows import max_in_window

RECIPIENTS = 20_000
LARGE_RECIPIENTS = 100_000
CONCURRENCY = 64
PACED_RATES = (80, 1000)
PACER_DAEMONS = (1, 3)
PACED_SECONDS = 10.0
IDLE_S = 30.0
# "Near 0" for an idle daemon, made a number: 1 % of a core, 0.6 CPU seconds a minute. What
# still wakes it (campaign poll, intake timeout, lease, health probe) costs about a quarter.
IDLE_GOAL_S_PER_MIN = 0.6
FIRST_SEND_RATE = 50.0


@dataclass(frozen=True, slots=True)
class Figure:
    measure: str
    value: str
    reference: str
    goal: str
    holds: bool


def _median(runs: list[throughput.Run], kind: str, of: Callable[[throughput.Run], float]) -> float:
    return statistics.median(of(r) for r in runs if r.kind == kind)


def throughput_figures(runs: dict[float, list[throughput.Run]]) -> tuple[list[Figure], float]:
    """The ratios at each latency and the CPU at 0 ms; also the daemon's unpaced CPU per
    message at 50 ms, the reference for paced sending."""
    figures = [
        ratio_figure(f"throughput, {latency_ms:g} ms latency (x bare)", latency_runs)
        for latency_ms, latency_runs in runs.items()
    ]
    at_0 = runs[0.0]
    box = _median(at_0, "blastd", lambda r: r.cpu_us_per_message(r.box_cpu_s)) / 1000
    bare_box = _median(at_0, "baseline", lambda r: r.cpu_us_per_message(r.box_cpu_s)) / 1000
    figures.append(
        Figure(
            "whole machine CPU per message, 0 ms (core-ms)",
            f"{box:.3f}",
            f"bare {bare_box:.3f}",
            "<= 1.3 x bare",
            box <= 1.3 * bare_box,
        )
    )
    unpaced_ms = _median(runs[50.0], "blastd", lambda r: r.cpu_us_per_message(r.sender_cpu_s))
    return figures, unpaced_ms / 1000


def ratio_figure(measure: str, runs: list[throughput.Run]) -> Figure:
    """blastd's and the chunked loop's messages per second as a share of the bare loop's."""
    bare = _median(runs, "baseline", lambda r: r.per_s)
    blastd = _median(runs, "blastd", lambda r: r.per_s) / bare
    chunked = _median(runs, "chunked", lambda r: r.per_s) / bare
    return Figure(
        measure,
        f"{blastd:.3f}",
        f"chunked loop {chunked:.3f}; bare {bare:,.0f} msg/s",
        ">= 0.9 and ahead of the chunked loop",
        blastd >= throughput.PROMISED_RATIO and blastd > chunked,
    )


def pacing_figures(costs: pacing_cost.PacingCosts, unpaced_ms: float) -> list[Figure]:
    figures = []
    for run in costs.runs:
        per_message_ms = run.cpu_s * 1000 / len(run.arrivals_s)
        if run.daemons == 1:
            bare_ms = costs.bare_ms[run.rate_per_s]
            figures.append(
                Figure(
                    f"daemon CPU per message paced at {run.rate_per_s}/s (ms)",
                    f"{per_message_ms:.3f}",
                    f"unpaced {unpaced_ms:.3f}; bare loop paced {bare_ms:.3f}",
                    "<= 2 x unpaced",
                    per_message_ms <= 2 * unpaced_ms,
                )
            )
    figures.append(
        Figure(
            "idle daemon CPU (s per minute)",
            f"{costs.idle_s_per_min:.3f}",
            "",
            f"<= {IDLE_GOAL_S_PER_MIN} (1 % of a core)",
            costs.idle_s_per_min <= IDLE_GOAL_S_PER_MIN,
        )
    )
    for run in costs.runs:
        busiest = max_in_window(run.arrivals_s, 1.0)
        figures.append(
            Figure(
                f"shared pacer at R = {run.rate_per_s}, {run.daemons} daemon(s) (x R)",
                f"{run.share:.4f}",
                f"busiest second {busiest:,}",
                ">= 0.98, busiest second <= R",
                run.share >= pacing_cost.PROMISED_SHARE and busiest <= run.rate_per_s,
            )
        )
    return figures


def first_send_figures(results: list[first_send.FirstSend]) -> list[Figure]:
    return [
        Figure(
            f"first send, {r.recipients:,} recipients (s)",
            f"{r.first_send_s:.3f}",
            f"intake over in {r.intake_s:.1f} s",
            "<= 1 s",
            r.first_send_s <= 1.0,
        )
        for r in results
    ]


def render(figures: list[Figure]) -> Table:
    table = Table(title="blastd performance: every figure beside its goal")
    for column in ("measure", "blastd", "reference, same run", "goal", ""):
        table.add_column(column, justify="right" if column == "blastd" else "left")
    for f in figures:
        table.add_row(f.measure, f.value, f.reference, f.goal, "holds" if f.holds else "MISSED")
    return table


async def run_all(args: argparse.Namespace) -> list[Figure]:
    runs = await throughput.run_all(RECIPIENTS, CONCURRENCY, args.rounds, [0.0, 50.0])
    figures, unpaced_ms = throughput_figures(runs)
    # One round at a size where the ledger's statements meet a table that grew during the run.
    large = await throughput.run_all(LARGE_RECIPIENTS, CONCURRENCY, 1, [0.0])
    figures.append(
        ratio_figure(
            f"throughput, 0 ms latency, {LARGE_RECIPIENTS:,} recipients (x bare)", large[0.0]
        )
    )
    paced = argparse.Namespace(
        rates=list(PACED_RATES),
        daemons=list(PACER_DAEMONS),
        seconds=PACED_SECONDS,
        idle_s=IDLE_S,
        concurrency=100,
    )
    figures += pacing_figures(await pacing_cost.run_all(paced), unpaced_ms)
    figures += first_send_figures(await first_send.run(args.sizes, FIRST_SEND_RATE, {}))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per latency")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[20_000, 100_000, 1_000_000],
        help="campaign sizes for the first send",
    )
    args = parser.parse_args()
    Console(width=140).print(render(uvloop.run(run_all(args))))


if __name__ == "__main__":
    main()
