"""Wablas v2 bulk sends against single sends, through the daemon, in the same run.

    .venv/bin/python bench/wablas_bulk.py [--recipients 20000] [--paced-recipients 1000]

The system blastd replaces moved its blast to Wablas' v2 bulk API: up to 100 messages per
request and 500 ms between batches, so 1,000 messages "in about 5 minutes" instead of 33 at
2 s per message.
Here every run is a `blastd run` process with one Wablas account on the sandbox's /wablas
emulator (latency 0, no webhooks, counters reset before each run), timed from the LPUSH of
the job until the ledger shows the campaign 'done', so intake and ledger writes count:

- bulk: batch_size 100, no rate limit;
- single: batch_size 1 (the single-send endpoint), no rate limit;
- bulk paced: batch_size 100 at that system's pacing, 2 requests a second (500 ms apart).

Everything shares this machine's cores with the sandbox, Valkey and PostgreSQL.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import orjson
import uvloop
from rich.console import Console
from rich.table import Table
from stack import (
    Stack,
    phone_numbers,
    push_job,
    push_recipients,
    recipient_states,
    recipients_key,
    running_stack,
    start_daemon,
    wablas_account_settings,
    wait_until_done,
)

# The system blastd replaces: 1,000 messages in ~5 minutes, 500 ms between bulk requests.
REPLACED_BULK_PROMISE_S = 5 * 60.0
REPLACED_PACING_PER_S = 2.0


@dataclass(frozen=True, slots=True)
class Mode:
    name: str
    batch_size: int
    rate_per_s: float  # requests a second; 0 means no limit
    concurrency: int
    recipients: int


@dataclass(frozen=True, slots=True)
class Run:
    mode: Mode
    seconds: float
    requests: int
    accepted: int
    duplicates: int
    ledger_sent: int

    @property
    def per_s(self) -> float:
        return self.mode.recipients / self.seconds


async def wablas_stats(stack: Stack) -> Any:
    async with stack.http.get(f"{stack.sandbox_url}/wablas/_sandbox/stats") as response:
        response.raise_for_status()
        return orjson.loads(await response.read())


async def reset_wablas(stack: Stack) -> None:
    async with stack.http.post(f"{stack.sandbox_url}/wablas/_sandbox/reset") as response:
        response.raise_for_status()


async def run_mode(stack: Stack, mode: Mode, numbers: list[str]) -> Run:
    """One daemon for the mode's account, one campaign, then a drain."""
    account = wablas_account_settings(
        stack.sandbox_url,
        batch_size=mode.batch_size,
        rate_per_s=mode.rate_per_s,
        concurrency=mode.concurrency,
    )
    daemon = await start_daemon(stack, account)
    campaign_id = f"wablas-{mode.name.replace(' ', '-')}"
    try:
        await reset_wablas(stack)
        await push_recipients(stack.redis, recipients_key(campaign_id), numbers)
        pushed_at = await push_job(stack.redis, campaign_id)
        times = await wait_until_done(stack.pool, campaign_id, timeout_s=900)
    finally:
        exit_code = await daemon.stop()
    if exit_code != 0:
        raise RuntimeError(f"blastd exited with {exit_code}; see {daemon.log_path}")
    stats = await wablas_stats(stack)
    states = await recipient_states(stack.pool, campaign_id)
    return Run(
        mode,
        times.done_at - pushed_at,
        stats["requests"],
        stats["accepted"],
        len(stats["duplicates"]),
        states.get("sent", 0),
    )


async def run_all(modes: list[Mode]) -> list[Run]:
    async with running_stack() as stack:
        return [await run_mode(stack, m, phone_numbers(m.recipients)) for m in modes]


def render(runs: list[Run]) -> Table:
    table = Table(title="Wablas through blastd: intake to ledger, sandbox on loopback")
    for column in (
        "mode",
        "batch",
        "rate req/s",
        "recipients",
        "requests",
        "seconds",
        "per s",
        "sandbox accepted",
        "duplicates",
        "ledger sent",
    ):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for run in runs:
        mode = run.mode
        table.add_row(
            mode.name,
            str(mode.batch_size),
            f"{mode.rate_per_s:g}" if mode.rate_per_s else "no limit",
            f"{mode.recipients:,}",
            f"{run.requests:,}",
            f"{run.seconds:.2f}",
            f"{run.per_s:,.0f}",
            f"{run.accepted:,}",
            str(run.duplicates),
            f"{run.ledger_sent:,}",
        )
    return table


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipients", type=int, default=20_000, help="unpaced runs")
    parser.add_argument("--paced-recipients", type=int, default=1_000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--bulk-concurrency", type=int, default=10, help="requests in flight")
    parser.add_argument("--single-concurrency", type=int, default=64)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    modes = [
        Mode("bulk", args.batch_size, 0.0, args.bulk_concurrency, args.recipients),
        Mode("single", 1, 0.0, args.single_concurrency, args.recipients),
        Mode(
            "bulk paced",
            args.batch_size,
            REPLACED_PACING_PER_S,
            args.bulk_concurrency,
            args.paced_recipients,
        ),
    ]
    runs = uvloop.run(run_all(modes))
    console = Console(width=120)
    console.print(render(runs))
    by_name = {run.mode.name: run for run in runs}
    bulk, single, paced = by_name["bulk"], by_name["single"], by_name["bulk paced"]
    console.print(f"bulk / single recipients per second: {bulk.per_s / single.per_s:.1f}x")
    console.print(
        f"paced: {paced.mode.recipients:,} recipients in {paced.requests} requests, "
        f"{paced.seconds:.1f} s "
        f"(the replaced system: ~{REPLACED_BULK_PROMISE_S / 60:.0f} min for 1,000)"
    )


if __name__ == "__main__":
    main()
