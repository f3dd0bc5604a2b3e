"""What the failover tests share: a real daemon paced through Redis, and the campaign's
figures read from the sandbox's own tally and the ledger after a server failed under it."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from blastd import ledger
from blastd.embedded import free_port
from tests.harness import (
    ACCOUNT,
    APP_SECRET,
    PHONE_NUMBER_ID,
    TOKEN,
    SandboxHandle,
    Servers,
    campaign_state,
    daemon_env,
    is_ready,
    spawn_daemon,
    wait_until,
)

RECIPIENTS = 2_000
RATE_PER_S = 250  # the campaign lasts ~8 s: the failure lands in its middle
SENT_BEFORE_FAILURE = 400


@dataclass(frozen=True)
class Figures:
    recipients: int
    lost: int  # recipients never in a final state
    unflagged_duplicates: int  # received twice, or received while the ledger says otherwise
    failure_to_next_send_s: float | None
    # The longest pause between two sends from the failure on: how long sending stopped.
    longest_pause_s: float | None

    def report(self, what: str) -> str:
        return (
            f"\n{what}: recipients {self.recipients}; lost {self.lost}; "
            f"unflagged duplicates {self.unflagged_duplicates}; "
            f"failure to next send {_seconds(self.failure_to_next_send_s)}; "
            f"longest pause in sending after it {_seconds(self.longest_pause_s)}"
        )


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def paced_env(
    servers: Servers, sandbox: SandboxHandle, admin_port: int, **extra: str
) -> dict[str, str]:
    """A daemon whose account is paced at RATE_PER_S through Redis (the shared pacer), with
    short reconnect intervals."""
    account = {
        "kind": "cloud_api",
        "base_url": sandbox.url,
        "phone_number_id": PHONE_NUMBER_ID,
        "token": TOKEN,
        "app_secret": APP_SECRET,
        "rate_per_s": RATE_PER_S,
        "concurrency": 20,
    }
    return daemon_env(
        servers,
        sandbox.url,
        admin_port,
        BLASTD_ACCOUNTS=orjson.dumps({ACCOUNT: account}).decode(),
        BLASTD_DEPENDENCY_RETRY_S="0.2",
        BLASTD_DB_COMMAND_TIMEOUT_S="2",
        **extra,
    )


def blast(job_id: str) -> bytes:
    numbers = [f"+62815{n:08d}" for n in range(30_000_000, 30_000_000 + RECIPIENTS)]
    job: dict[str, Any] = {
        "type": "blast",
        "id": job_id,
        "account": ACCOUNT,
        "message": {"text": "hi"},
        "recipients": [{"to": n} for n in numbers],
    }
    return orjson.dumps(job)


class RunningDaemon:
    """A real `blastd run`, stopped with SIGTERM (and checked to exit 0) on the way out."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.admin_port = int(env["BLASTD_ADMIN__PORT"])

    async def __aenter__(self) -> RunningDaemon:
        self.process = spawn_daemon(self.env, self.log_path)
        await wait_until(lambda: is_ready(self.admin_port), timeout_s=30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(self.process.wait, 30)
        assert code == 0, self.log_path.read_text()[-3000:]


def admin_port() -> int:
    return free_port()


async def wait_for_sends(sandbox: SandboxHandle, count: int) -> None:
    async def enough() -> bool:
        return len(await arrivals(sandbox)) >= count

    await wait_until(enough, timeout_s=30)


async def arrivals(sandbox: SandboxHandle) -> list[float]:
    async with sandbox.http.get(f"{sandbox.url}/_sandbox/arrivals") as response:
        stamps: list[float] = await response.json()
        return stamps


async def wait_done(pool: ledger.Pool, campaign_id: str, timeout_s: float = 60) -> None:
    async def done() -> bool:
        return await campaign_state(pool, campaign_id) == "done"

    await wait_until(done, timeout_s=timeout_s, interval_s=0.2)


async def figures(
    pool: ledger.Pool, sandbox: SandboxHandle, campaign_id: str, failed_at: float | None
) -> Figures:
    """`failed_at` is time.monotonic() when the server failed: the sandbox (in this process)
    stamps its arrivals on the same clock."""
    rows = await pool.fetch(
        "SELECT phone, state FROM recipients WHERE campaign_id = $1", campaign_id
    )
    received = await sandbox.recipients()
    lost = RECIPIENTS - sum(1 for row in rows if row["state"] in ledger.FINAL_STATES)
    states = {row["phone"].lstrip("+"): row["state"] for row in rows}
    unflagged = sum(
        1
        for phone, count in received.items()
        if count > 1 or states.get(phone) not in ("sent", "uncertain")
    )
    gap = pause = None
    if failed_at is not None:
        after = sorted(stamp for stamp in await arrivals(sandbox) if stamp > failed_at)
        if after:
            gap = after[0] - failed_at
            pause = max(b - a for a, b in zip([failed_at, *after], after, strict=False))
    return Figures(RECIPIENTS, lost, unflagged, gap, pause)


def now() -> float:
    return time.monotonic()
