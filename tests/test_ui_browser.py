"""The web pages in a real headless browser (Debian's chromium): `make test-browser` installs it
and runs these; `make test` leaves them out, as it installs no system package."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from blastd import ledger
from blastd.embedded import free_port
from tests.harness import (
    SandboxHandle,
    Servers,
    blast_job,
    campaign_state,
    is_ready,
    make_settings,
    numbers_from,
    running_daemon,
    wait_until,
)

pytestmark = pytest.mark.browser

JOBS = "blastd:jobs"
BROWSER_TIMEOUT_S = 60.0


async def dump_dom(url: str, profile: Path) -> str:
    """The page's DOM once loaded, as chromium renders it (no script runs: the pages have none)."""
    browser = shutil.which("chromium")
    assert browser is not None, "chromium is not installed: `make test-browser` installs it"
    process = await asyncio.create_subprocess_exec(
        browser,
        "--headless",
        "--no-sandbox",  # the tests run as root, where chromium's sandbox refuses to start
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--dump-dom",
        url,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), BROWSER_TIMEOUT_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode(errors="replace")
    return stdout.decode()


async def test_a_browser_shows_the_finished_campaign_and_its_recipients_states(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> None:
    numbers = numbers_from(44_000_000, 3)
    await sandbox.configure(fail_numbers={numbers[1].lstrip("+"): 131026})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with running_daemon(make_settings(servers, sandbox.url, admin_port=port)):
        await wait_until(lambda: is_ready(port))
        await redis.lpush(JOBS, blast_job("in-a-browser", [*numbers, "12"]))
        await wait_until(lambda: _is_done(pool, "in-a-browser"))
        listing = await dump_dom(f"{url}/ui", tmp_path / "profile")
        campaign = await dump_dom(f"{url}/ui/campaigns/in-a-browser", tmp_path / "profile")

    assert '<a href="/ui/campaigns/in-a-browser">in-a-browser</a>' in listing
    assert '<span class="state-done">done</span>' in listing
    assert '<progress value="4" max="4"></progress> 4/4' in listing
    for state, count in (("sent", 2), ("failed", 1), ("skipped", 1)):
        cell = f'<td><span class="state-{state}">{state}</span></td>'
        assert campaign.count(cell) == count, state
    assert "131026" in campaign
    assert "invalid number" in campaign
    assert "download CSV" in campaign


async def _is_done(pool: ledger.Pool, campaign_id: str) -> bool:
    return await campaign_state(pool, campaign_id) == "done"
