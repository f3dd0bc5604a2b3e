"""A status to 50,000 contacts through the daemon (docs/status.md), counted at the gateway.

    .venv/bin/python bench/status_broadcast.py [--contacts 50000] [--latency-ms 0]

One `blastd run` process with one status_gateway account on the sandbox's /status emulator
(Evolution API shape). The contacts go in through a contacts_key list; the time runs from the
LPUSH of the job until the ledger shows the campaign 'done', so intake, the anchor, every
batch and the ledger writes count. Printed: the gateway calls against the goal of
1 + ceil(n / batch size), the time, and the deliveries per contact at the gateway (goal:
exactly one each, under one status id). Everything shares this machine's cores with the
sandbox, Valkey and PostgreSQL.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import orjson
import uvloop
from rich.console import Console
from rich.table import Table
from stack import (
    ACCOUNT,
    JOBS_KEY,
    TOKEN,
    Stack,
    phone_numbers,
    push_recipients,
    recipient_states,
    recipients_key,
    running_stack,
    start_daemon,
    wait_until_done,
)

from blastd.config import StatusBatchSizes
from blastd.status.broadcast import batch_size_for

CAMPAIGN_ID = "bench-status"
# The system blastd replaces: 50,000 recipients in "~8-10 seconds" with 11 API calls.
REPLACED_PROMISE_S = 10.0


async def gateway(stack: Stack, method: str, path: str, document: object = None) -> Any:
    url = f"{stack.sandbox_url}/status/_sandbox/{path}"
    async with stack.http.request(method, url, data=orjson.dumps(document)) as response:
        response.raise_for_status()
        return orjson.loads(await response.read())


async def run(contacts: int, latency_ms: float) -> None:
    async with running_stack(fsync=False) as stack:
        await gateway(stack, "POST", "config", {"latency_ms": latency_ms})
        account = {
            "kind": "status_gateway",
            "base_url": f"{stack.sandbox_url}/status",
            "token": TOKEN,
            "instance": "sandbox",
        }
        await start_daemon(stack, account)
        key = recipients_key(CAMPAIGN_ID)
        await push_recipients(stack.redis, key, phone_numbers(contacts))
        job = {
            "type": "status",
            "id": CAMPAIGN_ID,
            "account": ACCOUNT,
            "status": {"type": "text", "text": "Promo hari ini!", "background_color": "#315575"},
            "contacts_key": key,
        }
        pushed_at = time.monotonic()
        await stack.redis.lpush(JOBS_KEY, orjson.dumps(job))
        times = await wait_until_done(stack.pool, CAMPAIGN_ID, timeout_s=600)
        seconds = times.done_at - pushed_at
        stats = await gateway(stack, "GET", "stats")
        states = await recipient_states(stack.pool, CAMPAIGN_ID)
    report(contacts, latency_ms, seconds, stats, states)


def report(
    contacts: int, latency_ms: float, seconds: float, stats: Any, states: dict[str, int]
) -> None:
    size = batch_size_for(contacts, StatusBatchSizes())
    goal_calls = 1 + math.ceil((contacts - 1) / size)
    table = Table(title=f"status to {contacts:,} contacts, gateway latency {latency_ms:g} ms")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("goal", justify="right")
    table.add_row("batch size (size table)", f"{size:,}", "")
    table.add_row("gateway calls", f"{stats['requests']:,}", f"{goal_calls:,}")
    table.add_row("status ids created", f"{stats['statuses']}", "1")
    table.add_row("contacts reached", f"{stats['contacts']:,}", f"{contacts:,}")
    deliveries = ", ".join(
        f"{n}x: {c:,}" for n, c in sorted(stats["contacts_by_deliveries"].items())
    )
    table.add_row("deliveries per contact", deliveries, f"1x: {contacts:,}")
    table.add_row(
        "time, push to done (s)", f"{seconds:.2f}", f"<= {REPLACED_PROMISE_S:g} (replaced)"
    )
    table.add_row("ledger states", ", ".join(f"{k}: {v:,}" for k, v in states.items()), "")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contacts", type=int, default=50_000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    uvloop.run(run(args.contacts, args.latency_ms))


if __name__ == "__main__":
    main()
