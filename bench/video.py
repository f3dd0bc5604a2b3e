"""The video pipeline's figures, from a real `blastd run` against the sandbox's D-ID emulator.

    .venv/bin/python bench/video.py [--renders 1000] [--create-latency-ms 200]
                                    [--polled 200] [--compression 10]

1. Submission: a video_blast of --renders rows, D-ID answering each create after
   --create-latency-ms, 10 renders in flight (the default concurrency). The time from the
   job's push to the last clip created, against the ideal renders / concurrency x latency.
   Polls are held off (first poll after 10 minutes) so the figure is the submission's alone.
2. Polling: a video_blast of --polled rows whose renders take 1-2 minutes, as the system
   blastd replaces saw (a log-normal around 60 s), time compressed by --compression, and the
   default schedule (first poll 5 s, every 10 s, give up after 5 min) compressed alike.
   Printed: polls per render (median, p95) and the detection delay, from the render's
   completion at D-ID to the video's delivery in the ledger (median, p95), in uncompressed
   seconds. Three campaigns, each by a fresh daemon: with no render history (the default
   schedule), then with the adaptive first poll (learnt from the ledger's render times of the
   first), then with the D-ID webhook configured.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
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
    account_settings,
    phone_numbers,
    running_stack,
    start_daemon,
    wait_until_done,
)

from blastd.embedded import free_port

DID = "did-bench"
CONCURRENCY = 10  # the video account's default
SUBMIT_TIMEOUT_S = 600
DEFAULT_SCHEDULE_S = {"FIRST_POLL_S": 5, "POLL_INTERVAL_S": 10, "TIMEOUT_S": 300}


async def did(stack: Stack, method: str, path: str, document: object = None) -> Any:
    url = f"{stack.sandbox_url}/did/_sandbox/{path}"
    async with stack.http.request(method, url, data=orjson.dumps(document)) as response:
        response.raise_for_status()
        return orjson.loads(await response.read())


def video_job(campaign_id: str, count: int) -> bytes:
    numbers = phone_numbers(count)
    return orjson.dumps(
        {
            "type": "video_blast",
            "id": campaign_id,
            "account": ACCOUNT,
            "video": {"account": DID, "script": "Halo {name}, ini video untukmu."},
            "message": {"caption": "Video untuk {name}"},
            "recipients": [{"to": n, "vars": {"name": f"P{i}"}} for i, n in enumerate(numbers)],
        }
    )


def did_account(stack: Stack, **fields: Any) -> dict[str, Any]:
    return {
        "kind": "did",
        "base_url": f"{stack.sandbox_url}/did",
        "token": TOKEN,
        "presenter_id": "v2_public_Amber@0zSz8kflCN",
        "concurrency": CONCURRENCY,
        **fields,
    }


async def submission(stack: Stack, renders: int, latency_ms: float) -> dict[str, float]:
    await did(stack, "POST", "config", {"latency_ms": latency_ms, "render_median_s": 60.0})
    await did(stack, "POST", "reset")
    env = {"BLASTD_VIDEO__FIRST_POLL_S": "600", "BLASTD_VIDEO__TIMEOUT_S": "1200"}
    daemon = await start_daemon(
        stack,
        account_settings(stack.sandbox_url, rate_per_s=0, concurrency=64),
        other_accounts={DID: did_account(stack)},
        extra_env=env,
    )
    pushed_at = time.time()
    await stack.redis.lpush(JOBS_KEY, video_job("bench-video-submit", renders))
    for _ in range(SUBMIT_TIMEOUT_S * 20):  # every 50 ms
        if (await did(stack, "GET", "stats"))["created"] >= renders:
            break
        await asyncio.sleep(0.05)
    jobs = await did(stack, "GET", "jobs")
    await daemon.stop()
    seconds = max(job["created_at"] for job in jobs) - pushed_at
    ideal = renders / CONCURRENCY * latency_ms / 1000
    duplicates = renders - len({job["reference"] for job in jobs})
    return {"seconds": seconds, "ideal": ideal, "duplicates": duplicates}


async def polling(
    stack: Stack, count: int, compression: float, *, webhook: bool, campaign: str
) -> dict[str, Any]:
    """A video_blast of `count` renders to the end, by a fresh daemon; its adaptive schedule
    starts from the render times of the campaigns before it, read from the ledger."""
    campaign_id = f"bench-video-{campaign}"
    await did(stack, "POST", "config", {"latency_ms": 0, "time_compression": compression})
    await did(stack, "POST", "reset")
    env = {f"BLASTD_VIDEO__{k}": str(v / compression) for k, v in DEFAULT_SCHEDULE_S.items()}
    env["BLASTD_VIDEO__WEBHOOK_POLL_INTERVAL_S"] = str(60 / compression)
    admin_port = free_port()
    fields = {}
    if webhook:
        fields["webhook_url"] = f"http://127.0.0.1:{admin_port}/webhooks/video/{DID}"
    daemon = await start_daemon(
        stack,
        account_settings(stack.sandbox_url, rate_per_s=0, concurrency=64),
        admin_port,
        other_accounts={DID: did_account(stack, **fields)},
        extra_env=env,
    )
    await stack.redis.lpush(JOBS_KEY, video_job(campaign_id, count))
    await wait_until_done(stack.pool, campaign_id, timeout_s=900, poll_s=0.05)
    jobs = {job["reference"]: job for job in await did(stack, "GET", "jobs")}
    rows = await stack.pool.fetch(
        "SELECT id, state, extract(epoch FROM updated_at) AS sent_at FROM recipients "
        "WHERE campaign_id = $1",
        campaign_id,
    )
    await daemon.stop()
    delays = [
        (float(row["sent_at"]) - jobs[str(row["id"])]["done_at"]) * compression
        for row in rows
        if row["state"] == "sent"
    ]
    polls = [job["polls"] for job in jobs.values()]
    renders = [(job["done_at"] - job["created_at"]) * compression for job in jobs.values()]
    return {
        "polls": polls,
        "delays": delays,
        "renders": renders,
        "sent": sum(1 for row in rows if row["state"] == "sent"),
    }


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(renders: int, latency_ms: float, polled: int, compression: float) -> None:
    async with running_stack(fsync=False) as stack:
        submitted = await submission(stack, renders, latency_ms)
        first = await polling(stack, polled, compression, webhook=False, campaign="first")
        adaptive = await polling(stack, polled, compression, webhook=False, campaign="adaptive")
        with_hook = await polling(stack, polled, compression, webhook=True, campaign="hook")
    runs = {
        "polling, no render history": first,
        "polling, adaptive first poll": adaptive,
        "D-ID webhook": with_hook,
    }
    report(renders, latency_ms, submitted, polled, compression, runs)


def report(
    renders: int,
    latency_ms: float,
    submitted: dict[str, float],
    polled: int,
    compression: float,
    runs: dict[str, dict[str, Any]],
) -> None:
    table = Table(title="video pipeline (D-ID sandbox)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("goal / baseline", justify="right")
    ratio = submitted["ideal"] / submitted["seconds"]
    table.add_row(
        f"submit {renders:,} renders, create {latency_ms:g} ms, {CONCURRENCY} in flight (s)",
        f"{submitted['seconds']:.2f}",
        f"ideal {submitted['ideal']:.2f} (ratio {ratio:.2f})",
    )
    table.add_row("clips submitted twice", f"{submitted['duplicates']:g}", "0")
    render_s = runs["polling, no render history"]["renders"]
    table.add_row(
        f"render time at D-ID, {polled} renders (s, uncompressed)",
        f"median {statistics.median(render_s):.0f}, p95 {quantile(render_s, 0.95):.0f}",
        "replaced system: 60-120",
    )
    for name, figures in runs.items():
        polls, delays = figures["polls"], figures["delays"]
        table.add_row(
            f"{name}: polls per render",
            f"median {statistics.median(polls):g}, p95 {quantile(polls, 0.95):g}",
            "replaced system: 6-12",
        )
        table.add_row(
            f"{name}: completion to delivery (s, uncompressed)",
            f"median {statistics.median(delays):.2f}, p95 {quantile(delays, 0.95):.2f}",
            "replaced system: up to 10",
        )
        table.add_row(f"{name}: delivered", f"{figures['sent']}/{polled}", f"{polled}")
    Console().print(table)
    print(f"render times, schedule and delays compressed {compression:g}x, shown uncompressed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--renders", type=int, default=1000)
    parser.add_argument("--create-latency-ms", type=float, default=200.0)
    parser.add_argument("--polled", type=int, default=200)
    parser.add_argument("--compression", type=float, default=10.0)
    args = parser.parse_args()
    uvloop.run(run(args.renders, args.create_latency_ms, args.polled, args.compression))


if __name__ == "__main__":
    main()
