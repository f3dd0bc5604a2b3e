"""The operator's CLI as a real process: `python -m blastd ...` against the test servers."""

from __future__ import annotations

import asyncio
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openpyxl
import orjson
import pytest
import redis.asyncio as aioredis

from blastd import ledger
from blastd.embedded import free_port
from blastd.errors import EXIT_CONFIG
from tests.harness import (
    ACCOUNT,
    SandboxHandle,
    Servers,
    is_done,
    make_settings,
    run_cli,
    running_daemon,
    wait_until,
)

SUBCOMMANDS = ("run", "enqueue", "status", "migrate", "check", "sandbox", "demo")
NUMBERS = [f"+62812{n:08d}" for n in range(30_000_000, 30_000_000 + 3)]
NAMES = ["Budi", "Sari", "Tono"]


async def test_help_lists_every_subcommand(cli_env: dict[str, str]) -> None:
    result = await run_cli(cli_env, "--help")
    assert result.code == 0
    listed = set(re.findall(r"^  (\w+)\s", result.stdout, flags=re.MULTILINE))
    assert listed >= set(SUBCOMMANDS)


# --- enqueue ---------------------------------------------------------------------------------


def write_xlsx(path: Path) -> list[str]:
    """Phone and name columns; the first phone is a float cell, as Excel stores numbers."""
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.append(["Phone", "name"])
    sheet.append([float(NUMBERS[0].lstrip("+")), NAMES[0]])
    for number, name in zip(NUMBERS[1:], NAMES[1:], strict=True):
        sheet.append([number, name])
    workbook.save(path)
    return ["--template", "promo_nov", "--language", "id", "--param", "{name}", "--param", "X1"]


def write_csv(path: Path) -> list[str]:
    rows = [f"{number};{name}" for number, name in zip(NUMBERS, NAMES, strict=True)]
    path.write_text("\n".join(["phone;name", *rows]) + "\n")
    return ["--text", "Halo {name}"]


def write_json(path: Path) -> list[str]:
    entries: list[object] = [NUMBERS[0], *({"to": n, "vars": {"name": "x"}} for n in NUMBERS[1:])]
    path.write_bytes(orjson.dumps(entries))
    return ["--text", "Halo"]


WRITERS: dict[str, Callable[[Path], list[str]]] = {
    "xlsx": write_xlsx,
    "csv": write_csv,
    "json": write_json,
}


@pytest.mark.parametrize("suffix", sorted(WRITERS))
async def test_enqueue_file_pushes_a_job_with_a_filled_recipients_list_and_it_completes(
    suffix: str,
    cli_env: dict[str, str],
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> None:
    path = tmp_path / f"recipients.{suffix}"
    message_options = WRITERS[suffix](path)
    job_id = f"cli-{suffix}"

    result = await run_cli(cli_env, "enqueue", str(path), "--id", job_id, *message_options)

    assert result.code == 0, result.stderr
    assert result.stdout.strip() == job_id
    [raw] = await redis.lrange("blastd:jobs", 0, -1)
    job = orjson.loads(raw)
    assert (job["type"], job["id"], job["account"]) == ("blast", job_id, ACCOUNT)
    assert job["recipients_key"] == f"blastd:recipients:{job_id}"
    rows = [orjson.loads(r) for r in await redis.lrange(job["recipients_key"], 0, -1)]
    assert [r["to"].lstrip("+") for r in rows] == [n.lstrip("+") for n in NUMBERS]

    async with running_daemon(make_settings(servers, sandbox.url)):
        await wait_until(lambda: is_done(pool, job_id))
    assert await ledger.count_states(pool, job_id) == {"sent": len(NUMBERS)}
    assert await sandbox.recipients() == {n.lstrip("+"): 1 for n in NUMBERS}


async def test_enqueue_xlsx_personalises_template_parameters_from_columns(
    cli_env: dict[str, str], redis: aioredis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "people.xlsx"
    options = write_xlsx(path)

    result = await run_cli(cli_env, "enqueue", str(path), "--id", "xlsx-vars", *options)

    assert result.code == 0, result.stderr
    job = orjson.loads(await redis.lindex("blastd:jobs", 0))
    assert job["message"] == {
        "template": {"name": "promo_nov", "language": "id", "params": ["{name}", "X1"]}
    }
    rows = [orjson.loads(r) for r in await redis.lrange(job["recipients_key"], 0, -1)]
    assert rows[0] == {"to": NUMBERS[0].lstrip("+"), "vars": {"name": NAMES[0]}}


async def test_enqueue_json_job_object_is_pushed_as_it_is(
    cli_env: dict[str, str], redis: aioredis.Redis, tmp_path: Path
) -> None:
    raw = orjson.dumps(
        {
            "type": "blast",
            "id": "whole-job",
            "account": ACCOUNT,
            "message": {"text": "hi"},
            "recipients": [{"to": NUMBERS[0]}],
        }
    )
    path = tmp_path / "job.json"
    path.write_bytes(b"  " + raw)

    result = await run_cli(cli_env, "enqueue", str(path))

    assert result.code == 0, result.stderr
    assert result.stdout.strip() == "whole-job"
    assert await redis.lrange("blastd:jobs", 0, -1) == [b"  " + raw]
    assert await redis.keys("blastd:recipients:*") == []


async def test_enqueue_without_a_message_option_fails_and_pushes_nothing(
    cli_env: dict[str, str], redis: aioredis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "people.csv"
    write_csv(path)

    result = await run_cli(cli_env, "enqueue", str(path))

    assert result.code == 1
    assert "--text, --template or --video" in result.stderr
    assert await redis.llen("blastd:jobs") == 0


# --- status ----------------------------------------------------------------------------------


async def insert_running_campaign(pool: ledger.Pool, campaign_id: str, numbers: list[str]) -> None:
    """A campaign straight in the ledger, as intake leaves it, for a daemon to send later."""

    async def pages() -> AsyncIterator[list[ledger.StagedRecipient]]:
        yield [ledger.StagedRecipient(i, n, None, None) for i, n in enumerate(numbers)]

    campaign = ledger.NewCampaign(campaign_id, "blast", ACCOUNT, {"text": "hi"}, {"rate_per_s": 20})
    async with ledger.transaction(pool) as conn:
        await ledger.insert_campaign(conn, campaign, pages())


async def test_status_json_prints_the_state_and_the_count_per_state(
    cli_env: dict[str, str],
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
) -> None:
    job = {
        "type": "blast",
        "id": "status-1",
        "account": ACCOUNT,
        "message": {"text": "hi"},
        "recipients": [{"to": n} for n in NUMBERS] + [{"to": "12"}],
    }
    async with running_daemon(make_settings(servers, sandbox.url)):
        await redis.lpush("blastd:jobs", orjson.dumps(job))
        await wait_until(lambda: is_done(pool, "status-1"))

    as_json = await run_cli(cli_env, "status", "status-1", "--json")
    as_text = await run_cli(cli_env, "status", "status-1")

    assert as_json.code == 0, as_json.stderr
    report = orjson.loads(as_json.stdout)
    assert (report["id"], report["account"], report["state"]) == ("status-1", ACCOUNT, "done")
    assert report["counts"] == {"sent": 3, "skipped": 1}
    assert (report["done"], report["total"]) == (4, 4)
    assert as_text.code == 0, as_text.stderr
    assert "status-1" in as_text.stdout
    assert "4/4 done" in as_text.stdout


async def test_status_of_an_unknown_campaign_exits_1_naming_it(
    cli_env: dict[str, str], pool: ledger.Pool
) -> None:
    result = await run_cli(cli_env, "status", "no-such-campaign", "--json")
    assert result.code == 1
    assert "no campaign 'no-such-campaign'" in result.stderr
    assert result.stdout == ""


async def test_status_follow_shows_a_progress_bar_and_exits_when_the_campaign_is_done(
    cli_env: dict[str, str],
    servers: Servers,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
) -> None:
    """The campaign is running when the follower connects, and sent only after: it must follow."""
    numbers = [f"+62812{n:08d}" for n in range(31_000_000, 31_000_000 + 30)]
    await insert_running_campaign(pool, "follow-1", numbers)
    before = await pool.fetchval("SELECT clock_timestamp()")
    follower = asyncio.create_task(
        run_cli(cli_env, "status", "follow-1", "--follow", "--json", timeout_s=120)
    )
    try:
        await wait_until(lambda: follower.done() or has_new_db_client(pool, before))
        async with running_daemon(make_settings(servers, sandbox.url)):
            result = await follower
    finally:
        follower.cancel()
    assert result.code == 0, result.stderr
    assert orjson.loads(result.stdout)["state"] == "done"
    assert "follow-1" in result.stderr
    assert "30/30" in result.stderr


async def has_new_db_client(pool: ledger.Pool, since: datetime) -> bool:
    """True once a client other than this test's pool has connected since `since`."""
    count = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
        "AND backend_start > $1 AND pid <> pg_backend_pid()",
        since,
    )
    return bool(count)


# --- migrate ---------------------------------------------------------------------------------


@pytest.fixture
async def fresh_database_url(servers: Servers) -> AsyncIterator[str]:
    name = f"blastd_fresh_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(servers.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield servers.database_url.rsplit("/", 1)[0] + f"/{name}"
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_migrate_applies_the_ledger_to_a_fresh_database_then_is_up_to_date(
    cli_env: dict[str, str], fresh_database_url: str
) -> None:
    env = {**cli_env, "BLASTD_DATABASE_URL": fresh_database_url}

    first = await run_cli(env, "migrate")
    second = await run_cli(env, "migrate")

    assert first.code == 0, first.stderr
    shipped = sorted(path.name for path in Path(ledger.__file__).with_name("sql").glob("*.sql"))
    assert first.stdout.strip() == "applied: " + ", ".join(shipped)
    assert shipped[0] == "001_ledger.sql"
    assert second.code == 0, second.stderr
    assert second.stdout.strip() == "ledger is up to date"
    conn = await asyncpg.connect(fresh_database_url)
    try:
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables")}
    finally:
        await conn.close()
    assert {"campaigns", "recipients", "blastd_migrations"} <= tables


# --- check -----------------------------------------------------------------------------------


async def test_check_reaches_redis_postgres_and_every_account(
    cli_env: dict[str, str], sandbox: SandboxHandle
) -> None:
    result = await run_cli(cli_env, "check")

    assert result.code == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ok   configuration")
    assert "ok   redis" in lines
    assert "ok   postgres" in lines
    accepted = f"ok   account {ACCOUNT}: credentials accepted by {sandbox.url}"
    assert accepted in lines


async def test_check_fails_when_redis_is_unreachable(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "BLASTD_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}

    result = await run_cli(env, "check")

    assert result.code == 1
    assert any(line.startswith("FAIL redis") for line in result.stdout.splitlines())
    assert "ok   postgres" in result.stdout.splitlines()


# --- bad configuration -----------------------------------------------------------------------

BAD_SETTINGS: dict[str, tuple[dict[str, str], list[str]]] = {
    "account without phone_number_id": (
        {"BLASTD_ACCOUNTS": '{"x": {"kind": "cloud_api", "token": "t0k3n"}}'},
        ["BLASTD_ACCOUNTS__x__phone_number_id"],
    ),
    "account without token": (
        {"BLASTD_ACCOUNTS": '{"x": {"kind": "cloud_api", "phone_number_id": "1"}}'},
        ["BLASTD_ACCOUNTS__x__token"],
    ),
    "unknown provider kind": (
        {"BLASTD_ACCOUNTS": '{"x": {"kind": "telegram", "phone_number_id": "1"}}'},
        ["BLASTD_ACCOUNTS__x", "telegram"],
    ),
    "accounts not valid JSON": (
        {"BLASTD_ACCOUNTS": '{"x": {"kind": "cloud_api"'},
        ["BLASTD_ACCOUNTS"],
    ),
    "claim page size 0": ({"BLASTD_CLAIM_PAGE_SIZE": "0"}, ["BLASTD_CLAIM_PAGE_SIZE"]),
    "nested admin port out of range": ({"BLASTD_ADMIN__PORT": "70000"}, ["BLASTD_ADMIN__PORT"]),
    "log level": ({"BLASTD_LOG_LEVEL": "verbose"}, ["BLASTD_LOG_LEVEL"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
@pytest.mark.parametrize("command", ["check", "run"])
async def test_bad_config_stops_start_up_with_exit_78_naming_the_setting(
    case: str, command: str, cli_env: dict[str, str]
) -> None:
    overrides, named = BAD_SETTINGS[case]

    result = await run_cli({**cli_env, **overrides}, command, timeout_s=30)

    assert result.code == EXIT_CONFIG, result.stderr
    for setting in named:
        assert setting in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_unknown_setting_in_an_env_file_is_named_as_written(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    env_file = tmp_path / "blastd.env"
    env_file.write_text("BLASTD_CLAIM_PAGE_SIZ=5\n")

    result = await run_cli(cli_env, "--env-file", str(env_file), "check")

    assert result.code == EXIT_CONFIG
    assert "BLASTD_CLAIM_PAGE_SIZ:" in result.stderr
    assert "BLASTD_BLASTD_" not in result.stderr


# --- sandbox ---------------------------------------------------------------------------------


async def test_sandbox_command_serves_the_emulator_until_terminated(
    cli_env: dict[str, str],
) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "blastd",
        "sandbox",
        "--port",
        str(port),
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        stats: dict[str, Any] = await wait_until(lambda: _sandbox_stats(port), timeout_s=30)
    finally:
        process.send_signal(signal.SIGINT)  # the sandbox's clean stop, as Ctrl-C
        try:
            code = await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
    assert stats["requests"] == 0
    assert code == 0


async def _sandbox_stats(port: int) -> dict[str, Any] | None:
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/_sandbox/stats") as response,
        ):
            result: dict[str, Any] = await response.json()
            return result
    except aiohttp.ClientError:
        return None
