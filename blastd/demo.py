"""`blastd demo`: a real campaign end to end on embedded Redis, PostgreSQL and the sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from blastd import exports, ledger, reports
from blastd.embedded import EmbeddedPostgres, EmbeddedRedis, free_port

DEMO_ACCOUNT = "demo"
APP_SECRET = "demo-app-secret"
RECEIPT_WAIT_S = 5.0  # let delivered/read webhooks arrive before the final count
console = Console(stderr=True)


def sample_recipients() -> Path:
    """The 1,000-row spreadsheet shipped with blastd."""
    return Path(str(resources.files("blastd") / "examples" / "recipients-1000.xlsx"))


def run_demo(file: Path | None, rate_per_s: float) -> int:
    """Start everything, send one campaign, print the count per final state and why recipients
    were not reached, stop everything."""
    with (
        tempfile.TemporaryDirectory(prefix="blastd-demo-") as tmp,
        _services(Path(tmp), rate_per_s) as env,
    ):
        console.print(f"[bold]blastd demo[/]: servers, sandbox and daemon up; logs in {tmp}")
        job_id = _enqueue(env, file or sample_recipients())
        report, reasons = asyncio.run(_follow(env["BLASTD_DATABASE_URL"], job_id))
        _print_counts(report)
        Console().print("why the others were not reached:")
        reports.print_reasons(reasons)
        return 0 if report["state"] == "done" else 1


@contextlib.contextmanager
def _services(tmp: Path, rate_per_s: float) -> Iterator[dict[str, str]]:
    redis, postgres = EmbeddedRedis(tmp / "redis"), EmbeddedPostgres(tmp / "postgres")
    admin_port, sandbox_port = free_port(), free_port()
    env = _daemon_env(redis.url, postgres.url, admin_port, sandbox_port, rate_per_s)
    with contextlib.ExitStack() as stack:
        for server in (redis, postgres):
            server.start()
            stack.callback(server.stop)
        sandbox = _spawn(
            [
                sys.executable,
                "-m",
                "blastd.sandbox",
                "--port",
                str(sandbox_port),
                "--webhook-url",
                f"http://127.0.0.1:{admin_port}/webhooks/cloud_api/{DEMO_ACCOUNT}",
                "--app-secret",
                APP_SECRET,
                "--permanent",
                "0.005",
            ],
            tmp / "sandbox.log",
            env,
        )
        stack.callback(_stop, sandbox)
        daemon = _spawn([sys.executable, "-m", "blastd", "run"], tmp / "daemon.log", env)
        stack.callback(_stop, daemon)
        _wait_ready(admin_port, daemon)
        yield env


def _daemon_env(
    redis_url: str, db_url: str, admin_port: int, sandbox_port: int, rate_per_s: float
) -> dict[str, str]:
    account = {
        "kind": "cloud_api",
        "base_url": f"http://127.0.0.1:{sandbox_port}",
        "phone_number_id": "100000000000001",
        "token": "sandbox-token",
        "app_secret": APP_SECRET,
        "rate_per_s": rate_per_s,
        "concurrency": 20,
    }
    return {
        **os.environ,
        "BLASTD_REDIS_URL": redis_url,
        "BLASTD_DATABASE_URL": db_url,
        "BLASTD_ACCOUNTS": orjson.dumps({DEMO_ACCOUNT: account}).decode(),
        "BLASTD_ADMIN__PORT": str(admin_port),
        "BLASTD_INSTANCE_ID": "demo",
        "BLASTD_LOG_FORMAT": "json",
    }


def _spawn(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(admin_port: int, daemon: subprocess.Popen[bytes]) -> None:
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"blastd run exited with code {daemon.returncode}; see daemon.log")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1),
        ):
            return
        time.sleep(0.1)
    raise SystemExit("blastd run did not become ready within 60 s")


def _enqueue(env: dict[str, str], file: Path) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "blastd",
            "enqueue",
            str(file),
            "--template",
            "promo_nov",
            "--language",
            "id",
            "--param",
            "{name}",
            "--param",
            "{code}",
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    job_id = result.stdout.strip()
    console.print(f"enqueued campaign [bold]{job_id}[/] from {file.name}")
    return job_id


async def _follow(database_url: str, job_id: str) -> tuple[dict[str, object], list[exports.Reason]]:
    """The campaign's last status once receipts had time to arrive, and why recipients were
    not reached (failed or skipped: counts per error code or skip reason)."""
    pool = await ledger.open_pool(database_url, command_timeout_s=10, max_size=2)
    try:
        report = await reports.follow_campaign(pool, job_id)
        await asyncio.sleep(RECEIPT_WAIT_S)
        final = await reports.campaign_status(pool, job_id) or report
        return final, await exports.undelivered_reasons(pool, job_id)
    finally:
        await pool.close()


def _print_counts(report: dict[str, object]) -> None:
    out = Console()
    out.print(f"campaign [bold]{report['id']}[/]: {report['state']}")
    table = Table("final state", "recipients")
    counts = report["counts"]
    assert isinstance(counts, dict)
    for state, n in counts.items():
        table.add_row(state, str(n))
    table.add_row("[bold]total", f"[bold]{report['total']}")
    out.print(table)
