"""Achieved rate and the busiest windows of a real daemon, measured where requests arrive.

    .venv/bin/python bench/rate.py [--rates 80 1000] [--seconds 15] [--concurrency 100]

The promise: at a configured account rate R, achieved rate >= 0.98 R and no one-second window
above R. For each R a fresh `blastd run` process sends R * seconds recipients with the
account's rate_per_s = R to the sandbox process (its own rate limit off, latency 0). The
sandbox stamps each accepted request with its monotonic clock on arrival, so loopback jitter
and the daemon's own scheduling are in the figures. From those arrivals:

- achieved/R: (n - 1) / (last - first) over R;
- max in 1 s / max in 100 ms: the most arrivals any sliding window of that width holds
  (the promise allows R, and 0.1 R per 100 ms on average).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

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
    start_daemon,
    wait_until_done,
)
from windows import max_in_window

PROMISED_SHARE = 0.98


@dataclass(frozen=True, slots=True)
class RateRun:
    rate_per_s: int
    concurrency: int
    arrivals_s: list[float]  # sandbox monotonic clock, sorted
    ledger_sent: int

    @property
    def achieved_per_s(self) -> float:
        span_s = self.arrivals_s[-1] - self.arrivals_s[0]
        return (len(self.arrivals_s) - 1) / span_s

    @property
    def share(self) -> float:
        return self.achieved_per_s / self.rate_per_s


async def run_rate(
    stack: Stack, campaign_id: str, rate_per_s: int, seconds: float, concurrency: int
) -> RateRun:
    """One daemon at rate R, R * seconds recipients, arrivals read back from the sandbox."""
    await stack.sandbox_post("reset", {})
    account = account_settings(stack.sandbox_url, rate_per_s=rate_per_s, concurrency=concurrency)
    daemon = await start_daemon(stack, account)
    numbers = phone_numbers(int(rate_per_s * seconds))
    await push_recipients(stack.redis, recipients_key(campaign_id), numbers)
    await push_job(stack.redis, campaign_id)
    await wait_until_done(stack.pool, campaign_id, timeout_s=seconds * 4 + 60)
    exit_code = await daemon.stop()
    if exit_code != 0:
        raise RuntimeError(f"blastd exited with {exit_code}; see {daemon.log_path}")
    arrivals_s = sorted(await stack.sandbox_get("arrivals"))
    states = await recipient_states(stack.pool, campaign_id)
    return RateRun(rate_per_s, concurrency, arrivals_s, states.get("sent", 0))


async def run_all(rates: list[int], seconds: float, concurrency: int) -> list[RateRun]:
    async with running_stack() as stack:
        await stack.sandbox_post("config", {"rate_per_s": 0, "latency_ms": 0, "webhook_url": None})
        return [
            await run_rate(stack, f"rate-{index}-{rate}", rate, seconds, concurrency)
            for index, rate in enumerate(rates)
        ]


COLUMNS = (
    "R",
    "concurrency",
    "arrivals",
    "ledger sent",
    "seconds",
    "achieved/s",
    "achieved/R",
    "max in 1 s",
    "max in 100 ms",
    "promise",
)


def render(runs: list[RateRun]) -> Table:
    table = Table(title="blastd run -> sandbox process; arrivals stamped by the sandbox")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for run in runs:
        in_1_s = max_in_window(run.arrivals_s, 1.0)
        holds = run.share >= PROMISED_SHARE and in_1_s <= run.rate_per_s
        table.add_row(
            str(run.rate_per_s),
            str(run.concurrency),
            f"{len(run.arrivals_s):,}",
            f"{run.ledger_sent:,}",
            f"{run.arrivals_s[-1] - run.arrivals_s[0]:.2f}",
            f"{run.achieved_per_s:.1f}",
            f"{run.share:.4f}",
            str(in_1_s),
            str(max_in_window(run.arrivals_s, 0.1)),
            "holds" if holds else "missed",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[80, 1000], help="R per run")
    parser.add_argument("--seconds", type=float, default=15.0, help="sending time per run")
    parser.add_argument("--concurrency", type=int, default=100, help="account concurrency")
    args = parser.parse_args()
    runs = uvloop.run(run_all(args.rates, args.seconds, args.concurrency))
    Console(width=120).print(render(runs))


if __name__ == "__main__":
    main()
