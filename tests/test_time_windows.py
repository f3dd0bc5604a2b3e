"""Time options of a blast: a sending window in the recipient's local time, and not_after.

Windows are computed from the current UTC time with margins of hours, so a test never depends
on when it runs or how fast the machine is: Jakarta (UTC+7) and São Paulo (UTC-3) are ten
hours apart, and a five-hour window around Jakarta's current hour never includes São Paulo's.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from blastd import ledger
from blastd.errors import InvalidJobError
from blastd.job_fields import BlastOptions, SendWindow
from blastd.jobs import BlastJob, parse_job
from blastd.recipients import time_zone_of
from tests.harness import (
    SandboxHandle,
    Servers,
    blast_job,
    campaign_counts,
    campaign_state,
    events_named,
    has_state,
    make_settings,
    numbers_from,
    recipient_rows,
    running_daemon,
    wait_until,
)

JOBS = "blastd:jobs"
JAKARTA, SAO_PAULO = "Asia/Jakarta", "America/Sao_Paulo"
BRAZIL_NUMBERS = [f"+55119876543{n:02d}" for n in range(3)]  # São Paulo mobiles


def window_around_now(zone: str) -> dict[str, str]:
    """From 2 hours before to 3 hours after the current hour in `zone`: open there for hours."""
    hour = datetime.now(UTC).astimezone(ZoneInfo(zone)).replace(minute=0, second=0, microsecond=0)
    start, end = hour - timedelta(hours=2), hour + timedelta(hours=3)
    return {"start": start.strftime("%H:%M"), "end": end.strftime("%H:%M")}


async def test_window_sends_only_to_recipients_whose_local_time_is_inside_it(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    indonesian = numbers_from(42_000_000, 4)
    window = window_around_now(JAKARTA)
    job = blast_job("windowed", indonesian + BRAZIL_NUMBERS, options={"window": window})
    settings = make_settings(servers, sandbox.url)
    with capture_logs() as logs:
        async with running_daemon(settings):
            await redis.lpush(JOBS, job)
            await wait_until(lambda: events_named(logs, "campaign_waiting"))
            counts = await campaign_counts(pool, "windowed")
            state = await campaign_state(pool, "windowed")
    assert counts == {"sent": 4, "pending": 3}
    assert state == "running", "recipients outside the window keep the campaign open"
    accepted = await sandbox.recipients()
    assert accepted == {n.lstrip("+"): 1 for n in indonesian}
    zones = {row["phone"]: row["time_zone"] for row in await recipient_rows(pool, "windowed")}
    assert zones == {
        **dict.fromkeys(indonesian, JAKARTA),
        **dict.fromkeys(BRAZIL_NUMBERS, SAO_PAULO),
    }
    [waiting] = events_named(logs, "campaign_waiting")
    assert (waiting["window_start"], waiting["window_end"], waiting["time_zones"]) == (
        window["start"],
        window["end"],
        1,
    )


async def test_campaign_without_a_window_stores_no_time_zone(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    settings = make_settings(servers, sandbox.url)
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("anytime", numbers_from(42_100_000, 2) + BRAZIL_NUMBERS))
        await wait_until(lambda: has_state(pool, "anytime", "done"))
    rows = await recipient_rows(pool, "anytime")
    assert [(row["state"], row["time_zone"]) for row in rows] == [("sent", None)] * 5


async def test_not_after_in_the_past_expires_every_pending_recipient_and_finishes(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    not_after = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    numbers = numbers_from(42_200_000, 5)
    job = blast_job("too-late", [*numbers, "not a number"], options={"not_after": not_after})
    settings = make_settings(servers, sandbox.url)
    with capture_logs() as logs:
        async with running_daemon(settings):
            await redis.lpush(JOBS, job)
            await wait_until(lambda: has_state(pool, "too-late", "done"))
    assert await campaign_counts(pool, "too-late") == {"expired": 5, "skipped": 1}
    rows = await recipient_rows(pool, "too-late")
    assert {row["error_text"] for row in rows if row["state"] == "expired"} == {
        "not sent before not_after"
    }
    assert (await sandbox.stats())["requests"] == 0
    [expired] = events_named(logs, "recipients_expired")
    assert expired["count"] == 5


async def test_not_after_ends_a_campaign_waiting_outside_its_window(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    options = {
        "window": window_around_now(JAKARTA),
        "not_after": (datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
    }
    settings = make_settings(servers, sandbox.url)
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("closed", BRAZIL_NUMBERS, options=options))
        await wait_until(lambda: has_state(pool, "closed", "done"))
    assert await campaign_counts(pool, "closed") == {"expired": 3}
    assert (await sandbox.stats())["requests"] == 0


# --- the window itself -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "inside", "outside"),
    [
        ("09:00", "20:00", ["09:00", "12:30", "19:59"], ["08:59", "20:00", "23:00", "00:00"]),
        ("21:00", "06:00", ["21:00", "23:59", "00:00", "05:59"], ["06:00", "12:00", "20:59"]),
    ],
)
def test_window_includes_its_start_excludes_its_end_and_may_wrap_past_midnight(
    start: str, end: str, inside: list[str], outside: list[str]
) -> None:
    window = SendWindow(start=start, end=end)
    assert [window.contains(time.fromisoformat(t)) for t in inside] == [True] * len(inside)
    assert [window.contains(time.fromisoformat(t)) for t in outside] == [False] * len(outside)


@pytest.mark.parametrize(
    ("number", "zone"),
    [
        ("+6281212345678", "Asia/Jakarta"),
        ("+5511987654321", "America/Sao_Paulo"),
        ("+12125550100", "America/New_York"),
        ("+442079460000", "Europe/London"),
        ("+80012345678", "UTC"),  # a non-geographic code: libphonenumber knows no zone
    ],
)
def test_time_zone_comes_from_the_number(number: str, zone: str) -> None:
    assert time_zone_of(number) == zone


def parse_options(options: dict[str, Any]) -> BlastOptions:
    job = {
        "type": "blast",
        "id": "opts",
        "account": "main",
        "message": {"text": "hi"},
        "recipients": [{"to": "+6281212345678"}],
        "options": options,
    }
    parsed = parse_job(
        orjson.dumps(job),
        max_bytes=100_000,
        accounts=["main"],
        max_inline_recipients=10,
        default_region="ID",
    )
    assert isinstance(parsed, BlastJob)
    return parsed.options


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"window": {"start": "9:00", "end": "20:00"}}, "options.window.start: must be HH:MM"),
        ({"window": {"start": "09:00", "end": "24:00"}}, "options.window.end: must be HH:MM"),
        ({"window": {"start": "09:00", "end": "09:00"}}, "options.window: start and end must"),
        ({"window": {"start": "09:00"}}, "missing options.window.end"),
        ({"window": {"start": "09:00", "end": "20:00", "tz": "UTC"}}, "unknown field"),
        ({"not_after": "2026-01-01T00:00:00"}, "options.not_after: needs a timezone"),
        (
            {"not_before": "2026-01-02T00:00:00Z", "not_after": "2026-01-01T00:00:00Z"},
            "options: not_after must be later than not_before",
        ),
    ],
)
def test_invalid_time_options_are_rejected_with_a_reason(
    options: dict[str, Any], reason: str
) -> None:
    with pytest.raises(InvalidJobError) as caught:
        parse_options(options)
    assert caught.value.reason.startswith(reason)


def test_valid_time_options_are_accepted_and_kept_in_utc() -> None:
    options = parse_options(
        {
            "window": {"start": "21:00", "end": "06:00"},
            "not_before": "2026-01-01T00:00:00+07:00",
            "not_after": "2026-01-02T00:00:00+07:00",
        }
    )
    assert options.window == SendWindow(start="21:00", end="06:00")
    assert options.not_after == datetime(2026, 1, 1, 17, tzinfo=UTC)
