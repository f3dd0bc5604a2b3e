"""What operators read: a campaign's status, pace and progress bar, the lines of the campaign
list and of a purge, why recipients were not reached, and the connectivity check."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
import asyncpg
import orjson
import redis.exceptions
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from blastd import exports, ledger, outages
from blastd.config import (
    AccountSettings,
    CloudApiAccount,
    DidAccount,
    Settings,
    UltraMsgAccount,
    WablasAccount,
)
from blastd.errors import RedisUnavailableError
from blastd.redis_client import open_redis

FOLLOW_INTERVAL_S = 0.5
# Redis away, or answering with an error (a password it refuses): either fails the check.
CHECK_REDIS_ERRORS: tuple[type[BaseException], ...] = (
    *outages.REDIS_OUTAGE_ERRORS,
    redis.exceptions.RedisError,
    RedisUnavailableError,  # open_redis and on_redis translate what they see
)
D = TypeVar("D")  # what a lookup of a dead-lettered job returns


async def campaign_status(pool: ledger.Pool, campaign_id: str) -> dict[str, Any] | None:
    """The campaign's state and its count of recipients per state; None if there is none."""
    campaign = await ledger.load_campaign(pool, campaign_id)
    if campaign is None:
        return None
    counts, flags = await ledger.count_states_and_flags(pool, campaign_id)
    active = sum(counts.get(state, 0) for state in ledger.ACTIVE_STATES)
    return {
        "id": campaign.id,
        "account": campaign.account,
        "state": campaign.state,
        "state_reason": campaign.state_reason,
        # False while recipients are still being taken in: total grows until then.
        "intake_complete": campaign.intake_complete,
        "total": campaign.total,
        "done": campaign.total - active,
        "counts": dict(sorted(counts.items())),
        # possible_duplicate: sent again after doubt; delivered_after_failure: a receipt came
        # for a recipient recorded failed or uncertain. Only the flags some recipient has.
        "flags": flags,
        "created_at": campaign.created_at.isoformat(),
        "finished_at": campaign.finished_at.isoformat() if campaign.finished_at else None,
    }


async def follow_campaign(
    pool: ledger.Pool,
    campaign_id: str,
    find_dead: Callable[[], Awaitable[D | None]] | None = None,
) -> dict[str, Any] | D:
    """Show a progress bar until the campaign stops running; return its last status.

    A campaign the daemon has not created yet (its job is still queued) is waited for, until
    `find_dead` finds its job dead-lettered: that entry is returned.
    """
    report = await campaign_status(pool, campaign_id)
    console = Console(stderr=True)
    if report is None:
        console.print(f"waiting for campaign {campaign_id!r} (is its job queued?)")
    while report is None:
        if find_dead is not None and (dead := await find_dead()):
            return dead
        await asyncio.sleep(FOLLOW_INTERVAL_S)
        report = await campaign_status(pool, campaign_id)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
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


class RateColumn(ProgressColumn):
    """Recipients finished per second, over rich's recent window of updates."""

    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text("-/s" if speed is None else f"{speed:.1f}/s")


@dataclass(frozen=True, slots=True)
class Pace:
    """How fast a campaign goes: recipients finished per second since it was created (until
    it finished), and for a running one the time left at that rate."""

    rate_per_s: float | None
    eta_s: float | None


def pace(report: dict[str, Any], now: datetime) -> Pace:
    """The overall rate of a status report, and its ETA; None where it cannot be told yet."""
    created_at = datetime.fromisoformat(report["created_at"])
    finished = report["finished_at"]
    end = datetime.fromisoformat(finished) if finished else now
    elapsed_s = (end - created_at).total_seconds()
    if elapsed_s <= 0 or report["done"] == 0:
        return Pace(None, None)
    rate_per_s = report["done"] / elapsed_s
    left = report["total"] - report["done"]
    eta_s = left / rate_per_s if report["state"] == "running" else None
    return Pace(rate_per_s, eta_s)


def describe_pace(value: Pace) -> str:
    rate = "-" if value.rate_per_s is None else f"{_rate(value.rate_per_s)}/s"
    eta = "" if value.eta_s is None else f", eta {_duration(value.eta_s)}"
    return f"rate {rate}{eta}"


def _rate(per_s: float) -> str:
    return f"{per_s:.1f}" if per_s >= 1 else f"{per_s:.3f}"  # a slow campaign is not "0.0"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def print_status(report: dict[str, Any]) -> None:
    console = Console()
    reason = f" ({report['state_reason']})" if report["state_reason"] else ""
    intake = "" if report["intake_complete"] else ", recipients still being taken in"
    console.print(
        f"campaign [bold]{report['id']}[/] on {report['account']}: "
        f"{report['state']}{reason}, {report['done']}/{report['total']} done{intake}"
    )
    console.print(describe_pace(pace(report, datetime.now(UTC))), highlight=False)
    table = Table("state", "recipients")
    for state, n in report["counts"].items():
        table.add_row(state, str(n))
    console.print(table)
    for flag, n in report["flags"].items():
        console.print(f"flagged {flag}: {n}")


def campaign_line(line: exports.CampaignLine) -> str:
    """One campaign on one line: id, type, account, state (reason), done/total, created,
    finished; '-' for what is not set."""
    reason = f" ({line.state_reason})" if line.state_reason else ""
    intake = "" if line.intake_complete else " (taking in)"
    finished = _moment(line.finished_at) if line.finished_at else "-"
    return (
        f"{line.id}  {line.type}  {line.account}  {line.state}{reason}{intake}  "
        f"{line.done}/{line.total}  {_moment(line.created_at)}  {finished}"
    )


def purged_line(campaign: exports.Purged) -> str:
    return (
        f"{campaign.id}  {campaign.state}  ended {_moment(campaign.finished_at)}  "
        f"{campaign.total} recipient(s)"
    )


def _moment(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="seconds")


def print_reasons(reasons: list[exports.Reason]) -> None:
    """Why recipients were not reached: state, reason, count, one example."""
    console = Console()
    if not reasons:
        console.print("every recipient was reached")
        return
    table = Table("state", "code or skip reason", "recipients", "example")
    for reason in reasons:
        example = reason.example_number
        if reason.example_text and reason.example_text != reason.reason:
            example += f": {reason.example_text}"
        # Text, not markup: provider texts and raw input may hold brackets.
        table.add_row(Text(reason.state), Text(reason.reason), str(reason.count), Text(example))
    console.print(table)


@dataclass
class CheckResult:
    lines: list[str] = field(default_factory=list)
    failed: bool = False

    def add(self, ok: bool, what: str, detail: str = "") -> None:
        self.lines.append(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")
        self.failed = self.failed or not ok


async def check_connectivity(settings: Settings) -> CheckResult:
    """Configuration is already valid here; reach each dependency, and prove each account's
    credentials with a call that changes nothing where the provider has one."""
    result = CheckResult()
    result.add(True, "configuration", f"{len(settings.accounts)} account(s)")
    await _check_redis(settings, result)
    await _check_postgres(settings, result)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for name, account in settings.accounts.items():
            ok, detail = await _check_account(http, account)
            result.add(ok, f"account {name}", detail)
    return result


async def _check_redis(settings: Settings, result: CheckResult) -> None:
    try:
        async with open_redis(settings) as client:
            await outages.on_redis(client.ping)
        result.add(True, "redis")
    except CHECK_REDIS_ERRORS as exc:
        hint = "is redis-server running and BLASTD_REDIS_URL right?"
        cause = exc.__cause__ if isinstance(exc, RedisUnavailableError) else exc
        result.add(False, "redis", f"{outages.describe(cause or exc)} ({hint})")


async def _check_postgres(settings: Settings, result: CheckResult) -> None:
    try:
        pool = await ledger.open_pool(settings.database_url, command_timeout_s=5, max_size=1)
        await pool.close()
        result.add(True, "postgres")
    except (*outages.DB_OUTAGE_ERRORS, asyncpg.PostgresError) as exc:
        hint = "is PostgreSQL running, and BLASTD_DATABASE_URL's role, password, database right?"
        result.add(False, "postgres", f"{outages.describe(exc)} ({hint})")


async def _check_account(http: aiohttp.ClientSession, account: AccountSettings) -> tuple[bool, str]:
    """(ok, what was seen) for one account: its credentials where a harmless call proves them,
    else that its base URL answers."""
    probe = _credential_probe(account)
    url, headers, params = probe or (account.base_url, {}, {})
    try:
        async with http.get(url, headers=headers, params=params) as response:
            body = await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return False, f"{account.base_url}: {type(exc).__name__}"
    if probe is None:
        return True, f"{account.base_url} answered {response.status}"
    if _credentials_accepted(account, response.status, body):
        return True, f"credentials accepted by {account.base_url}"
    return False, f"credentials refused by {account.base_url} (HTTP {response.status})"


Probe = tuple[str, dict[str, str], dict[str, str]]  # url, headers, query


def _credential_probe(account: AccountSettings) -> Probe | None:
    """The provider's read-only call that needs the credentials, if it has one."""
    token = account.token.get_secret_value() if account.token else ""
    base = account.base_url.rstrip("/")
    if isinstance(account, CloudApiAccount):
        url = f"{base}/{account.api_version}/{account.phone_number_id}"
        return url, {"Authorization": f"Bearer {token}"}, {}
    if isinstance(account, UltraMsgAccount):
        return f"{base}/{account.instance_id}/instance/status", {}, {"token": token}
    if isinstance(account, WablasAccount):
        return f"{base}/api/device/info", {}, {"token": token}
    if isinstance(account, DidAccount):
        key = token if account.auth_form == "raw" else base64.b64encode(token.encode()).decode()
        return f"{base}/credits", {"Authorization": f"Basic {key}"}, {}
    return None


def _credentials_accepted(account: AccountSettings, status: int, body: bytes) -> bool:
    """UltraMsg and Wablas refuse with HTTP 200 and a body that says so."""
    if not 200 <= status < 300:
        return False
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if isinstance(account, UltraMsgAccount):
        return isinstance(answer, dict) and "error" not in answer
    if isinstance(account, WablasAccount):
        return isinstance(answer, dict) and answer.get("status") is True
    return True
