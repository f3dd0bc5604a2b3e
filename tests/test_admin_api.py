"""The admin API: campaign status as JSON, its server-sent-event stream, the Redis channel
behind it, and the bearer token in front of /metrics and /v1/*."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from blastd import controls, daemon, ledger
from blastd.config import AdminSettings, Settings
from blastd.embedded import free_port
from blastd.shutdown import Shutdown
from tests.harness import (
    APP_SECRET,
    SandboxHandle,
    Servers,
    blast_job,
    daemon_env,
    has_state,
    is_ready,
    make_settings,
    numbers_from,
    run_cli,
    running_daemon,
    wait_until,
    webhook_url,
)

JOBS = "blastd:jobs"
ADMIN_TOKEN = "admin-token-for-tests"
STREAM_TIMEOUT_S = 60.0

Status = dict[str, Any]


def base_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


async def sse_records(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, str]]:
    """(event name, data) for each event of a text/event-stream; ("comment", text) for each
    comment line."""
    event, data = "message", []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith(":"):
            yield "comment", line[1:].strip()
        elif not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        else:
            name, _, text = line.partition(":")
            if name == "event":
                event = text.strip()
            elif name == "data":
                data.append(text.removeprefix(" "))


async def progress_until_final(response: aiohttp.ClientResponse) -> list[Status]:
    """Every progress event up to the stream's end, which must follow a final state."""
    events = [
        orjson.loads(data) async for name, data in sse_records(response) if name == "progress"
    ]
    assert events, "the stream ended without an event"
    return events


async def channel_until_final(pubsub: aioredis.client.PubSub) -> list[Status]:
    events: list[Status] = []
    while not events or events[-1]["state"] == "running":
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is not None:
            events.append(orjson.loads(message["data"]))
    return events


async def test_event_stream_and_redis_channel_carry_the_same_progress_until_done(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """The stream opens before the job is pushed (a campaign not created yet is waited for), so
    every event it relays came from the channel, and the channel's subscriber sees the same."""
    port = free_port()
    settings = make_settings(servers, sandbox.url, admin_port=port, progress_interval_s=0.02)
    subscriber = redis.pubsub()
    await subscriber.subscribe("blastd:events:sse-1")
    job = blast_job("sse-1", numbers_from(42_000_000, 30), options={"rate_per_s": 30})
    async with running_daemon(settings), aiohttp.ClientSession() as http:
        await wait_until(lambda: is_ready(port))
        async with http.get(f"{base_url(port)}/v1/campaigns/sse-1/events") as response:
            assert response.status == 200
            assert response.content_type == "text/event-stream"
            await redis.lpush(JOBS, job)
            streamed, published = await asyncio.wait_for(
                asyncio.gather(progress_until_final(response), channel_until_final(subscriber)),
                STREAM_TIMEOUT_S,
            )
        async with http.get(f"{base_url(port)}/v1/campaigns/sse-1") as response:
            status = await response.json()
    await subscriber.aclose()

    assert streamed == published
    assert len(streamed) >= 2
    assert [event["state"] for event in streamed] == ["running"] * (len(streamed) - 1) + ["done"]
    done = [event["done"] for event in streamed]
    assert done == sorted(done)
    assert streamed[-1] == status
    assert (status["done"], status["total"], status["counts"]) == (30, 30, {"sent": 30})


async def test_campaign_status_is_the_json_blastd_status_prints(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    port = free_port()
    job = blast_job("as-json", [*numbers_from(42_000_100, 3), "12"])
    async with running_daemon(make_settings(servers, sandbox.url, admin_port=port)):
        await redis.lpush(JOBS, job)
        await wait_until(lambda: has_state(pool, "as-json", "done"))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base_url(port)}/v1/campaigns/as-json") as response:
                assert response.status == 200
                served = await response.json()
            async with http.get(f"{base_url(port)}/v1/campaigns/no-such-campaign") as response:
                assert response.status == 404
    printed = await run_cli(daemon_env(servers, sandbox.url, 0), "status", "as-json", "--json")
    assert printed.code == 0, printed.stderr
    assert served == orjson.loads(printed.stdout)
    assert (served["state"], served["counts"]) == ("done", {"sent": 3, "skipped": 1})


async def test_event_stream_ends_with_the_state_an_operator_left_the_campaign_in(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """A campaign held by not_before is running; an operator's pause ends the daemon's run,
    whose last event carries 'paused' and ends the stream."""
    port = free_port()
    settings = make_settings(servers, sandbox.url, admin_port=port)
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    job = blast_job("paused-sse", numbers_from(42_000_200, 3), options={"not_before": later})
    async with running_daemon(settings), aiohttp.ClientSession() as http:
        await redis.lpush(JOBS, job)
        await wait_until(lambda: has_state(pool, "paused-sse", "running"))
        async with http.get(f"{base_url(port)}/v1/campaigns/paused-sse/events") as response:
            records = sse_records(response)
            first = orjson.loads((await anext(records))[1])
            await controls.apply_control(pool, "paused-sse", "pause")
            rest = [orjson.loads(data) async for name, data in records if name == "progress"]
    assert (first["state"], first["done"], first["total"]) == ("running", 0, 3)
    assert rest[-1]["state"] == "paused"
    assert rest[-1]["state_reason"] == controls.OPERATOR


async def test_event_stream_sends_heartbeats_and_does_not_hold_the_daemon_at_exit(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """An open stream on a waiting campaign gets comment lines; stopping the daemon ends it at
    once, instead of after aiohttp's 60 s shutdown timeout (the bound below is half of it)."""
    port = free_port()
    admin = AdminSettings(port=port, sse_heartbeat_s=0.05)
    settings = make_settings(servers, sandbox.url, admin=admin)
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    job = blast_job("idle-sse", numbers_from(42_000_300, 2), options={"not_before": later})
    shutdown = Shutdown()
    task = asyncio.create_task(daemon.run(settings, shutdown), name="daemon")
    try:
        async with aiohttp.ClientSession() as http:
            await redis.lpush(JOBS, job)
            await wait_until(lambda: has_state(pool, "idle-sse", "running"))
            async with http.get(f"{base_url(port)}/v1/campaigns/idle-sse/events") as response:
                records = sse_records(response)
                comments = [record async for record in _first_comments(records, 2)]
                shutdown.request()
                await asyncio.wait_for(task, 30)
                leftover = [record async for record in records]
    finally:
        if not task.done():
            shutdown.request()
            await task
    assert [text for _name, text in comments] == ["heartbeat", "heartbeat"]
    assert all(name == "comment" for name, _ in leftover), "no event: the campaign only waited"


async def _first_comments(
    records: AsyncIterator[tuple[str, str]], count: int
) -> AsyncIterator[tuple[str, str]]:
    """The first `count` comment records; the events before them are checked and skipped."""
    seen = 0
    async for name, data in records:
        if name == "comment":
            yield name, data
            seen += 1
            if seen == count:
                return
        else:
            assert orjson.loads(data)["state"] == "running"


# --- the bearer token ------------------------------------------------------------------------


async def test_bearer_token_guards_metrics_and_v1_but_not_health_or_webhooks(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    port = free_port()
    admin = AdminSettings.model_validate({"port": port, "token": ADMIN_TOKEN})
    settings = make_settings(servers, sandbox.url, admin=admin)
    right = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    wrong = {"Authorization": "Bearer not-the-token"}
    url = base_url(port)
    async with running_daemon(settings), aiohttp.ClientSession() as http:
        await wait_until(lambda: is_ready(port))
        for path in ("/metrics", "/v1/campaigns/x", "/v1/campaigns/x/events"):
            assert await status_of(http, url + path) == 401, path
            assert await status_of(http, url + path, wrong) == 401, path
            assert await status_of(http, f"{url}{path}?token={ADMIN_TOKEN}") == 401, path
            assert await status_of(http, url + path, {"Authorization": ADMIN_TOKEN}) == 401, path
        assert await status_of(http, url + "/metrics", right) == 200
        assert await status_of(http, url + "/v1/campaigns/x", right) == 404  # past the check
        assert await status_of(http, url + "/healthz") == 200
        assert await status_of(http, url + "/readyz") == 200
        assert await signed_empty_webhook(http, webhook_url(port)) == 200


async def status_of(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> int:
    async with http.get(url, headers=headers) as response:
        if response.status == 401:
            assert response.headers["WWW-Authenticate"] == "Bearer"
        return response.status


async def signed_empty_webhook(http: aiohttp.ClientSession, url: str) -> int:
    """A status webhook with no statuses, signed as Meta signs: no bearer token needed."""
    body = orjson.dumps({"object": "whatsapp_business_account", "entry": []})
    signature = hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"X-Hub-Signature-256": f"sha256={signature}", "Content-Type": "application/json"}
    async with http.post(url, data=body, headers=headers) as response:
        return response.status


def test_admin_token_comes_from_the_credential_file_and_is_scrubbed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in [n for n in os.environ if n.startswith("BLASTD_")]:
        monkeypatch.delenv(name)
    (tmp_path / "admin.token").write_text(ADMIN_TOKEN + "\n")
    settings = Settings(credentials_dir=tmp_path)
    assert settings.admin.token is not None
    assert settings.admin.token.get_secret_value() == ADMIN_TOKEN
    assert ADMIN_TOKEN in settings.secret_values()
