"""End-to-end throughput of blastd against a bare aiohttp loop, same sandbox, same run.

    .venv/bin/python bench/throughput.py [--recipients 20000] [--concurrency 64] [--rounds 3]
                                         [--latency-ms 0 50]

The promise: with the sandbox on loopback and no rate limit, blastd's messages per second
(intake to ledger) reach at least 0.9 of a bare aiohttp loop sending the same requests.

- baseline: one uvloop process (this one), one ClientSession with a keep-alive
  TCPConnector, `concurrency` workers sending the bodies blastd would send (built in advance
  with build_request_body, same Authorization header); timed from the first request to the
  last answer.
- chunked: the hand-written loop blastd replaces, in this process: the recipients inserted
  into a table, read 500 at a time, each page sent with `concurrency` workers and its results
  written back in one statement (no intent before a request, no crash safety); timed from the
  insert to the last page written.
- blastd: a `blastd run` process with the account at rate 0 and the same concurrency. The
  recipients list is pushed first; timed from the LPUSH of the job until the ledger shows the
  campaign 'done' (every recipient 'sent'), so intake, ledger writes and the drain count.

All three hit the same sandbox process (no webhooks, counters reset before each run), in
alternating rounds; the ratios use the medians. Everything shares this machine's two cores.

"box CPU" is the whole machine's busy time per message (psutil.cpu_times), so it holds the
sandbox, PostgreSQL and Redis too, and whatever else runs: read it on a quiet machine.

Each sandbox latency gets its own table. At 0 ms the run measures CPU: the sandbox, PostgreSQL,
blastd and the baseline client all compete for the same two cores, so the ledger's work (which
the baseline does not do) shows in full. At 50 ms, closer to a real provider (Meta answers in
100-300 ms), both sides are bound by concurrency / latency and the ratio measures how well
blastd keeps its requests in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import asyncpg
import orjson
import psutil
import uvloop
from rich.console import Console
from rich.table import Table
from stack import (
    PHONE_NUMBER_ID,
    TEXT,
    TOKEN,
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
    start_daemon,
    wait_until_done,
)

from blastd.config import CloudApiAccount
from blastd.providers.base import OutboundMessage, TextBody
from blastd.providers.cloud_api import build_request_body

PROMISED_RATIO = 0.9


@dataclass(frozen=True, slots=True)
class Run:
    kind: str  # baseline | blastd
    messages: int
    seconds: float
    accepted: int
    duplicates: int
    sender_cpu_s: float  # this process for the baseline, the daemon process for blastd
    sandbox_cpu_s: float
    box_cpu_s: float  # the whole machine: client or daemon, sandbox, PostgreSQL, Redis
    intake_s: float | None = None  # blastd only: LPUSH until the campaign is in the ledger
    ledger_sent: int | None = None  # blastd only

    @property
    def per_s(self) -> float:
        return self.messages / self.seconds

    def cpu_us_per_message(self, cpu_s: float) -> float:
        return cpu_s / self.messages * 1e6


def box_cpu_s() -> float:
    """CPU seconds the whole machine has been busy: every process, this one included."""
    times = psutil.cpu_times()
    return times.user + times.system + times.nice + getattr(times, "softirq", 0.0)


HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def request_body(ledger_id: int, number: str) -> bytes:
    """What blastd sends for one recipient with this ledger id."""
    return orjson.dumps(build_request_body(OutboundMessage(ledger_id, number, TextBody(TEXT))))


def request_bodies(numbers: list[str]) -> list[bytes]:
    """Each recipient's request, with ledger ids like the ones blastd would use."""
    return [request_body(ledger_id, n) for ledger_id, n in enumerate(numbers, start=1)]


async def post_bare(http: aiohttp.ClientSession, url: str, body: bytes) -> None:
    """One request of the bare loop, its answer read and checked."""
    async with http.post(url, data=body, headers=HEADERS) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"sandbox answered {response.status}")


async def send_bare(url: str, bodies: list[bytes], concurrency: int) -> float:
    """`concurrency` workers over one keep-alive pool; seconds from first request to last answer."""
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=30)
    pending = iter(bodies)

    async def work(http: aiohttp.ClientSession) -> None:
        for body in pending:
            await post_bare(http, url, body)

    async with aiohttp.ClientSession(connector=connector) as http:
        started = time.perf_counter()
        async with asyncio.TaskGroup() as workers:
            for _ in range(concurrency):
                workers.create_task(work(http))
        return time.perf_counter() - started


async def send_bare_paced(url: str, bodies: list[bytes], rate_per_s: float) -> float:
    """The bare loop paced, as a hand-written script would pace it: request k leaves in a task
    of its own at start + k / rate_per_s, the loop sleeping to that deadline between two; seconds
    from the first request to the last answer."""
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(keepalive_timeout=30)

    async with aiohttp.ClientSession(connector=connector) as http:
        started = loop.time()
        async with asyncio.TaskGroup() as sends:
            for k, body in enumerate(bodies):
                if (wait_s := started + k / rate_per_s - loop.time()) > 0:
                    await asyncio.sleep(wait_s)
                sends.create_task(post_bare(http, url, body))
        return loop.time() - started


CHUNK = 500  # the chunked loop's page: recipients read, sent together, written back at once


async def send_chunked(pool: asyncpg.Pool, url: str, numbers: list[str], concurrency: int) -> float:
    """The hand-written design blastd replaces: recipients in a table, read a page at a time,
    the page sent with `concurrency` workers, every result written back in one statement. No
    intent before a request and no crash safety: a crash mid-page sends the page again.
    Seconds from the recipients' insert to the last page written, like blastd's intake-to-done."""
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=30)
    await pool.execute(
        "DROP TABLE IF EXISTS chunked; "
        "CREATE TABLE chunked (id bigserial PRIMARY KEY, phone text, state text, message_id text)"
    )
    async with aiohttp.ClientSession(connector=connector) as http:
        started = time.perf_counter()
        await pool.copy_records_to_table(
            "chunked", records=[(n, "pending") for n in numbers], columns=["phone", "state"]
        )
        while page := await pool.fetch(
            "SELECT id, phone FROM chunked WHERE state = 'pending' ORDER BY id LIMIT $1", CHUNK
        ):
            bodies = [(r["id"], request_body(r["id"], r["phone"])) for r in page]
            results = await send_page(http, url, bodies, concurrency)
            await pool.execute(
                "UPDATE chunked c SET state = r.state, message_id = r.message_id "
                "FROM unnest($1::bigint[], $2::text[], $3::text[]) AS r(id, state, message_id) "
                "WHERE c.id = r.id",
                *map(list, zip(*results, strict=True)),
            )
        return time.perf_counter() - started


async def send_page(
    http: aiohttp.ClientSession,
    url: str,
    bodies: list[tuple[int, bytes]],
    concurrency: int,
) -> list[tuple[int, str, str | None]]:
    """Send a page with `concurrency` workers; (id, state, message id) of each."""
    pending = iter(bodies)
    results: list[tuple[int, str, str | None]] = []

    async def work() -> None:
        for ledger_id, body in pending:
            async with http.post(url, data=body, headers=HEADERS) as response:
                answer = orjson.loads(await response.read())
            message_id = answer.get("messages", [{}])[0].get("id")
            results.append((ledger_id, "sent" if message_id else "failed", message_id))

    async with asyncio.TaskGroup() as workers:
        for _ in range(min(concurrency, len(bodies))):
            workers.create_task(work())
    return results


async def sandbox_counts(stack: Stack) -> tuple[int, int]:
    stats = await stack.sandbox_get("stats")
    return stats["accepted"], len(stats["duplicates"])


async def run_baseline(stack: Stack, bodies: list[bytes], concurrency: int) -> Run:
    return await run_in_process(
        stack, "baseline", len(bodies), lambda url: send_bare(url, bodies, concurrency)
    )


async def run_chunked(stack: Stack, numbers: list[str], concurrency: int) -> Run:
    return await run_in_process(
        stack,
        "chunked",
        len(numbers),
        lambda url: send_chunked(stack.pool, url, numbers, concurrency),
    )


async def run_in_process(
    stack: Stack, kind: str, messages: int, send: Callable[[str], Awaitable[float]]
) -> Run:
    """A loop run by this process against the reset sandbox: its seconds, and the CPU of this
    process, of the sandbox and of the whole machine meanwhile."""
    await stack.sandbox_post("reset", {})
    api_version = CloudApiAccount.model_fields["api_version"].default
    url = f"{stack.sandbox_url}/{api_version}/{PHONE_NUMBER_ID}/messages"
    client, sandbox = psutil.Process(), psutil.Process(stack.sandbox_pid)
    client_cpu_s, sandbox_cpu_s, box_s = cpu_s(client), cpu_s(sandbox), box_cpu_s()
    seconds = await send(url)
    client_cpu_s, sandbox_cpu_s = cpu_s(client) - client_cpu_s, cpu_s(sandbox) - sandbox_cpu_s
    box_s = box_cpu_s() - box_s
    accepted, duplicates = await sandbox_counts(stack)
    return Run(kind, messages, seconds, accepted, duplicates, client_cpu_s, sandbox_cpu_s, box_s)


async def run_blastd(stack: Stack, daemon: Daemon, numbers: list[str], campaign_id: str) -> Run:
    await stack.sandbox_post("reset", {})
    await push_recipients(stack.redis, recipients_key(campaign_id), numbers)
    sender, sandbox = psutil.Process(daemon.pid), psutil.Process(stack.sandbox_pid)
    sender_cpu_s, sandbox_cpu_s, box_s = cpu_s(sender), cpu_s(sandbox), box_cpu_s()
    pushed_at = await push_job(stack.redis, campaign_id)
    times = await wait_until_done(stack.pool, campaign_id, timeout_s=600)
    sender_cpu_s, sandbox_cpu_s = cpu_s(sender) - sender_cpu_s, cpu_s(sandbox) - sandbox_cpu_s
    box_s = box_cpu_s() - box_s
    states = await recipient_states(stack.pool, campaign_id)
    accepted, duplicates = await sandbox_counts(stack)
    return Run(
        "blastd",
        len(numbers),
        times.done_at - pushed_at,
        accepted,
        duplicates,
        sender_cpu_s,
        sandbox_cpu_s,
        box_s,
        intake_s=times.created_at - pushed_at,
        ledger_sent=states.get("sent", 0),
    )


async def run_all(
    recipients: int, concurrency: int, rounds: int, latencies_ms: list[float]
) -> dict[float, list[Run]]:
    numbers = phone_numbers(recipients)
    bodies = request_bodies(numbers)
    async with running_stack() as stack:
        account = account_settings(stack.sandbox_url, rate_per_s=0, concurrency=concurrency)
        daemon = await start_daemon(stack, account)
        runs: dict[float, list[Run]] = {}
        try:
            for latency_ms in latencies_ms:
                await stack.sandbox_post("config", {"latency_ms": latency_ms, "webhook_url": None})
                runs[latency_ms] = []
                for round_ in range(rounds):
                    campaign_id = f"throughput-{latency_ms:g}-{round_}"
                    runs[latency_ms].append(await run_baseline(stack, bodies, concurrency))
                    runs[latency_ms].append(await run_chunked(stack, numbers, concurrency))
                    runs[latency_ms].append(await run_blastd(stack, daemon, numbers, campaign_id))
        finally:
            exit_code = await daemon.stop()
        if exit_code != 0:
            raise RuntimeError(f"blastd exited with {exit_code}; see {daemon.log_path}")
        return runs


COLUMNS = (
    "run",
    "msgs/s",
    "seconds",
    "of which intake",
    "sandbox accepted",
    "duplicates",
    "ledger sent",
    "sender CPU us/msg",
    "sandbox CPU us/msg",
    "box CPU us/msg",
)


def render(runs: list[Run], concurrency: int, latency_ms: float) -> Table:
    messages = runs[0].messages
    title = f"{messages:,} recipients, concurrency {concurrency}, sandbox latency {latency_ms:g} ms"
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "run" else "right")
    for index, run in enumerate(runs):
        table.add_row(
            f"{index // 3 + 1}. {run.kind}",
            f"{run.per_s:,.0f}",
            f"{run.seconds:.2f}",
            "" if run.intake_s is None else f"{run.intake_s:.2f}",
            f"{run.accepted:,}",
            str(run.duplicates),
            "" if run.ledger_sent is None else f"{run.ledger_sent:,}",
            f"{run.cpu_us_per_message(run.sender_cpu_s):.0f}",
            f"{run.cpu_us_per_message(run.sandbox_cpu_s):.0f}",
            f"{run.cpu_us_per_message(run.box_cpu_s):.0f}",
        )
    return table


def median_rate(runs: list[Run], kind: str) -> float:
    return statistics.median(r.per_s for r in runs if r.kind == kind)


def summary(runs: list[Run], latency_ms: float) -> str:
    baseline = median_rate(runs, "baseline")
    chunked, blastd = (
        median_rate(runs, "chunked") / baseline,
        median_rate(runs, "blastd") / baseline,
    )
    verdict = "meets" if blastd >= PROMISED_RATIO else "misses"
    return (
        f"latency {latency_ms:g} ms: median baseline {baseline:,.0f} msgs/s; "
        f"chunked loop {chunked:.3f} x bare; "
        f"blastd {blastd:.3f} x bare ({verdict} the promised {PROMISED_RATIO})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=20_000, help="messages per run")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--rounds", type=int, default=3, help="baseline+blastd pairs")
    parser.add_argument(
        "--latency-ms", type=float, nargs="+", default=[0.0, 50.0], help="sandbox latencies"
    )
    args = parser.parse_args()
    runs = uvloop.run(run_all(args.recipients, args.concurrency, args.rounds, args.latency_ms))
    console = Console(width=140)
    for latency_ms, latency_runs in runs.items():
        console.print(render(latency_runs, args.concurrency, latency_ms))
    for latency_ms, latency_runs in runs.items():
        console.print(summary(latency_runs, latency_ms))


if __name__ == "__main__":
    main()
