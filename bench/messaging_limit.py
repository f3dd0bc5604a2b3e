"""A campaign larger than its account's messaging limit: it pauses, resumes, and loses no one.

    .venv/bin/python bench/messaging_limit.py [--recipients 10000] [--limit 2000] [--window 10]

One `blastd run` sends a text blast to `--recipients` unique numbers through a Cloud API
account whose messaging_limit_per_24h is `--limit` (Meta's 2K tier by default), with the
rolling window compressed to `--window` seconds (BLASTD_MESSAGING_LIMIT_WINDOW_S) so the run
takes a minute, not days. The ledger is polled every 10 ms. Printed: how many were sent before
the first pause (the goal: exactly the limit), how long until the campaign resumed on its own
(about a window after the first sends), how many pauses in all, the most unique numbers the
sandbox accepted in any window (the goal: <= the limit), and the failures (the goal: 0).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field

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
)
from windows import max_in_window

CAMPAIGN = "limited"
RATE_PER_S = 1000
CONCURRENCY = 50
POLL_S = 0.01


@dataclass
class Timeline:
    """What the poller saw: the pauses and resumes, and the sends at the first pause."""

    pushed_at: float
    paused_at: list[float] = field(default_factory=list)
    resumed_at: list[float] = field(default_factory=list)
    sent_at_first_pause: int | None = None
    done_at: float | None = None


async def watch(stack: Stack, timeline: Timeline, timeout_s: float) -> None:
    """Follow the campaign's state until it is done."""
    last = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = await stack.pool.fetchrow(
            "SELECT state, state_reason FROM campaigns WHERE id = $1", CAMPAIGN
        )
        state = None if row is None else (row["state"], row["state_reason"])
        now = time.monotonic()
        if state == ("paused", "messaging_limit") and last != state:
            timeline.paused_at.append(now)
            if timeline.sent_at_first_pause is None:
                states = await recipient_states(stack.pool, CAMPAIGN)
                timeline.sent_at_first_pause = states.get("sent", 0)
        elif state is not None and state[0] == "running" and last and last[0] == "paused":
            timeline.resumed_at.append(now)
        elif state is not None and state[0] == "done":
            timeline.done_at = now
            return
        last = state
        await asyncio.sleep(POLL_S)
    raise RuntimeError(f"campaign not done within {timeout_s} s")


async def run(recipients: int, limit: int, window_s: float) -> tuple[Timeline, dict[str, int], int]:
    async with running_stack() as stack:
        await stack.sandbox_post("config", {"rate_per_s": 0, "latency_ms": 0, "webhook_url": None})
        account = {
            **account_settings(stack.sandbox_url, rate_per_s=RATE_PER_S, concurrency=CONCURRENCY),
            "messaging_limit_per_24h": limit,
        }
        env = {"BLASTD_MESSAGING_LIMIT_WINDOW_S": str(window_s)}
        daemon = await start_daemon(stack, account, extra_env=env)
        await push_recipients(stack.redis, recipients_key(CAMPAIGN), phone_numbers(recipients))
        timeline = Timeline(await push_job(stack.redis, CAMPAIGN))
        await watch(stack, timeline, timeout_s=(recipients / limit + 2) * window_s * 3 + 60)
        exit_code = await daemon.stop()
        if exit_code != 0:
            raise RuntimeError(f"blastd exited with {exit_code}; see {daemon.log_path}")
        arrivals = sorted(await stack.sandbox_get("arrivals"))
        busiest = max_in_window(arrivals, window_s)
        return timeline, await recipient_states(stack.pool, CAMPAIGN), busiest


def render(timeline: Timeline, states: dict[str, int], busiest: int, limit: int) -> Table:
    table = Table(title=f"messaging limit {limit:,} unique recipients per window")
    for column in ("figure", "value", "goal"):
        table.add_column(column, justify="right")
    first_pause = timeline.paused_at[0] if timeline.paused_at else None
    first_resume = timeline.resumed_at[0] if timeline.resumed_at else None
    assert timeline.done_at is not None
    rows = [
        ("sent before the first pause", f"{timeline.sent_at_first_pause}", f"{limit:,}"),
        (
            "first pause -> resumed (s)",
            "-"
            if first_pause is None or first_resume is None
            else f"{first_resume - first_pause:.2f}",
            "about a window",
        ),
        ("pauses", str(len(timeline.paused_at)), ""),
        ("most accepted in any window", f"{busiest:,}", f"<= {limit:,}"),
        ("total time (s)", f"{timeline.done_at - timeline.pushed_at:.1f}", ""),
        ("recipients by state", str(states), ""),
        ("failed", str(states.get("failed", 0)), "0"),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=10_000)
    parser.add_argument("--limit", type=int, default=2_000)
    parser.add_argument("--window", type=float, default=10.0, help="the window, in seconds")
    args = parser.parse_args()
    timeline, states, busiest = uvloop.run(run(args.recipients, args.limit, args.window))
    Console(width=120).print(render(timeline, states, busiest, args.limit))


if __name__ == "__main__":
    main()
