"""The whole stack for a benchmark: servers, the sandbox and `blastd run` as real processes.

Valkey and PostgreSQL come from the pip wheels (blastd.embedded) in a temporary directory, the
Cloud API sandbox runs as `python -m blastd.sandbox` and the daemon as `python -m blastd run`,
so each has its own interpreter and event loop, as in production. Jobs go in through Redis and
completion is read from PostgreSQL: the benchmark sees the daemon only from the outside.

Set BENCH_PROFILE_DIR to run every daemon under cProfile; the stats land in that directory
(`python -m pstats FILE`) once the daemon exits after SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import psutil
import redis.asyncio as aioredis

from blastd.embedded import EmbeddedPostgres, EmbeddedRedis, free_port

ACCOUNT = "bench"
TOKEN = "sandbox-token"
PHONE_NUMBER_ID = "100000000000001"
JOBS_KEY = "blastd:jobs"
TEXT = "Halo! Promo November: diskon 20% untuk semua produk sampai akhir bulan."
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
PUSH_CHUNK = 10_000


def cpu_s(*processes: psutil.Process) -> float:
    """CPU seconds (user + system) the processes have used, summed."""
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def postgres_cpu_s(root: Path) -> float:
    """CPU seconds of the stack's PostgreSQL: the postmaster and its live children (the
    daemons' pools keep their backends up; one that ends between two samples takes its CPU
    with it)."""
    pid = int((root / "postgres" / "pgdata" / "postmaster.pid").read_text().split()[0])
    postmaster = psutil.Process(pid)
    total = cpu_s(postmaster)
    for child in postmaster.children():
        try:
            total += cpu_s(child)
        except psutil.Error:
            continue  # a backend that ended meanwhile
    return total


@dataclass
class Stack:
    """Addresses of the running servers and clients to reach them."""

    root: Path
    redis_url: str
    database_url: str
    sandbox_url: str
    sandbox_pid: int
    redis: aioredis.Redis
    pool: asyncpg.Pool
    http: aiohttp.ClientSession
    postgres: EmbeddedPostgres  # a fault benchmark stops and starts it
    daemons: list[Daemon] = field(default_factory=list)  # stopped before the servers

    async def sandbox_get(self, path: str) -> Any:
        async with self.http.get(f"{self.sandbox_url}/_sandbox/{path}") as response:
            response.raise_for_status()
            return orjson.loads(await response.read())

    async def sandbox_post(self, path: str, document: object) -> None:
        async with self.http.post(
            f"{self.sandbox_url}/_sandbox/{path}", data=orjson.dumps(document)
        ) as response:
            response.raise_for_status()


@contextlib.asynccontextmanager
async def running_stack(
    *, fsync: bool = True, postgres_settings: Sequence[str] = ()
) -> AsyncIterator[Stack]:
    """Valkey, PostgreSQL (with `postgres_settings`, `name=value` each) and the sandbox, stopped
    (SIGTERM) and deleted on the way out."""
    with (
        tempfile.TemporaryDirectory(prefix="blastd-bench-") as tmp,
        _servers(Path(tmp), fsync, postgres_settings) as (
            redis_url,
            postgres,
            (sandbox_url, sandbox_pid),
        ),
    ):
        client = aioredis.Redis.from_url(redis_url)
        database_url = postgres.url
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            async with aiohttp.ClientSession() as http:
                stack = Stack(
                    Path(tmp),
                    redis_url,
                    database_url,
                    sandbox_url,
                    sandbox_pid,
                    client,
                    pool,
                    http,
                    postgres,
                )
                try:
                    yield stack
                finally:
                    for daemon in stack.daemons:
                        await daemon.stop()
        finally:
            await pool.close()
            await client.aclose()


@contextlib.contextmanager
def _servers(
    root: Path, fsync: bool, postgres_settings: Sequence[str]
) -> Iterator[tuple[str, EmbeddedPostgres, tuple[str, int]]]:
    with contextlib.ExitStack() as stack:
        redis = EmbeddedRedis(root / "redis")
        redis.start()
        stack.callback(redis.stop)
        postgres = EmbeddedPostgres(root / "postgres", fsync=fsync, settings=postgres_settings)
        postgres.start()
        stack.callback(postgres.stop)
        yield redis.url, postgres, _start_sandbox(stack, root / "sandbox.log")


def _start_sandbox(stack: contextlib.ExitStack, log_path: Path) -> tuple[str, int]:
    """`python -m blastd.sandbox` on a free port; its URL (from the line it prints) and pid."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "blastd.sandbox", "--port", "0", "--seed", "7"],
            stdout=subprocess.PIPE,
            stderr=log,
        )
    stack.callback(_terminate, process)
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line.startswith("sandbox listening on "):
        raise RuntimeError(f"the sandbox did not start; see {log_path}")
    return line.removeprefix("sandbox listening on ").strip(), process.pid


def _terminate(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


# --- the daemon ------------------------------------------------------------------------------


@dataclass
class Daemon:
    """One `blastd run` process and its admin port."""

    process: subprocess.Popen[bytes]
    admin_port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait_ready(self) -> None:
        """Return once /readyz answers 200; fail if the process dies or takes too long."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not await self._is_ready():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"blastd exited with {self.process.returncode}; see {self.log_path}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"blastd not ready within {READY_TIMEOUT_S} s")
            await asyncio.sleep(0.05)

    async def _is_ready(self) -> bool:
        url = f"http://127.0.0.1:{self.admin_port}/readyz"
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(url, timeout=aiohttp.ClientTimeout(total=1)) as response,
            ):
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def stop(self) -> int:
        """SIGTERM (a drain), then wait for the exit code."""
        return await asyncio.to_thread(_terminate, self.process)


def account_settings(sandbox_url: str, *, rate_per_s: float, concurrency: int) -> dict[str, object]:
    """One Cloud API account on the sandbox."""
    return {
        "kind": "cloud_api",
        "base_url": sandbox_url,
        "phone_number_id": PHONE_NUMBER_ID,
        "token": TOKEN,
        "rate_per_s": rate_per_s,
        "concurrency": concurrency,
    }


def wablas_account_settings(
    sandbox_url: str, *, batch_size: int, rate_per_s: float, concurrency: int
) -> dict[str, object]:
    """One Wablas device on the sandbox's /wablas emulator; rate_per_s counts requests."""
    return {
        "kind": "wablas",
        "base_url": f"{sandbox_url}/wablas",
        "token": TOKEN,
        "batch_size": batch_size,
        "rate_per_s": rate_per_s,
        "concurrency": concurrency,
    }


def daemon_env(
    stack: Stack,
    account: dict[str, object],
    admin_port: int,
    other_accounts: Mapping[str, dict[str, object]] | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """BLASTD_* for a daemon on this stack; every other setting keeps its production default,
    unless `extra_env` says otherwise. `account` is named ACCOUNT; `other_accounts` join it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLASTD_")}
    accounts = {ACCOUNT: account, **(other_accounts or {})}
    env.update(
        {
            "BLASTD_REDIS_URL": stack.redis_url,
            "BLASTD_DATABASE_URL": stack.database_url,
            "BLASTD_ACCOUNTS": orjson.dumps(accounts).decode(),
            "BLASTD_ADMIN__PORT": str(admin_port),
            "BLASTD_INSTANCE_ID": f"bench-{admin_port}",
            "BLASTD_LOG_FORMAT": "json",
            **(extra_env or {}),
        }
    )
    return env


def spawn_daemon(
    stack: Stack, account: dict[str, object], admin_port: int | None = None, **env: Any
) -> Daemon:
    """Spawn `python -m blastd run` for one account (daemon_env's keywords pass through); the
    stack stops it on the way out."""
    admin_port = admin_port or free_port()
    log_path = stack.root / f"daemon-{admin_port}.log"
    process = _spawn(daemon_env(stack, account, admin_port, **env), log_path, admin_port)
    daemon = Daemon(process, admin_port, log_path)
    stack.daemons.append(daemon)
    return daemon


async def start_daemon(
    stack: Stack, account: dict[str, object], admin_port: int | None = None, **env: Any
) -> Daemon:
    """Spawn a daemon and wait until it is ready."""
    daemon = spawn_daemon(stack, account, admin_port, **env)
    await daemon.wait_ready()
    return daemon


async def start_daemons(stack: Stack, account: dict[str, object], count: int) -> list[Daemon]:
    """Spawn `count` daemons (each its own instance id) sharing the stack; wait for all."""
    daemons = [spawn_daemon(stack, account) for _ in range(count)]
    await asyncio.gather(*(daemon.wait_ready() for daemon in daemons))
    return daemons


def _spawn(env: dict[str, str], log_path: Path, admin_port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "blastd", "run"]
    profile_dir = os.environ.get("BENCH_PROFILE_DIR")
    if profile_dir:
        profile_path = Path(profile_dir) / f"daemon-{admin_port}.pstats"
        command[1:1] = ["-m", "cProfile", "-o", str(profile_path)]
    with log_path.open("ab") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


# --- jobs ------------------------------------------------------------------------------------


def phone_numbers(count: int) -> list[str]:
    """`count` distinct valid Indonesian mobile numbers in E.164."""
    return [f"+62813{n:08d}" for n in range(20_000_000, 20_000_000 + count)]


def recipients_key(campaign_id: str) -> str:
    return f"blastd:recipients:{campaign_id}"


async def push_recipients(redis: aioredis.Redis, key: str, numbers: Sequence[str]) -> None:
    """RPUSH the numbers to `key` in chunks, before the job that names the key."""
    for start in range(0, len(numbers), PUSH_CHUNK):
        await redis.rpush(key, *numbers[start : start + PUSH_CHUNK])


async def push_job(redis: aioredis.Redis, campaign_id: str) -> float:
    """LPUSH a text blast over recipients_key(campaign_id); the monotonic time it was pushed."""
    job = {
        "type": "blast",
        "id": campaign_id,
        "account": ACCOUNT,
        "message": {"text": TEXT},
        "recipients_key": recipients_key(campaign_id),
    }
    pushed_at = time.monotonic()
    await redis.lpush(JOBS_KEY, orjson.dumps(job))
    return pushed_at


@dataclass(frozen=True, slots=True)
class CampaignTimes:
    """Monotonic times at which the bench saw the campaign in the ledger, then 'done'."""

    created_at: float
    done_at: float


async def wait_until_done(
    pool: asyncpg.Pool, campaign_id: str, *, timeout_s: float, poll_s: float = 0.005
) -> CampaignTimes:
    """Poll the ledger until the campaign is 'done'; when it appeared and when it was done."""
    deadline = time.monotonic() + timeout_s
    created_at = None
    while True:
        state = await pool.fetchval("SELECT state FROM campaigns WHERE id = $1", campaign_id)
        now = time.monotonic()
        if state is not None and created_at is None:
            created_at = now
        if state == "done":
            assert created_at is not None
            return CampaignTimes(created_at, now)
        if state not in (None, "running"):
            raise RuntimeError(f"campaign {campaign_id} ended {state!r}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"campaign {campaign_id} not done within {timeout_s} s")
        await asyncio.sleep(poll_s)


async def recipient_states(pool: asyncpg.Pool, campaign_id: str) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT state, count(*) AS n FROM recipients WHERE campaign_id = $1 GROUP BY state",
        campaign_id,
    )
    return {r["state"]: r["n"] for r in rows}
