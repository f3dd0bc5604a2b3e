"""What operators read: a campaign's status, its progress bar, and the connectivity check."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from blastd import ledger, outages
from blastd.config import Settings
from blastd.errors import RedisUnavailableError
from blastd.redis_client import open_redis

FOLLOW_INTERVAL_S = 0.5


async def campaign_status(pool: ledger.Pool, campaign_id: str) -> dict[str, Any] | None:
    """The campaign's state and its count of recipients per state; None if there is none."""
    campaign = await ledger.load_campaign(pool, campaign_id)
    if campaign is None:
        return None
    counts = await ledger.count_states(pool, campaign_id)
    active = sum(counts.get(state, 0) for state in ledger.ACTIVE_STATES)
    return {
        "id": campaign.id,
        "account": campaign.account,
        "state": campaign.state,
        "state_reason": campaign.state_reason,
        "total": campaign.total,
        "done": campaign.total - active,
        "counts": dict(sorted(counts.items())),
        "created_at": campaign.created_at.isoformat(),
        "finished_at": campaign.finished_at.isoformat() if campaign.finished_at else None,
    }


async def follow_campaign(pool: ledger.Pool, campaign_id: str) -> dict[str, Any]:
    """Show a progress bar until the campaign stops running; return its last status.

    A campaign the daemon has not created yet (its job is still queued) is waited for.
    """
    report = await campaign_status(pool, campaign_id)
    console = Console(stderr=True)
    if report is None:
        console.print(f"waiting for campaign {campaign_id!r} (is its job queued?)")
    while report is None:
        await asyncio.sleep(FOLLOW_INTERVAL_S)
        report = await campaign_status(pool, campaign_id)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(campaign_id, total=report["total"], detail="")
        while True:
            progress.update(task, completed=report["done"], detail=_detail(report["counts"]))
            if report["state"] != "running":
                return report
            await asyncio.sleep(FOLLOW_INTERVAL_S)
            report = await campaign_status(pool, campaign_id) or report


def _detail(counts: dict[str, int]) -> str:
    return " ".join(f"{state}={n}" for state, n in sorted(counts.items()) if n)


def print_status(report: dict[str, Any]) -> None:
    console = Console()
    reason = f" ({report['state_reason']})" if report["state_reason"] else ""
    console.print(
        f"campaign [bold]{report['id']}[/] on {report['account']}: "
        f"{report['state']}{reason}, {report['done']}/{report['total']} done"
    )
    table = Table("state", "recipients")
    for state, n in report["counts"].items():
        table.add_row(state, str(n))
    console.print(table)


@dataclass
class CheckResult:
    lines: list[str] = field(default_factory=list)
    failed: bool = False

    def add(self, ok: bool, what: str, detail: str = "") -> None:
        self.lines.append(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")
        self.failed = self.failed or not ok


async def check_connectivity(settings: Settings) -> CheckResult:
    """Configuration is already valid here; reach each dependency and each provider host."""
    result = CheckResult()
    result.add(True, "configuration", f"{len(settings.accounts)} account(s)")
    try:
        async with open_redis(settings) as client:
            await outages.on_redis(client.ping)
        result.add(True, "redis")
    except RedisUnavailableError as exc:
        result.add(False, "redis", type(exc.__cause__).__name__)
    try:
        pool = await ledger.open_pool(settings.database_url, command_timeout_s=5, max_size=1)
        await pool.close()
        result.add(True, "postgres")
    except (*outages.DB_OUTAGE_ERRORS, asyncpg.PostgresError) as exc:
        result.add(False, "postgres", type(exc).__name__)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        for name, account in settings.accounts.items():
            try:
                async with http.get(account.base_url) as response:
                    result.add(
                        True, f"account {name}", f"{account.base_url} answered {response.status}"
                    )
            except (aiohttp.ClientError, TimeoutError) as exc:
                result.add(False, f"account {name}", f"{account.base_url}: {type(exc).__name__}")
    return result
