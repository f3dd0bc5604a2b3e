"""Opt-outs: the list the ledger keeps, how intake honours it, and what fills it."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from blastd import ledger
from blastd.config import Settings, UltraMsgAccount
from blastd.embedded import free_port
from tests.harness import (
    TOKEN,
    WABLAS_ACCOUNT,
    SandboxHandle,
    Servers,
    blast_job,
    digits,
    is_done,
    is_ready,
    make_settings,
    make_wablas_settings,
    numbers_from,
    run_cli,
    running_daemon,
    ultramsg_emulator,
    wablas_sandbox,
    wablas_webhook_url,
    wait_until,
    webhook_url,
)

JOBS = "blastd:jobs"
TEMPLATE = {"name": "promo_nov", "language": "id", "params": ["{name}"]}


async def skipped_reasons(pool: ledger.Pool, campaign_id: str) -> dict[str, str]:
    rows = await pool.fetch(
        "SELECT phone, error_text FROM recipients WHERE campaign_id = $1 AND state = 'skipped'",
        campaign_id,
    )
    return {r["phone"]: r["error_text"] for r in rows}


async def test_marketing_sends_skip_opted_out_numbers_and_utility_sends_do_not(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    numbers = numbers_from(40_000_000, 4)
    await pool.execute(
        "INSERT INTO optouts (phone, source) VALUES ($1, 'operator'), ($2, 'inbound')",
        numbers[0],
        numbers[2],
    )
    utility = {"template": {**TEMPLATE, "category": "utility"}}
    async with running_daemon(make_settings(servers, sandbox.url)):
        await redis.lpush(JOBS, blast_job("promo", numbers))
        await redis.lpush(JOBS, blast_job("receipt", numbers, message=utility))
        await wait_until(lambda: is_done(pool, "promo"))
        await wait_until(lambda: is_done(pool, "receipt"))
    assert await skipped_reasons(pool, "promo") == {
        numbers[0]: "opted_out",
        numbers[2]: "opted_out",
    }
    assert await skipped_reasons(pool, "receipt") == {}


async def test_the_categories_the_list_applies_to_are_a_setting(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    numbers = numbers_from(41_000_000, 2)
    await pool.execute("INSERT INTO optouts (phone, source) VALUES ($1, 'operator')", numbers[1])
    utility = {"template": {**TEMPLATE, "category": "utility"}}
    settings = make_settings(servers, sandbox.url, optout_applies_to=["utility"])
    async with running_daemon(settings):
        await redis.lpush(JOBS, blast_job("promo", numbers))
        await redis.lpush(JOBS, blast_job("receipt", numbers, message=utility))
        await wait_until(lambda: is_done(pool, "promo"))
        await wait_until(lambda: is_done(pool, "receipt"))
    assert await skipped_reasons(pool, "promo") == {}
    assert await skipped_reasons(pool, "receipt") == {numbers[1]: "opted_out"}


async def test_the_optout_verbs_add_import_list_and_remove_numbers(
    cli_env: dict[str, str], pool: ledger.Pool, tmp_path: Path
) -> None:
    numbers = numbers_from(42_000_000, 4)
    added = await run_cli(
        cli_env, "optout", "add", numbers[0], "0812 4200 0001", "--reason", "asked"
    )
    assert added.code == 0, added.stderr
    assert "added 2 number(s)" in added.stdout
    listing = tmp_path / "stops.csv"
    listing.write_text(f"phone,name\n{numbers[1]},Sari\n{numbers[2]},Tono\n{numbers[3]}\n")
    imported = await run_cli(cli_env, "optout", "import", str(listing))
    assert imported.code == 0, imported.stderr
    assert "added 2 number(s); 1 already listed" in imported.stdout
    listed = await run_cli(cli_env, "optout", "list")
    assert sorted(re.findall(r"\+62812\d{8}", listed.stdout)) == numbers
    removed = await run_cli(cli_env, "optout", "remove", numbers[0])
    assert "removed 1 number(s)" in removed.stdout
    rows = await pool.fetch("SELECT phone, source, reason FROM optouts ORDER BY phone")
    assert [tuple(r) for r in rows] == [
        (numbers[1], "operator", "asked"),
        (numbers[2], "import", None),
        (numbers[3], "import", None),
    ]


async def test_optout_refuses_an_unreadable_number_and_writes_nothing(
    cli_env: dict[str, str], pool: ledger.Pool
) -> None:
    result = await run_cli(cli_env, "optout", "add", numbers_from(43_000_000, 1)[0], "12")
    assert result.code == 2
    assert "'12'" in result.stderr
    assert await pool.fetchval("SELECT count(*) FROM optouts") == 0


async def listed(pool: ledger.Pool) -> dict[str, tuple[str, str | None]]:
    rows = await pool.fetch("SELECT phone, source, reason FROM optouts")
    return {r["phone"]: (r["source"], r["reason"]) for r in rows}


@pytest.mark.parametrize(
    ("text", "opts_out"),
    [("STOP", True), ("  stop promo \n", True), ("Berhenti", True), ("stop it please", False)],
)
async def test_an_inbound_stop_keyword_puts_its_sender_on_the_list(
    servers: Servers, pool: ledger.Pool, sandbox: SandboxHandle, text: str, opts_out: bool
) -> None:
    admin_port = free_port()
    await sandbox.configure(webhook_url=webhook_url(admin_port))
    sender = numbers_from(44_000_000, 1)[0]
    async with running_daemon(make_settings(servers, sandbox.url, admin_port=admin_port)):
        await wait_until(lambda: is_ready(admin_port))
        inbound = {"from": sender.lstrip("+"), "text": text}
        async with sandbox.http.post(f"{sandbox.url}/_sandbox/inbound", json=inbound) as answer:
            assert answer.status == 200, await answer.text()
            assert (await answer.json())["webhook_status"] == 200
    expected = {sender: ("inbound", text.strip())} if opts_out else {}
    assert await listed(pool) == expected


async def test_a_recipient_meta_reports_opted_out_fails_so_and_is_listed(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    numbers = numbers_from(45_000_000, 3)
    await sandbox.configure(fail_numbers={numbers[1].lstrip("+"): 131050})
    async with running_daemon(make_settings(servers, sandbox.url)):
        await redis.lpush(JOBS, blast_job("first", numbers))
        await wait_until(lambda: is_done(pool, "first"))
        await redis.lpush(JOBS, blast_job("second", numbers))
        await wait_until(lambda: is_done(pool, "second"))
    row = await pool.fetchrow(
        "SELECT state, error_class, error_code FROM recipients "
        "WHERE campaign_id = 'first' AND phone = $1",
        numbers[1],
    )
    assert tuple(row) == ("failed", "opted_out", "131050")
    assert list(await listed(pool)) == [numbers[1]]
    assert await skipped_reasons(pool, "second") == {numbers[1]: "opted_out"}


@pytest.mark.parametrize(("category", "skipped"), [("marketing", 1), ("utility", 0)])
async def test_plan_counts_the_opted_out_rows_of_the_categories_the_list_applies_to(
    cli_env: dict[str, str], pool: ledger.Pool, tmp_path: Path, category: str, skipped: int
) -> None:
    numbers = numbers_from(46_000_000, 3)
    await pool.execute("INSERT INTO optouts (phone, source) VALUES ($1, 'operator')", numbers[1])
    path = tmp_path / "people.csv"
    path.write_text("phone;name\n" + "".join(f"{n};N{i}\n" for i, n in enumerate(numbers)))
    template = ["--template", "promo_nov", "--language", "id", "--param", "{name}"]
    result = await run_cli(cli_env, "plan", str(path), *template, "--category", category)
    assert result.code == 0, result.stderr
    assert f"  valid: {3 - skipped}\n" in result.stdout
    assert f"  opted out: {skipped}\n" in result.stdout


async def test_a_status_failed_as_opted_out_puts_the_number_on_the_list(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    admin_port = free_port()
    numbers = numbers_from(50_000_000, 2)
    await sandbox.configure(
        webhook_url=webhook_url(admin_port), async_fail_numbers={numbers[0].lstrip("+"): 131050}
    )
    async with running_daemon(make_settings(servers, sandbox.url, admin_port=admin_port)):
        await redis.lpush(JOBS, blast_job("late", numbers))
        await wait_until(lambda: is_done(pool, "late"))
        await wait_until(lambda: _listed_count_is(pool, 1))
    assert await listed(pool) == {numbers[0]: ("provider", "stopped marketing messages")}


async def _listed_count_is(pool: ledger.Pool, count: int) -> bool:
    return await pool.fetchval("SELECT count(*) FROM optouts") == count


# --- stop keywords through the unofficial gateways --------------------------------------------

ULTRAMSG_ACCOUNT = "ultra-main"
ULTRAMSG_SECRET = "ultramsg-hook-secret"


@dataclass(frozen=True, slots=True)
class Gateway:
    """A daemon's one UltraMsg or Wablas account, its emulator wired to the daemon's webhook,
    and the knobs that make the emulator post without our secret."""

    sandbox: SandboxHandle
    settings: Settings
    account: str
    admin_port: int
    without_secret: dict[str, Any]

    async def write(self, sender: str, text: str) -> int:
        """A person sends `text`: the status the daemon's webhook answered the emulator."""
        inbound = {"from": digits(sender), "text": text}
        async with self.sandbox.http.post(
            f"{self.sandbox.url}/_sandbox/inbound", json=inbound
        ) as answer:
            assert answer.status == 200, await answer.text()
            status: int = (await answer.json())["webhook_status"]
            return status


@pytest.fixture(params=["ultramsg", "wablas"])
async def gateway(request: pytest.FixtureRequest, servers: Servers) -> AsyncIterator[Gateway]:
    admin_port = free_port()
    if request.param == "wablas":
        async with wablas_sandbox(webhook_url=wablas_webhook_url(admin_port)) as sandbox:
            settings = make_wablas_settings(servers, sandbox.url, admin_port=admin_port)
            yield Gateway(sandbox, settings, WABLAS_ACCOUNT, admin_port, {"webhook_secret": None})
        return
    async with ultramsg_emulator() as url, aiohttp.ClientSession() as http:
        hook = f"http://127.0.0.1:{admin_port}/webhooks/ultramsg/{ULTRAMSG_ACCOUNT}"
        sandbox = SandboxHandle(url, http)
        await sandbox.configure(webhook_url=f"{hook}?secret={ULTRAMSG_SECRET}")
        account = {
            "kind": "ultramsg",
            "base_url": url,
            "instance_id": "instance1150",
            "token": TOKEN,
            "webhook_secret": ULTRAMSG_SECRET,
            "rate_per_s": 0,
        }
        accounts = {ULTRAMSG_ACCOUNT: UltraMsgAccount.model_validate(account)}
        settings = make_settings(servers, url, admin_port=admin_port, accounts=accounts)
        yield Gateway(sandbox, settings, ULTRAMSG_ACCOUNT, admin_port, {"webhook_url": hook})


async def test_a_stop_keyword_through_ultramsg_or_wablas_opts_its_sender_out_of_marketing(
    gateway: Gateway, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    numbers = numbers_from(47_000_000, 3)
    async with running_daemon(gateway.settings):
        await wait_until(lambda: is_ready(gateway.admin_port))
        assert await gateway.write(numbers[0], " Stop ") == 200
        assert await gateway.write(numbers[1], "stop it please") == 200
        await redis.lpush(JOBS, blast_job("promo", numbers, account=gateway.account))
        await wait_until(lambda: is_done(pool, "promo"))
    assert await listed(pool) == {numbers[0]: ("inbound", "Stop")}
    assert await skipped_reasons(pool, "promo") == {numbers[0]: "opted_out"}
    assert await gateway.sandbox.recipients() == {digits(n): 1 for n in numbers[1:]}


async def test_a_stop_keyword_posted_without_our_secret_is_refused_and_lists_nobody(
    gateway: Gateway, pool: ledger.Pool
) -> None:
    await gateway.sandbox.configure(**gateway.without_secret)
    sender = numbers_from(48_000_000, 1)[0]
    async with running_daemon(gateway.settings):
        await wait_until(lambda: is_ready(gateway.admin_port))
        assert await gateway.write(sender, "STOP") == 401
    assert await listed(pool) == {}
