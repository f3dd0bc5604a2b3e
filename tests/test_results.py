"""What operators read without psql: `blastd campaigns`, `recipients`, `purge`, the pace in
`status`, the same lists over HTTP, and the web pages behind the admin token."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from blastd import exports, ledger, reports
from blastd.config import AdminSettings
from blastd.embedded import free_port
from tests.harness import (
    SandboxHandle,
    Servers,
    blast_job,
    campaign_state,
    daemon_env,
    is_ready,
    make_settings,
    numbers_from,
    run_cli,
    running_daemon,
    wait_until,
)

JOBS = "blastd:jobs"
ADMIN_TOKEN = "admin-token-for-results"
BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# The campaign `finished` sends: two sent, one refused for good, an invalid number, a duplicate.
NUMBERS = numbers_from(43_000_000, 3)
GONE = NUMBERS[2]
FINISHED_ENTRIES = [*NUMBERS, "12", NUMBERS[0]]


@pytest.fixture
def cli_env(servers: Servers, sandbox: SandboxHandle) -> dict[str, str]:
    return daemon_env(servers, sandbox.url, 0)


async def has_state(pool: ledger.Pool, campaign_id: str, state: str) -> bool:
    return await campaign_state(pool, campaign_id) == state


async def send_finished_campaign(
    redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle, campaign_id: str
) -> None:
    """Push the campaign to the running daemon and wait until it is done."""
    await sandbox.configure(fail_numbers={GONE.lstrip("+"): 131026})
    await redis.lpush(JOBS, blast_job(campaign_id, FINISHED_ENTRIES))
    await wait_until(lambda: has_state(pool, campaign_id, "done"))


async def finished_campaign(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle, name: str
) -> None:
    async with running_daemon(make_settings(servers, sandbox.url)):
        await send_finished_campaign(redis, pool, sandbox, name)


async def insert_campaign(
    pool: ledger.Pool,
    campaign_id: str,
    state: str,
    *,
    age: timedelta = timedelta(0),
    recipient_states: Sequence[str] = ("sent",),
    error_text: str | None = None,
) -> None:
    """A campaign row that ended (or was created) `age` ago, with one recipient per state."""
    at = datetime.now(UTC) - age
    finished_at = at if state in ("done", "cancelled") else None
    await pool.execute(
        "INSERT INTO campaigns (id, type, account, state, message, total, created_at, "
        "updated_at, finished_at) VALUES ($1, 'blast', 'cloud-main', $2, $3, $4, $5, $5, $6)",
        campaign_id,
        state,
        {"text": "Halo"},
        len(recipient_states),
        at,
        finished_at,
    )
    await pool.execute(
        "INSERT INTO recipients (campaign_id, seq, phone, state, error_text) "
        "SELECT $1, seq, '+62812' || lpad(seq::text, 8, '0'), state, $3 "
        "FROM unnest($2::text[]) WITH ORDINALITY AS s(state, seq)",
        campaign_id,
        list(recipient_states),
        error_text,
    )


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def by_state(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(row["state"], []).append(row)
    return grouped


# --- blastd campaigns ------------------------------------------------------------------------


async def test_help_lists_the_results_commands(cli_env: dict[str, str]) -> None:
    result = await run_cli(cli_env, "--help")
    listed = set(re.findall(r"^  (\w+)\s", result.stdout, flags=re.MULTILINE))
    assert {"campaigns", "recipients", "purge"} <= listed


async def test_campaigns_lists_newest_first_with_done_counts_state_filter_and_json(
    pool: ledger.Pool, cli_env: dict[str, str]
) -> None:
    await insert_campaign(pool, "oldest", "done", age=timedelta(days=3))
    await insert_campaign(
        pool, "middle", "paused", age=timedelta(days=2), recipient_states=("sent", "pending")
    )
    await insert_campaign(pool, "newest", "cancelled", age=timedelta(days=1))

    listed = await run_cli(cli_env, "campaigns")
    assert listed.code == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["newest", "middle", "oldest"]
    middle = lines[1].split()
    assert middle[1:5] == ["blast", "cloud-main", "paused", "1/2"]
    assert lines[0].split()[-1] != "-", "a cancelled campaign shows when it ended"
    assert middle[-1] == "-", "a paused one has not ended"

    filtered = await run_cli(
        cli_env, "campaigns", "--state", "done", "--state", "paused", "--json", "--limit", "1"
    )
    assert filtered.code == 0, filtered.stderr
    [only] = orjson.loads(filtered.stdout)
    assert (only["id"], only["state"], only["done"], only["total"]) == ("middle", "paused", 1, 2)
    assert only["finished_at"] is None

    none = await run_cli(cli_env, "campaigns", "--state", "running")
    assert (none.code, none.stdout.strip()) == (0, "no campaigns")


# --- blastd recipients -----------------------------------------------------------------------


async def test_recipients_exports_states_errors_skip_reasons_and_masks_numbers(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    cli_env: dict[str, str],
) -> None:
    await finished_campaign(servers, redis, pool, sandbox, "results")

    exported = await run_cli(cli_env, "recipients", "results", "--csv")
    assert exported.code == 0, exported.stderr
    rows = csv_rows(exported.stdout)
    assert list(rows[0]) == list(exports.RECIPIENT_FIELDS)
    assert [row["seq"] for row in rows] == ["0", "1", "2", "3", "4"]
    states = by_state(rows)
    assert sorted(states) == ["failed", "sent", "skipped"]
    [failed] = states["failed"]
    assert (failed["error_class"], failed["error_code"]) == ("permanent", "131026")
    assert failed["error_text"], "the provider's text is kept"
    assert failed["attempts"] == "1"
    skip_reasons = sorted(row["skip_reason"] for row in states["skipped"])
    assert skip_reasons[0] == "duplicate"
    assert skip_reasons[1].startswith("invalid number")
    assert all(row["error_text"] == "" for row in states["skipped"])
    assert failed["number"] == "+628******0002", "masked as in the logs"
    assert all(number not in exported.stdout for number in NUMBERS)

    whole = await run_cli(cli_env, "recipients", "results", "--csv", "--unmask")
    assert [row["number"] for row in csv_rows(whole.stdout)] == FINISHED_ENTRIES


async def test_recipients_filters_by_state_and_class_as_json_and_text(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    cli_env: dict[str, str],
) -> None:
    await finished_campaign(servers, redis, pool, sandbox, "filtered")

    failed = await run_cli(cli_env, "recipients", "filtered", "--state", "failed", "--json")
    assert failed.code == 0, failed.stderr
    [row] = orjson.loads(failed.stdout)
    assert (row["state"], row["error_code"], row["seq"]) == ("failed", "131026", 2)

    by_class = await run_cli(cli_env, "recipients", "filtered", "--class", "permanent", "--json")
    assert [r["id"] for r in orjson.loads(by_class.stdout)] == [row["id"]]

    skipped = await run_cli(cli_env, "recipients", "filtered", "--state", "skipped")
    lines = skipped.stdout.splitlines()
    assert len(lines) == 2
    assert all(line.split("  ")[3] == "skipped" for line in lines)
    assert "duplicate" in lines[1]

    nothing = await run_cli(cli_env, "recipients", "filtered", "--state", "read", "--json")
    assert orjson.loads(nothing.stdout) == []

    missing = await run_cli(cli_env, "recipients", "no-such-campaign")
    assert missing.code == 1
    assert "no campaign 'no-such-campaign'" in missing.stderr


async def test_recipients_export_pages_through_more_rows_than_a_page(
    pool: ledger.Pool, cli_env: dict[str, str]
) -> None:
    """Two full keyset pages and a part: every row once, in id order."""
    count = 2 * exports.EXPORT_PAGE_ROWS + 7
    await insert_campaign(pool, "big", "done", recipient_states=["sent"] * count)

    exported = await run_cli(cli_env, "recipients", "big", "--csv")
    assert exported.code == 0, exported.stderr
    ids = [int(row["id"]) for row in csv_rows(exported.stdout)]
    assert len(ids) == count
    assert ids == sorted(set(ids))

    as_json = await run_cli(cli_env, "recipients", "big", "--json", "--state", "sent")
    assert len(orjson.loads(as_json.stdout)) == count


async def test_recipients_piped_into_head_stops_quietly(
    pool: ledger.Pool, cli_env: dict[str, str]
) -> None:
    """More than a pipe's buffer, read only in part: no traceback, exit code 0."""
    await insert_campaign(pool, "piped", "done", recipient_states=["sent"] * 10_000)
    command = f"{sys.executable} -m blastd recipients piped --csv | head -n 2"
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-o",
        "pipefail",
        "-c",
        command,
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert (process.returncode, stderr.decode()) == (0, "")
    assert stdout.decode().splitlines()[0] == ",".join(exports.RECIPIENT_FIELDS)


def test_csv_cells_that_a_spreadsheet_would_run_are_quoted_but_numbers_are_not() -> None:
    assert exports.csv_cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert exports.csv_cell("@SUM(A1)") == "'@SUM(A1)"
    assert exports.csv_cell("+62812*****0002") == "+62812*****0002"
    assert exports.csv_cell("-5") == "'-5"
    assert exports.csv_cell(None) == ""


# --- blastd purge ----------------------------------------------------------------------------


async def test_purge_removes_only_finished_campaigns_older_than_the_age_with_recipients(
    pool: ledger.Pool, cli_env: dict[str, str]
) -> None:
    old = timedelta(days=40)
    await insert_campaign(pool, "old-done", "done", age=old, recipient_states=["sent"] * 3)
    await insert_campaign(pool, "old-cancelled", "cancelled", age=old)
    await insert_campaign(pool, "old-stopped", "stopped", age=old)
    await insert_campaign(pool, "old-paused", "paused", age=old)
    await insert_campaign(pool, "old-running", "running", age=old)
    await insert_campaign(pool, "new-done", "done", age=timedelta(days=2))

    dry = await run_cli(cli_env, "purge", "--older-than", "30d", "--dry-run")
    assert dry.code == 0, dry.stderr
    purged = {line.split()[0] for line in dry.stdout.splitlines()[:-1]}
    assert purged == {"old-done", "old-cancelled", "old-stopped"}
    assert dry.stdout.splitlines()[-1] == "would remove 3 campaign(s), 5 recipient(s)"
    assert await pool.fetchval("SELECT count(*) FROM campaigns") == 6

    done = await run_cli(cli_env, "purge", "--older-than", "4w")
    assert done.code == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "removed 3 campaign(s), 5 recipient(s)"
    left = await pool.fetch("SELECT id FROM campaigns ORDER BY id")
    assert [r["id"] for r in left] == ["new-done", "old-paused", "old-running"]
    orphans = await pool.fetchval(
        "SELECT count(*) FROM recipients WHERE campaign_id LIKE 'old-%' "
        "AND campaign_id NOT IN ('old-paused', 'old-running')"
    )
    assert orphans == 0

    again = await run_cli(cli_env, "purge", "--older-than", "1d")
    assert again.stdout.splitlines() == [
        again.stdout.splitlines()[0],
        "removed 1 campaign(s), 1 recipient(s)",
    ]
    assert again.stdout.startswith("new-done  done  ended ")


async def test_purge_refuses_a_duration_it_cannot_read(cli_env: dict[str, str]) -> None:
    result = await run_cli(cli_env, "purge", "--older-than", "30 days")
    assert result.code == 2
    assert "is not a duration" in result.stderr


def test_durations_add_up_their_units() -> None:
    assert exports.parse_duration("30d") == timedelta(days=30)
    assert exports.parse_duration("1w2d3h") == timedelta(days=9, hours=3)
    with pytest.raises(ValueError, match="not a duration"):
        exports.parse_duration("d30")


# --- pace in blastd status -------------------------------------------------------------------


def test_pace_is_the_overall_rate_and_the_time_left_at_it() -> None:
    created = datetime(2026, 1, 1, tzinfo=UTC)
    report = {
        "created_at": created.isoformat(),
        "finished_at": None,
        "state": "running",
        "done": 100,
        "total": 400,
    }
    now = created + timedelta(seconds=50)
    assert reports.pace(report, now) == reports.Pace(2.0, 150.0)
    finished = {**report, "state": "done", "done": 400, "finished_at": (now).isoformat()}
    assert reports.pace(finished, now + timedelta(hours=1)) == reports.Pace(8.0, None)
    assert reports.pace({**report, "done": 0}, now) == reports.Pace(None, None)
    assert reports.describe_pace(reports.Pace(2.0, 150.0)) == "rate 2.0/s, eta 2m30s"


async def test_status_prints_the_rate_and_a_running_campaigns_eta(
    pool: ledger.Pool, cli_env: dict[str, str]
) -> None:
    await insert_campaign(
        pool,
        "halfway",
        "running",
        age=timedelta(minutes=10),
        recipient_states=["sent"] * 3 + ["pending"] * 3,
    )
    result = await run_cli(cli_env, "status", "halfway")
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "running, 3/6 done" in lines[0]
    pace = re.fullmatch(r"rate 0\.005/s, eta (\d+)m(\d\d)s", lines[1])
    assert pace is not None, lines[1]
    assert 600 <= int(pace[1]) * 60 + int(pace[2]) <= 660, "3 left at 3 per 10 minutes"


# --- over HTTP -------------------------------------------------------------------------------


def base_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def admin_daemon(
    servers: Servers, sandbox: SandboxHandle, port: int
) -> AsyncIterator[aiohttp.ClientSession]:
    """The daemon with the admin token set, and a client session for its admin server."""
    admin = AdminSettings.model_validate({"port": port, "token": ADMIN_TOKEN})
    async with running_daemon(make_settings(servers, sandbox.url, admin=admin)):
        await wait_until(lambda: is_ready(port))
        # unsafe: the jar keeps cookies of an IP address such as 127.0.0.1 too, as browsers do
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            yield http


async def test_v1_campaigns_and_recipients_match_the_cli(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    cli_env: dict[str, str],
) -> None:
    port = free_port()
    url = base_url(port)
    async with admin_daemon(servers, sandbox, port) as http:
        await send_finished_campaign(redis, pool, sandbox, "over-http")
        async with http.get(f"{url}/v1/campaigns?state=done&limit=5", headers=BEARER) as r:
            assert r.status == 200
            listed = await r.json()
        recipients_url = f"{url}/v1/campaigns/over-http/recipients"
        async with http.get(recipients_url, headers=BEARER) as r:
            assert (r.status, r.content_type) == (200, "application/json")
            as_json = orjson.loads(await r.read())
        async with http.get(f"{recipients_url}?format=csv&state=failed", headers=BEARER) as r:
            assert r.content_type == "text/csv"
            disposition = r.headers["Content-Disposition"]
            failed_csv = await r.text()
        async with http.get(f"{recipients_url}?state=skipped&unmask=1", headers=BEARER) as r:
            unmasked = orjson.loads(await r.read())
        for bad, status in (("?state=nope", 400), ("?format=xml", 400)):
            async with http.get(recipients_url + bad, headers=BEARER) as r:
                assert r.status == status, bad
        async with http.get(f"{url}/v1/campaigns/none/recipients", headers=BEARER) as r:
            assert r.status == 404
        async with http.get(recipients_url) as r:
            assert r.status == 401

    printed = await run_cli(cli_env, "campaigns", "--json", "--state", "done")
    assert listed == orjson.loads(printed.stdout)
    assert [c["id"] for c in listed] == ["over-http"]
    printed = await run_cli(cli_env, "recipients", "over-http", "--json")
    assert as_json == orjson.loads(printed.stdout)
    assert disposition == 'attachment; filename="over-http-recipients.csv"'
    [failed] = csv_rows(failed_csv)
    assert (failed["state"], failed["error_code"]) == ("failed", "131026")
    assert sorted(row["number"] for row in unmasked) == sorted(["12", NUMBERS[0]])


# --- the web pages ---------------------------------------------------------------------------


async def test_pages_need_the_token_as_bearer_or_as_the_login_forms_cookie(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    port = free_port()
    url = base_url(port)
    async with admin_daemon(servers, sandbox, port) as http:
        async with http.get(f"{url}/ui", allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (303, "/ui/login")
        async with http.get(f"{url}/ui?token={ADMIN_TOKEN}", allow_redirects=False) as r:
            assert r.status == 303, "never a token in the query string"
        async with http.get(f"{url}/ui", headers=BEARER) as r:
            assert r.status == 200
        async with http.get(f"{url}/ui/login") as r:
            assert r.status == 200
            assert 'type="password"' in await r.text()
        form = {"token": "wrong"}
        async with http.post(f"{url}/ui/login", data=form, allow_redirects=False) as r:
            assert r.status == 401
            assert "wrong token" in await r.text()
        form = {"token": ADMIN_TOKEN}
        async with http.post(f"{url}/ui/login", data=form, allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (303, "/ui")
            cookie = r.headers["Set-Cookie"]
        async with http.get(f"{url}/ui/dead", allow_redirects=False) as r:
            assert r.status == 200, "the session cookie lets the browser in"
        async with http.get(f"{url}/v1/campaigns", allow_redirects=False) as r:
            assert r.status == 401, "the cookie is for the pages only"
        async with http.post(f"{url}/ui/logout", allow_redirects=False) as r:
            assert r.status == 303
        async with http.get(f"{url}/ui/dead", allow_redirects=False) as r:
            assert r.status == 303, "logged out"
    attributes = [part.strip().lower() for part in cookie.split(";")]
    assert attributes[0] == f"blastd_admin={ADMIN_TOKEN}".lower()
    assert {"httponly", "samesite=strict", "path=/ui"} <= set(attributes)


async def test_pages_show_campaigns_recipients_with_filters_and_dead_letters(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    port = free_port()
    url = base_url(port)
    async with admin_daemon(servers, sandbox, port) as http:
        await send_finished_campaign(redis, pool, sandbox, "on-the-page")
        await redis.lpush(JOBS, b"this is not json")
        await wait_until(lambda: redis.llen("blastd:dead"))
        async with http.get(f"{url}/ui", headers=BEARER) as r:
            assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")
            campaigns_page = await r.text()
        campaign_url = f"{url}/ui/campaigns/on-the-page"
        async with http.get(campaign_url, headers=BEARER) as r:
            campaign_page = await r.text()
        async with http.get(f"{campaign_url}?state=failed&class=", headers=BEARER) as r:
            failed_page = await r.text()
        async with http.get(f"{campaign_url}/recipients.csv?state=skipped", headers=BEARER) as r:
            assert r.headers["Content-Disposition"].startswith("attachment")
            skipped_csv = await r.text()
        async with http.get(f"{url}/ui/campaigns/nope", headers=BEARER) as r:
            assert r.status == 404
        async with http.get(f"{url}/ui/dead", headers=BEARER) as r:
            dead_page = await r.text()

    assert '<a href="/ui/campaigns/on-the-page">on-the-page</a>' in campaigns_page
    assert '<progress value="5" max="5"></progress> 5/5' in campaigns_page
    for state in ("sent", "failed", "skipped"):
        assert f'<span class="state-{state}">{state}</span>' in campaign_page
    assert "131026" in campaign_page
    assert "duplicate" in campaign_page
    assert "+628******0002" in campaign_page
    assert NUMBERS[0] not in campaign_page
    assert 'href="/ui/campaigns/on-the-page/recipients.csv"' in campaign_page
    assert failed_page.count("<tr>") == 2, "the header and the one failed recipient"
    assert 'href="/ui/campaigns/on-the-page/recipients.csv?state=failed"' in failed_page
    assert {row["state"] for row in csv_rows(skipped_csv)} == {"skipped"}
    assert "invalid JSON" in dead_page


async def test_pages_escape_what_the_ledger_holds_and_page_through_recipients(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    hostile = '<script>alert("x")</script>'
    await insert_campaign(
        pool,
        'odd<id>&"',
        "done",
        recipient_states=["failed"] * 201,
        error_text=hostile,
    )
    port = free_port()
    url = base_url(port)
    async with admin_daemon(servers, sandbox, port) as http:
        async with http.get(f"{url}/ui", headers=BEARER) as r:
            listing = await r.text()
        async with http.get(f"{url}/ui/campaigns/odd%3Cid%3E%26%22", headers=BEARER) as r:
            assert r.status == 200
            first = await r.text()
        next_link = first.split('<a href="')[-1].split('"')[0].replace("&amp;", "&")
        async with http.get(url + next_link, headers=BEARER) as r:
            second = await r.text()
    assert "<script>" not in listing + first
    assert "odd&lt;id&gt;&amp;&quot;" in listing
    assert 'href="/ui/campaigns/odd%3Cid%3E%26%22"' in listing
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in first
    assert first.count("<tr>") == 201, "the header and a page of 200"
    assert next_link.endswith("after=200")
    assert second.count("<tr>") == 2, "the last recipient"


# --- the demo's last word --------------------------------------------------------------------


async def test_demo_ends_by_saying_why_recipients_were_not_reached(tmp_path: Path) -> None:
    """Its own servers, sandbox and daemon, on a small file with a duplicate and a bad number."""
    numbers = numbers_from(46_000_000, 3)
    rows = [f"{number};N{i};C{i}" for i, number in enumerate([*numbers, numbers[1], "12345"])]
    path = tmp_path / "small.csv"
    path.write_text("\n".join(["phone;name;code", *rows]) + "\n")
    env = {name: value for name, value in os.environ.items() if not name.startswith("BLASTD_")}

    result = await run_cli(env, "demo", "--recipients", str(path), "--rate", "50", timeout_s=240)

    assert result.code == 0, result.stderr
    why = result.stdout.split("why the others were not reached:")[1]
    # A table's first line per row: rich wraps the long cells to the lines below.
    skipped = [line.split("│") for line in why.splitlines() if "│ skipped" in line]
    reasons = {cells[2].strip().split(":")[0]: cells for cells in skipped}
    assert set(reasons) == {"duplicate", "invalid number"}
    assert reasons["duplicate"][3].strip() == "1"
    assert reasons["duplicate"][4].strip() == "+628******0001", "an example, masked"
    assert reasons["invalid number"][4].strip() == "12345"
