"""Preflight: `plan` and `enqueue` refuse what the daemon would dead-letter, with the daemon's
own validation; `status` tells a dead-lettered job; the daemon drops the recipients list of a
job it refuses or finds duplicate."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from blastd import ledger
from blastd.embedded import free_port
from blastd.errors import EXIT_CONFIG
from blastd.sandbox.__main__ import provider_apps
from blastd.sandbox.cloud_api import SandboxConfig, build_app, listening
from tests.harness import (
    ACCOUNT,
    PHONE_NUMBER_ID,
    SandboxHandle,
    Servers,
    accounts_env,
    daemon_env,
    make_settings,
    run_cli,
    running_daemon,
    wait_until,
)

NUMBERS = ["+6281230000001", "+6281230000002", "+6281230000003"]


def people_csv(tmp_path: Path) -> Path:
    """Three good rows, one repeated number, one invalid number, one without a name."""
    rows = [
        f"{NUMBERS[0]};Budi",
        f"{NUMBERS[1]};Sari",
        f"{NUMBERS[2]};Tono",
        f"{NUMBERS[0]};Budi again",
        "12;Nobody",
        "+6281230000004;",
    ]
    path = tmp_path / "people.csv"
    path.write_text("\n".join(["phone;name", *rows]) + "\n")
    return path


async def test_plan_counts_rows_as_the_daemon_would_and_masks_numbers(
    cli_env: dict[str, str], redis: aioredis.Redis, tmp_path: Path
) -> None:
    path = people_csv(tmp_path)

    result = await run_cli(cli_env, "plan", str(path), "--text", "Halo {name}", "--rate", "2")

    assert result.code == 0, result.stderr
    out = result.stdout
    for line in ("valid: 3", "invalid: 1", "duplicate: 1", "missing variable: 1"):
        assert f"  {line}\n" in out, out
    assert "Halo Budi" in out
    assert "ETA at the campaign's rate: 0:00:02 (2/s)" in out
    assert "ETA at the account's rate: no limit" in out  # the test account has rate 0
    assert "+628******0001" in out
    for number in NUMBERS:
        assert number.lstrip("+") not in out
    assert await redis.dbsize() == 0


async def test_plan_shows_how_much_of_the_messaging_limit_a_campaign_uses(
    cli_env: dict[str, str], sandbox: SandboxHandle, tmp_path: Path
) -> None:
    """A 2-person budget with the 3 valid rows of the file: the campaign would pause at it."""
    env = {**cli_env, "BLASTD_ACCOUNTS": accounts_env(sandbox.url, messaging_limit_per_24h=2)}

    result = await run_cli(env, "plan", str(people_csv(tmp_path)), "--text", "Halo {name}")

    assert result.code == 0, result.stderr
    [line] = [ln for ln in result.stdout.splitlines() if ln.startswith("messaging limit:")]
    assert line.startswith("messaging limit: 3 of the ")
    assert line.endswith("left of 2 in the rolling window: the campaign pauses at the limit")


async def test_enqueue_dry_run_prints_the_plan_and_pushes_nothing(
    cli_env: dict[str, str], redis: aioredis.Redis, tmp_path: Path
) -> None:
    path = people_csv(tmp_path)

    result = await run_cli(cli_env, "enqueue", str(path), "--text", "Hi {name}", "--dry-run")

    assert result.code == 0, result.stderr
    assert "valid: 3" in result.stdout
    assert await redis.dbsize() == 0


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--text", "Hi {discount}"], "--text uses {discount}, which no column of people.csv"),
        (["--text", "Hi", "--not-before", "tomorrow"], "options.not_before"),
        (["--text", "Hi", "--rate", "0"], "options.rate_per_s"),
        (["--text", "Hi", "--account", "nobody"], "unknown account 'nobody'"),
        (["--text", "Hi", "--template", "promo"], "needs exactly one of text, template, video"),
    ],
)
async def test_enqueue_refuses_what_the_daemon_would_dead_letter(
    cli_env: dict[str, str],
    redis: aioredis.Redis,
    pool: ledger.Pool,
    tmp_path: Path,
    options: list[str],
    named: str,
) -> None:
    path = people_csv(tmp_path)

    result = await run_cli(cli_env, "enqueue", str(path), *options)

    assert result.code == 2, result.stderr
    assert named in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert await redis.dbsize() == 0


async def test_enqueue_refuses_a_file_with_no_sendable_row_and_says_why(
    cli_env: dict[str, str], redis: aioredis.Redis, pool: ledger.Pool, tmp_path: Path
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("phone;name\n12;A\n+6281230000009;\n")

    result = await run_cli(cli_env, "enqueue", str(path), "--text", "Hi {name}")

    assert result.code == 2, result.stderr
    assert "no recipient of bad.csv can be sent" in result.stderr
    assert "1 row(s) lack a variable" in result.stderr
    assert "missing variable: name" in result.stderr
    assert await redis.dbsize() == 0


async def test_enqueue_refuses_an_existing_id_with_another_message_and_allows_the_same(
    cli_env: dict[str, str], redis: aioredis.Redis, pool: ledger.Pool, tmp_path: Path
) -> None:
    path = people_csv(tmp_path)
    campaign = ledger.NewCampaign("reused", "blast", ACCOUNT, {"text": "Hi {name}"}, {})

    async def pages():  # type: ignore[no-untyped-def]
        yield [ledger.StagedRecipient(0, NUMBERS[0].lstrip("+"), None, None)]

    async with ledger.transaction(pool) as conn:
        await ledger.insert_campaign(conn, campaign, pages())

    other = await run_cli(cli_env, "enqueue", str(path), "--id", "reused", "--text", "Bye")
    same = await run_cli(cli_env, "enqueue", str(path), "--id", "reused", "--text", "Hi {name}")

    assert other.code == 2
    assert "campaign 'reused' already exists with another message" in other.stderr
    assert same.code == 0, same.stderr
    assert await redis.llen("blastd:jobs") == 1


async def test_status_of_a_dead_lettered_job_says_so_and_names_the_entry(
    cli_env: dict[str, str],
    servers: Servers,
    sandbox: SandboxHandle,
    redis: aioredis.Redis,
    pool: ledger.Pool,
) -> None:
    await redis.rpush("blastd:recipients:doomed", orjson.dumps({"to": NUMBERS[0]}))
    job = {
        "type": "blast",
        "id": "doomed",
        "account": "nobody",
        "message": {"text": "hi"},
        "recipients_key": "blastd:recipients:doomed",
    }
    async with running_daemon(make_settings(servers, sandbox.url)):
        await redis.lpush("blastd:jobs", orjson.dumps(job))
        await wait_until(lambda: redis.llen("blastd:dead"))

    plain = await run_cli(cli_env, "status", "doomed")
    followed = await run_cli(cli_env, "status", "doomed", "--follow", timeout_s=30)

    for result in (plain, followed):
        assert result.code == 1
        assert "job 'doomed' was dead-lettered: unknown account 'nobody'" in result.stderr
        assert "blastd dead show 0" in result.stderr
    assert await redis.exists("blastd:recipients:doomed") == 0


async def test_the_daemon_drops_the_recipients_list_of_a_duplicate_job(
    servers: Servers, sandbox: SandboxHandle, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    first = {
        "type": "blast",
        "id": "twice",
        "account": ACCOUNT,
        "message": {"text": "hi"},
        "recipients": [{"to": NUMBERS[0]}],
    }
    again = {**first, "recipients": None, "recipients_key": "blastd:recipients:twice"}
    del again["recipients"]
    async with running_daemon(make_settings(servers, sandbox.url)):
        await redis.lpush("blastd:jobs", orjson.dumps(first))
        await wait_until(lambda: ledger.load_campaign(pool, "twice"))
        await redis.rpush("blastd:recipients:twice", orjson.dumps({"to": NUMBERS[1]}))
        await redis.lpush("blastd:jobs", orjson.dumps(again))
        await wait_until(lambda: _gone(redis, "blastd:recipients:twice"))
    assert await redis.llen("blastd:dead") == 0


async def _gone(redis: aioredis.Redis, key: str) -> bool:
    return await redis.exists(key) == 0


# --- config and dependency errors, as the operator sees them -------------------------------


async def test_version_comes_from_the_package_metadata(cli_env: dict[str, str]) -> None:
    result = await run_cli(cli_env, "--version")
    assert result.code == 0
    assert result.stdout.strip() == f"blastd, version {version('blastd')}"


@pytest.mark.parametrize(
    ("verb", "setting"),
    [
        (["dead", "list"], "BLASTD_REDIS_URL"),
        (["status", "any"], "BLASTD_DATABASE_URL"),
        (["pause", "any"], "BLASTD_DATABASE_URL"),
        (["migrate"], "BLASTD_DATABASE_URL"),
    ],
)
async def test_an_unreachable_server_is_one_line_naming_the_setting(
    cli_env: dict[str, str], verb: list[str], setting: str
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    env = {
        **cli_env,
        "BLASTD_REDIS_URL": f"redis://{dead}/0",
        "BLASTD_DATABASE_URL": f"postgresql://postgres@{dead}/blastd",
    }

    result = await run_cli(env, *verb)

    assert result.code == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"unreachable ({setting})" in line
    assert "Connect call failed" in line or "Connection refused" in line, line


async def test_a_wrong_database_password_is_the_server_s_own_words(
    cli_env: dict[str, str], servers: Servers
) -> None:
    url = servers.database_url.replace("postgres@", "no_such_role@", 1)

    result = await run_cli({**cli_env, "BLASTD_DATABASE_URL": url}, "status", "any")

    assert result.code == 1
    [line] = result.stderr.strip().splitlines()
    assert "postgres unreachable (BLASTD_DATABASE_URL)" in line
    assert "no_such_role" in line


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"BLASTD_CLAIM_PAGE_SIZ": "5"}, "BLASTD_CLAIM_PAGE_SIZ: not a blastd setting"),
        ({"BLASTD_DEFAULT_REGION": "XX"}, "BLASTD_DEFAULT_REGION"),
        ({"BLASTD_REDIS_URL": "localhost:6379"}, "BLASTD_REDIS_URL"),
    ],
)
async def test_config_errors_exit_78_in_one_line(
    cli_env: dict[str, str], extra: dict[str, str], named: str
) -> None:
    result = await run_cli({**cli_env, **extra}, "dead", "list")
    assert result.code == EXIT_CONFIG
    [line] = result.stderr.strip().splitlines()
    assert named in line


async def test_a_missing_env_file_exits_78(cli_env: dict[str, str], tmp_path: Path) -> None:
    result = await run_cli(cli_env, "--env-file", str(tmp_path / "no.env"), "check")
    assert result.code == EXIT_CONFIG
    assert "no.env: no such file" in result.stderr


async def test_check_proves_each_account_s_credentials_against_the_sandbox(
    servers: Servers,
) -> None:
    app = build_app(SandboxConfig())
    for prefix, provider_app in provider_apps().items():
        app.add_subapp(prefix, provider_app)
    async with listening(app, "127.0.0.1", 0) as url:
        good = "sandbox-token"
        accounts = {
            "cloud": {
                "kind": "cloud_api",
                "base_url": url,
                "phone_number_id": PHONE_NUMBER_ID,
                "token": good,
            },
            "cloud-bad": {
                "kind": "cloud_api",
                "base_url": url,
                "phone_number_id": PHONE_NUMBER_ID,
                "token": "wrong",
            },
            "ultra": {
                "kind": "ultramsg",
                "base_url": f"{url}/ultramsg",
                "instance_id": "instance1150",
                "token": good,
            },
            "ultra-bad": {
                "kind": "ultramsg",
                "base_url": f"{url}/ultramsg",
                "instance_id": "instance1150",
                "token": "wrong",
            },
            "wablas": {"kind": "wablas", "base_url": f"{url}/wablas", "token": good},
            "wablas-bad": {"kind": "wablas", "base_url": f"{url}/wablas", "token": "wrong"},
            "did": {"kind": "did", "base_url": f"{url}/did", "token": good},
            "did-bad": {"kind": "did", "base_url": f"{url}/did", "token": "wrong"},
        }
        env = {**daemon_env(servers, url, 0), "BLASTD_ACCOUNTS": orjson.dumps(accounts).decode()}

        result = await run_cli(env, "check")

    assert result.code == 1
    lines = result.stdout.splitlines()
    for name in ("cloud", "ultra", "wablas", "did"):
        assert any(line.startswith(f"ok   account {name}: credentials accepted") for line in lines)
        refused = f"FAIL account {name}-bad: credentials refused"
        assert any(line.startswith(refused) for line in lines), result.stdout
    assert "wrong" not in result.stdout
