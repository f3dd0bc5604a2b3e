"""Configured secrets appear in no output: logs, CLI, dead-letter entries, ledger, Redis, argv.

Every secret is a canary: a random core no other text contains. The daemon runs as a real
process at debug level, uses each secret for real (the sandbox only accepts the canary token,
webhooks are signed with the canary app secret, the verify token comes from a systemd
credentials file), and is driven into the errors most likely to carry one: a provider that
echoes the token in its error body, a token revoked mid-run, rejected webhooks, dead jobs and
bad configuration. Then every place an operator or a producer can read is searched for the
canaries, raw, URL-encoded and base64-encoded.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from blastd import ledger
from blastd.embedded import free_port
from blastd.errors import EXIT_CONFIG
from blastd.sandbox.cloud_api import listening
from tests.harness import (
    ACCOUNT,
    PHONE_NUMBER_ID,
    CliResult,
    SandboxHandle,
    Servers,
    daemon_env,
    daemon_process,
    dead_count_is,
    has_state,
    is_ready,
    run_cli,
    wait_until,
    webhook_url,
)

ECHO_ACCOUNT = "cloud-echo"
NUMBERS = [f"+62812{n:08d}" for n in range(50_000_000, 50_000_000 + 5)]
SECRET_KINDS = ("token", "echo_token", "app_secret", "verify_token")


class Canary:
    """A secret whose random core survives URL-encoding, so finding the core finds both."""

    def __init__(self, kind: str) -> None:
        self.core = secrets.token_hex(12)
        self.value = f"cnry-{kind}-{self.core}+/="

    def forms(self) -> list[str]:
        raw = self.value.encode()
        return [
            self.core,
            base64.b64encode(raw).decode(),
            base64.urlsafe_b64encode(raw).decode(),
        ]


@pytest.fixture
def canaries() -> dict[str, Canary]:
    return {kind: Canary(kind) for kind in SECRET_KINDS}


@pytest.fixture
async def echoing_provider() -> AsyncIterator[str]:
    """A Graph look-alike that rejects every send with the caller's token in the error text,
    as Meta's 'Malformed access token …' answers do."""

    async def reject(request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        error = {
            "message": f"Malformed access token {token}",
            "type": "OAuthException",
            "code": 190,
            "error_data": {"details": f"access token {token} is not valid"},
        }
        return web.json_response({"error": error}, status=401)

    app = web.Application()
    app.router.add_post("/{version}/{phone_number_id}/messages", reject)
    async with listening(app, "127.0.0.1", 0) as url:
        yield url


def accounts_json(sandbox_url: str, echo_url: str, canaries: dict[str, Canary]) -> str:
    common = {"kind": "cloud_api", "phone_number_id": PHONE_NUMBER_ID, "rate_per_s": 0}
    return orjson.dumps(
        {
            ACCOUNT: {
                **common,
                "base_url": sandbox_url,
                "token": canaries["token"].value,
                "app_secret": canaries["app_secret"].value,
            },
            ECHO_ACCOUNT: {**common, "base_url": echo_url, "token": canaries["echo_token"].value},
        }
    ).decode()


def blast(job_id: str, account: str, numbers: list[str]) -> bytes:
    return orjson.dumps(
        {
            "type": "blast",
            "id": job_id,
            "account": account,
            "message": {"text": "Halo"},
            "recipients": [{"to": n} for n in numbers],
        }
    )


INVALID_JOBS = [
    b'{"type": "blast", "id": ',
    blast("dead-account", "nobody", ["+6281250000099"]),
    orjson.dumps({"type": "launch", "id": "dead-type"}),
    orjson.dumps({"type": "blast", "id": "dead-message", "account": ACCOUNT, "recipients": []}),
    blast("dead-numbers", ACCOUNT, ["12", "not a number"]),
]


async def all_delivered(pool: ledger.Pool, campaign_id: str) -> bool:
    return await ledger.count_states(pool, campaign_id) == {"delivered": len(NUMBERS)}


async def test_configured_secrets_appear_in_no_output(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    echoing_provider: str,
    canaries: dict[str, Canary],
    tmp_path: Path,
) -> None:
    admin_port = free_port()
    await sandbox.configure(
        tokens=[canaries["token"].value],
        app_secret=canaries["app_secret"].value,
        webhook_url=webhook_url(admin_port),
        webhook_statuses=["sent", "delivered"],
    )
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / f"{ACCOUNT}.verify_token").write_text(canaries["verify_token"].value + "\n")
    env = daemon_env(
        servers,
        sandbox.url,
        admin_port,
        BLASTD_LOG_LEVEL="debug",
        BLASTD_ACCOUNTS=accounts_json(sandbox.url, echoing_provider, canaries),
        CREDENTIALS_DIRECTORY=str(credentials),
    )
    await redis.lpush("blastd:jobs", blast("secret-ok", ACCOUNT, NUMBERS))
    await redis.lpush("blastd:jobs", blast("secret-echo", ECHO_ACCOUNT, NUMBERS[:2]))
    await redis.lpush("blastd:jobs", *INVALID_JOBS)

    outputs: list[str] = []
    stdout_path, stderr_path = tmp_path / "daemon.out", tmp_path / "daemon.err"
    async with daemon_process(env, stdout_path, stderr_path) as process:
        outputs.append(command_line(process.pid))
        await wait_until(lambda: is_ready(admin_port))
        await wait_until(lambda: all_delivered(pool, "secret-ok"))
        await wait_until(lambda: has_state(pool, "secret-echo", "stopped"))
        await wait_until(lambda: dead_count_is(redis, len(INVALID_JOBS)))

        await sandbox.configure(tokens=["somebody-elses-token"])  # revoked while running
        await redis.lpush("blastd:jobs", blast("secret-revoked", ACCOUNT, NUMBERS))
        await wait_until(lambda: has_state(pool, "secret-revoked", "stopped"))

        outputs += await exercise_admin_surface(admin_port, canaries)
        results = await asyncio.gather(
            *(
                run_cli(env, "status", campaign_id, *flags)
                for campaign_id in ("secret-ok", "secret-echo", "secret-revoked")
                for flags in ((), ("--json",))
            ),
            run_cli(env, "check"),
        )
    assert process.returncode == 0, stderr_path.read_text()
    *statuses, check = results
    assert all(result.code == 0 for result in statuses), statuses
    # check sends the revoked token to prove it: refused, and said so without echoing it.
    assert check.code == 1, check
    assert f"FAIL account {ACCOUNT}: credentials refused" in check.stdout
    outputs += [stdout_path.read_text(), stderr_path.read_text()]
    outputs += [r.stdout + r.stderr for r in results]
    outputs += [r.stdout + r.stderr for r in await bad_config_runs(env, canaries)]

    echo_reason = await pool.fetchval("SELECT state_reason FROM campaigns WHERE id = 'secret-echo'")
    assert "access token [token] is not valid" in echo_reason  # the provider did echo it

    places = {
        "outputs": "\n".join(outputs),
        "dead letters": "\n".join(r.decode() for r in await redis.lrange("blastd:dead", 0, -1)),
        "ledger": await ledger_text(pool),
        "redis": await redis_text(redis),
    }
    for place, text in places.items():
        for kind, canary in canaries.items():
            for form in canary.forms():
                assert form not in text, f"the {kind} ({form}) appears in the {place}"


def command_line(pid: int) -> str:
    """What `ps` shows of a process: its argv, as anyone on the host may read it."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


async def exercise_admin_surface(admin_port: int, canaries: dict[str, Canary]) -> list[str]:
    """Health, the webhook handshake (wrong and right verify token) and an unsigned webhook."""
    base = f"http://127.0.0.1:{admin_port}"
    handshake = {"hub.mode": "subscribe", "hub.challenge": "challenge-1"}
    bodies = []
    async with aiohttp.ClientSession() as http:
        for path in ("/healthz", "/readyz"):
            async with http.get(base + path) as response:
                bodies.append(await response.text())
        url = webhook_url(admin_port)
        async with http.get(url, params={**handshake, "hub.verify_token": "wrong"}) as response:
            assert response.status == 403
            bodies.append(await response.text())
        right = {**handshake, "hub.verify_token": canaries["verify_token"].value}
        async with http.get(url, params=right) as response:
            assert (response.status, await response.text()) == (200, "challenge-1")
        body = b'{"entry": []}'
        bad = hmac.new(b"not-the-secret", body, hashlib.sha256).hexdigest()
        headers = {"X-Hub-Signature-256": f"sha256={bad}"}
        async with http.post(url, data=body, headers=headers) as response:
            assert response.status == 401
            bodies.append(await response.text())
    return bodies


async def bad_config_runs(env: dict[str, str], canaries: dict[str, Canary]) -> list[CliResult]:
    """`blastd run` and `check` refusing a config whose bad value sits next to the token."""
    token = canaries["token"].value
    account = {"kind": "cloud_api", "phone_number_id": "1", "token": token}
    bad_values = [
        orjson.dumps({ACCOUNT: {**account, "rate_per_s": "fast"}}).decode(),
        orjson.dumps({ACCOUNT: {**account, "kind": "telegram"}}).decode(),
        orjson.dumps({ACCOUNT: account}).decode()[:-2],  # cut off: not valid JSON
    ]
    results = await asyncio.gather(
        *(
            run_cli({**env, "BLASTD_ACCOUNTS": value}, command, timeout_s=30)
            for value in bad_values
            for command in ("run", "check")
        )
    )
    assert [r.code for r in results] == [EXIT_CONFIG] * len(results), results
    return list(results)


async def ledger_text(pool: ledger.Pool) -> str:
    rows: list[Any] = []
    for table in ("campaigns", "recipients"):
        rows += await pool.fetch(f"SELECT row_to_json(t)::text AS row FROM {table} t")
    return "\n".join(row["row"] for row in rows)


async def redis_text(redis: aioredis.Redis) -> str:
    """Every key in the test database with its value, whatever its type."""
    readers = {
        "string": lambda key: redis.get(key),
        "list": lambda key: redis.lrange(key, 0, -1),
        "set": lambda key: redis.smembers(key),
        "hash": lambda key: redis.hgetall(key),
        "zset": lambda key: redis.zrange(key, 0, -1),
    }
    parts: list[str] = []
    async for key in redis.scan_iter():
        value = await readers[(await redis.type(key)).decode()](key)
        parts.append(f"{key!r} {value!r}")
    assert parts, "nothing in Redis: the search would prove nothing"
    return "\n".join(parts)
