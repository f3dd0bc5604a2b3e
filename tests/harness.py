"""What tests share: settings for a daemon under test, the daemon in-process, polling helpers."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import redis.asyncio as aioredis
from aiohttp import web

from blastd import daemon, ledger
from blastd.config import AdminSettings, CloudApiAccount, Settings, WablasAccount
from blastd.embedded import EmbeddedPostgres, EmbeddedRedis
from blastd.sandbox.cloud_api import SandboxConfig, build_app, listening
from blastd.sandbox.status_gateway import StatusSandboxConfig, build_status_app
from blastd.sandbox.ultramsg import UltraMsgSandboxConfig, build_ultramsg_app
from blastd.sandbox.wablas import build_wablas_app
from blastd.sandbox.wablas_config import WablasSandboxConfig
from blastd.shutdown import Shutdown

ACCOUNT = "cloud-main"
TOKEN = "sandbox-token"
APP_SECRET = "sandbox-app-secret"
PHONE_NUMBER_ID = "100000000000001"


@dataclass
class Servers:
    redis_url: str
    database_url: str
    redis: EmbeddedRedis | None
    postgres: EmbeddedPostgres | None


class SandboxHandle:
    """The in-process sandbox, reached over loopback HTTP like any client would."""

    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.http = http

    async def configure(self, **knobs: Any) -> None:
        await set_knobs(self.http, self.url, **knobs)

    async def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = await sandbox_json(self.http, self.url, "stats")
        return stats

    async def recipients(self) -> dict[str, int]:
        recipients: dict[str, int] = await sandbox_json(self.http, self.url, "recipients")
        return recipients


def cloud_api_account(sandbox_url: str, **fields: Any) -> dict[str, Any]:
    """The test Cloud API account on the sandbox: unpaced, 20 sends wide, unless `fields` say."""
    return {
        "kind": "cloud_api",
        "base_url": sandbox_url,
        "phone_number_id": PHONE_NUMBER_ID,
        "token": TOKEN,
        "app_secret": APP_SECRET,
        "rate_per_s": 0,
        "concurrency": 20,
        **fields,
    }


def accounts_env(sandbox_url: str, **fields: Any) -> str:
    """BLASTD_ACCOUNTS holding the test Cloud API account alone."""
    return orjson.dumps({ACCOUNT: cloud_api_account(sandbox_url, **fields)}).decode()


def make_settings(servers: Servers, sandbox_url: str, **overrides: Any) -> Settings:
    """Settings for a daemon under test: tiny intervals, one Cloud API account on the sandbox."""
    retries = {"attempts": 3, "initial_s": 0.01, "max_s": 0.05, "jitter_s": 0.01}
    account = cloud_api_account(sandbox_url, **{"retry": retries, **overrides.pop("account", {})})
    values: dict[str, Any] = {
        "redis_url": servers.redis_url,
        "database_url": servers.database_url,
        "instance_id": "test-instance",
        "accounts": {ACCOUNT: CloudApiAccount.model_validate(account)},
        "admin": AdminSettings(port=overrides.pop("admin_port", 0)),
        "intake_block_s": 0.1,
        "campaign_poll_interval_s": 0.1,
        "outcome_flush_interval_s": 0.02,
        "dependency_retry_s": 0.1,
        "instance_ttl_s": 1.0,
        "heartbeat_interval_s": 0.2,
        "drain_timeout_s": 10.0,
        # Doubts are held for the operator, soon: tests that are not about reconciliation see
        # an uncertain recipient stay uncertain, and its campaign end.
        "uncertain_policy": "hold",
        "reconcile_window_s": 0.2,
        "reconcile_interval_s": 0.1,
    }
    values.update(overrides)
    return Settings.model_validate(values)


@contextlib.asynccontextmanager
async def running_daemon(settings: Settings) -> AsyncIterator[Shutdown]:
    """The daemon in this event loop; drained (and checked to exit cleanly) on the way out."""
    shutdown = Shutdown()
    task = asyncio.create_task(daemon.run(settings, shutdown), name="daemon")
    try:
        yield shutdown
    finally:
        shutdown.request()
        await task


async def wait_until(
    condition: Callable[[], Any], *, timeout_s: float = 30.0, interval_s: float = 0.05
) -> Any:
    """Poll an (async) condition until it is truthy; fail the test at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


async def has_state(pool: ledger.Pool, campaign_id: str, state: str) -> bool:
    return await campaign_state(pool, campaign_id) == state


async def is_done(pool: ledger.Pool, campaign_id: str) -> bool:
    return await has_state(pool, campaign_id, "done")


async def dead_count_is(redis: aioredis.Redis, count: int) -> bool:
    """Whether the dead-letter list holds exactly `count` jobs."""
    return await redis.llen("blastd:dead") == count


async def campaign_counts(pool: ledger.Pool, campaign_id: str) -> dict[str, int]:
    return await ledger.count_states(pool, campaign_id)


async def campaign_state(pool: ledger.Pool, campaign_id: str) -> str | None:
    state: str | None = await pool.fetchval(
        "SELECT state FROM campaigns WHERE id = $1", campaign_id
    )
    return state


def webhook_url(admin_port: int) -> str:
    return f"http://127.0.0.1:{admin_port}/webhooks/cloud_api/{ACCOUNT}"


def daemon_env(servers: Servers, sandbox_url: str, admin_port: int, **extra: str) -> dict[str, str]:
    """Environment for a real `blastd run` process against the test servers and the sandbox."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLASTD_")}
    env.update(
        {
            "BLASTD_REDIS_URL": servers.redis_url,
            "BLASTD_DATABASE_URL": servers.database_url,
            "BLASTD_ACCOUNTS": accounts_env(sandbox_url),
            "BLASTD_ADMIN__PORT": str(admin_port),
            "BLASTD_INSTANCE_ID": "test-process",
            "BLASTD_INSTANCE_TTL_S": "1",
            "BLASTD_HEARTBEAT_INTERVAL_S": "0.25",
            "BLASTD_LOG_FORMAT": "json",
            "BLASTD_UNCERTAIN_POLICY": "hold",
            "BLASTD_RECONCILE_WINDOW_S": "0.2",
            "BLASTD_RECONCILE_INTERVAL_S": "0.1",
            **extra,
        }
    )
    return env


def spawn_daemon(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "blastd", "run"], env=env, stdout=log, stderr=subprocess.STDOUT
        )


async def finish_after_kills(
    env: dict[str, str],
    log_path: Path,
    admin_port: int,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    campaign_id: str,
    done_timeout_s: float,
) -> None:
    """After the kills: one more daemon runs the campaign to done and waits until no recipient
    left 'uncertain' is one the sandbox received (its webhook resolves those), then drains."""
    final = spawn_daemon(env, log_path)
    try:
        await wait_until(lambda: is_ready(admin_port), timeout_s=30)
        await wait_until(lambda: is_done(pool, campaign_id), timeout_s=done_timeout_s)
        await wait_until(lambda: _uncertain_received(pool, sandbox), timeout_s=60, interval_s=0.5)
    finally:
        final.send_signal(signal.SIGTERM)
        assert final.wait(timeout=30) == 0


async def _uncertain_received(pool: ledger.Pool, sandbox: SandboxHandle) -> bool:
    """True once no 'uncertain' recipient is one the sandbox actually received."""
    received = await sandbox.recipients()
    phones = await pool.fetch("SELECT phone FROM recipients WHERE state = 'uncertain'")
    return not any(received.get(digits(r["phone"])) for r in phones)


async def is_ready(admin_port: int) -> bool:
    """True once the daemon's /readyz answers 200 (it installs its signal handlers before)."""
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"http://127.0.0.1:{admin_port}/readyz", timeout=aiohttp.ClientTimeout(total=1)
            ) as response,
        ):
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


@dataclass
class DaemonUnderTest:
    """A daemon running in this event loop: its Shutdown and the task that runs it."""

    shutdown: Shutdown
    task: asyncio.Task[None]


@contextlib.asynccontextmanager
async def running_daemon_task(settings: Settings) -> AsyncIterator[DaemonUnderTest]:
    """Like running_daemon, but the test also sees the task, to check it is still running."""
    shutdown = Shutdown()
    task = asyncio.create_task(daemon.run(settings, shutdown), name="daemon")
    try:
        yield DaemonUnderTest(shutdown, task)
    finally:
        shutdown.request()
        await task


def blast_job(job_id: str, numbers: list[str], **fields: Any) -> bytes:
    """A blast job for `numbers` (a text message unless `message` is given), as pushed."""
    job: dict[str, Any] = {
        "type": "blast",
        "id": job_id,
        "account": ACCOUNT,
        "message": {"text": "Halo {name}"},
        "recipients": [{"to": n, "vars": {"name": f"N{i}"}} for i, n in enumerate(numbers)],
        **fields,
    }
    return orjson.dumps(job)


def key_job(job_id: str, key: str, **fields: Any) -> bytes:
    """A blast job that reads its recipients from the Redis list `key` (a plain text message
    unless `message` is given), as pushed."""
    job = {
        "type": "blast",
        "id": job_id,
        "account": ACCOUNT,
        "message": {"text": "hi"},
        "recipients_key": key,
        **fields,
    }
    return orjson.dumps(job)


async def push_numbers(redis: aioredis.Redis, key: str, numbers: list[str]) -> None:
    """Append `numbers` to the list `key` as recipient entries, 10,000 per command."""
    for start in range(0, len(numbers), 10_000):
        await redis.rpush(key, *(orjson.dumps({"to": n}) for n in numbers[start : start + 10_000]))


def numbers_from(first: int, count: int) -> list[str]:
    """`count` distinct valid Indonesian mobile numbers in E.164, starting at +62812<first>."""
    return [f"+62812{n:08d}" for n in range(first, first + count)]


def digits(number: str) -> str:
    """An E.164 number as the providers write it: without the plus."""
    return number.lstrip("+")


def retry(attempts: int, initial_s: float = 0.001, max_s: float = 0.005) -> dict[str, Any]:
    """Account override: transient retries with tiny delays and no jitter."""
    return {"retry": {"attempts": attempts, "initial_s": initial_s, "max_s": max_s, "jitter_s": 0}}


LogEntry = TypeVar("LogEntry", bound=Mapping[str, Any])


def events_named(logs: Iterable[LogEntry], event: str) -> list[LogEntry]:
    return [entry for entry in logs if entry["event"] == event]


async def rows_by_phone(pool: ledger.Pool, campaign_id: str) -> dict[str, Any]:
    return {row["phone"]: row for row in await recipient_rows(pool, campaign_id)}


async def recipient_rows(pool: ledger.Pool, campaign_id: str) -> list[Any]:
    """Every recipient row of a campaign, in producer order."""
    return list(
        await pool.fetch(
            "SELECT * FROM recipients WHERE campaign_id = $1 ORDER BY seq", campaign_id
        )
    )


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


async def run_cli(env: dict[str, str], *args: str, timeout_s: float = 60.0) -> CliResult:
    """Run `python -m blastd ARGS` without blocking the loop (an in-process daemon may run)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "blastd",
        *args,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return CliResult(process.returncode, stdout.decode(), stderr.decode())


@contextlib.asynccontextmanager
async def daemon_process(
    env: dict[str, str], stdout_path: Path, stderr_path: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A real `blastd run`, its stdout and stderr in files; SIGTERM and reaped on the way out."""
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "blastd", "run", env=env, stdout=stdout, stderr=stderr
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise


# --- Wablas ----------------------------------------------------------------------------------

WABLAS_ACCOUNT = "wablas-main"
WABLAS_WEBHOOK_SECRET = "sandbox-webhook-secret"


@contextlib.asynccontextmanager
async def wablas_sandbox(**knobs: Any) -> AsyncIterator[SandboxHandle]:
    """The Wablas emulator mounted at /wablas, as `python -m blastd.sandbox` serves it, on a
    free loopback port (seed 7 unless given); the handle's url ends in /wablas."""
    root = web.Application()
    config = WablasSandboxConfig.model_validate({"seed": 7, **knobs})
    root.add_subapp("/wablas", build_wablas_app(config))
    async with listening(root, "127.0.0.1", 0) as url, aiohttp.ClientSession() as http:
        yield SandboxHandle(url + "/wablas", http)


def make_wablas_settings(servers: Servers, sandbox_url: str, **overrides: Any) -> Settings:
    """Settings for a daemon under test whose one account is a Wablas device on the sandbox."""
    account = {
        "kind": "wablas",
        "base_url": sandbox_url,
        "token": TOKEN,
        "webhook_secret": WABLAS_WEBHOOK_SECRET,
        "batch_size": 100,
        "rate_per_s": 0,
        "concurrency": 5,
        "retry": {"attempts": 3, "initial_s": 0.01, "max_s": 0.05, "jitter_s": 0.01},
        **overrides.pop("account", {}),
    }
    accounts = {WABLAS_ACCOUNT: WablasAccount.model_validate(account)}
    return make_settings(servers, sandbox_url, accounts=accounts, **overrides)


def wablas_webhook_url(admin_port: int) -> str:
    return f"http://127.0.0.1:{admin_port}/webhooks/wablas/{WABLAS_ACCOUNT}"


# --- Readiness and logs of a real daemon process ----------------------------------------------


async def readiness(admin_port: int) -> tuple[int | None, dict[str, Any]]:
    """/readyz's status code and body; (None, {}) while nothing answers on the port."""
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"http://127.0.0.1:{admin_port}/readyz", timeout=aiohttp.ClientTimeout(total=1)
            ) as response,
        ):
            body: dict[str, Any] = await response.json()
            return response.status, body
    except (aiohttp.ClientError, TimeoutError):
        return None, {}


def log_events(log_path: Path) -> list[dict[str, Any]]:
    """The JSON log lines a daemon process wrote (other lines, e.g. tracebacks, skipped)."""
    events = []
    for line in log_path.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            event = orjson.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events


# --- Emulators on loopback -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(app: web.Application, prefix: str = "") -> AsyncIterator[str]:
    """An emulator's aiohttp app on a free loopback port, mounted at `prefix` the way
    `python -m blastd.sandbox` mounts the other providers; yields the URL ending in `prefix`."""
    root = app
    if prefix:
        root = web.Application()
        root.add_subapp(prefix, app)
    async with listening(root, "127.0.0.1", 0) as url:
        yield url + prefix


def cloud_api_emulator(
    config: SandboxConfig | None = None, now: Callable[[], float] = time.monotonic
) -> contextlib.AbstractAsyncContextManager[str]:
    """The Cloud API emulator on a free loopback port; yields its base URL."""
    return serving(build_app(config or SandboxConfig(), now))


def ultramsg_emulator(
    config: UltraMsgSandboxConfig | None = None,
) -> contextlib.AbstractAsyncContextManager[str]:
    """The UltraMsg emulator mounted at /ultramsg; yields the URL ending in /ultramsg."""
    return serving(build_ultramsg_app(config or UltraMsgSandboxConfig()), "/ultramsg")


def status_emulator(**knobs: Any) -> contextlib.AbstractAsyncContextManager[str]:
    """The status gateway emulator mounted at /status; yields the URL ending in /status."""
    return serving(build_status_app(StatusSandboxConfig.model_validate(knobs)), "/status")


async def poll_stats(
    http: aiohttp.ClientSession, base_url: str, condition: Callable[[Any], bool]
) -> Any:
    """/_sandbox/stats once `condition` holds: an emulator counts a webhook just after its POST."""

    async def matching_stats() -> Any:
        stats = await sandbox_json(http, base_url, "stats")
        return stats if condition(stats) else None

    return await wait_until(matching_stats, timeout_s=10, interval_s=0.01)


@contextlib.contextmanager
def sandbox_process(*flags: str) -> Iterator[str]:
    """`python -m blastd.sandbox` on a free port until the block exits; yields the base URL it
    announces on stdout once bound."""
    command = [sys.executable, "-m", "blastd.sandbox", "--port", "0", *flags]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("sandbox listening on http://127.0.0.1:"), line
            yield line.removeprefix("sandbox listening on ").strip()
        finally:
            process.terminate()


# --- HTTP to the emulators -------------------------------------------------------------------


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


async def get_json(
    http: aiohttp.ClientSession, url: str, headers: Mapping[str, str] | None = None
) -> Any:
    """The JSON body of a GET that must answer 200."""
    async with http.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        return orjson.loads(await response.read())


async def sandbox_json(http: aiohttp.ClientSession, base_url: str, name: str) -> Any:
    """One of an emulator's own views (stats, recipients, jobs...) under /_sandbox/."""
    return await get_json(http, f"{base_url}/_sandbox/{name}")


async def set_knobs(http: aiohttp.ClientSession, base_url: str, **knobs: Any) -> None:
    """Reconfigure a running emulator through its /_sandbox/config."""
    async with http.post(f"{base_url}/_sandbox/config", json=knobs) as response:
        assert response.status == 200, await response.text()


async def json_request(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    document: object = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    """One request; the JSON answer when it is JSON, else the raw bytes."""
    data = None if document is None else orjson.dumps(document)
    async with http.request(method, url, data=data, headers=headers) as response:
        raw = await response.read()
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = raw
        return response.status, body, dict(response.headers)


async def moment_before_first_request(sandbox: SandboxHandle, start: float) -> float:
    """The start of the last poll that found no request: the first one arrived after it."""
    before = start

    async def has_a_request() -> bool:
        nonlocal before
        polled_at = time.monotonic()
        if (await sandbox.stats())["requests"]:
            return True
        before = polled_at
        return False

    await wait_until(has_a_request, interval_s=0.005)
    return before


def max_in_any_window(times: list[float], width_s: float) -> int:
    """Most releases in any window [t, t + width_s); the busiest one starts at a release."""
    return max(
        (bisect.bisect_left(times, start + width_s) - i for i, start in enumerate(times)),
        default=0,
    )
