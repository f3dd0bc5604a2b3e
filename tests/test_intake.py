"""Intake end to end: jobs pushed onto Redis, the daemon in-process, the ledger and dead list read.

Every hostile job lands in {prefix}dead with its reason and its exact bytes, the daemon keeps
serving, and jobs a dead instance had taken are taken back.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from blastd import ledger
from blastd.embedded import free_port
from tests.harness import (
    SandboxHandle,
    Servers,
    blast_job,
    dead_count_is,
    is_done,
    key_job,
    make_settings,
    numbers_from,
    running_daemon,
    running_daemon_task,
    wait_until,
)
from tests.poison_jobs import MALFORMED_JOBS, REASON_WORDS

JOBS = "blastd:jobs"
DEAD = "blastd:dead"
PROCESSING = "blastd:processing:test-instance"
HALO = {"text": "Halo {name}"}


async def dead_entries(redis: aioredis.Redis) -> list[dict[str, Any]]:
    """The dead list, oldest first."""
    return [orjson.loads(raw) for raw in reversed(await redis.lrange(DEAD, 0, -1))]


def original_payload(entry: dict[str, Any]) -> bytes:
    """The job's bytes as the dead entry keeps them: as text, or base64 when not UTF-8."""
    if "payload" in entry:
        payload: str = entry["payload"]
        return payload.encode()
    return base64.b64decode(entry["payload_base64"])


async def answers_healthz(admin_port: int) -> bool:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{admin_port}/healthz") as response,
    ):
        return response.status == 200


async def intake_is_idle(redis: aioredis.Redis) -> bool:
    return await redis.llen(JOBS) + await redis.llen(PROCESSING) == 0


async def test_every_malformed_job_is_dead_lettered_and_the_daemon_keeps_serving(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    assert len(MALFORMED_JOBS) >= 25
    admin_port = free_port()
    settings = make_settings(servers, sandbox.url, admin_port=admin_port)
    good_numbers = numbers_from(10_000_000, 5)
    with capture_logs() as logs:
        async with running_daemon_task(settings) as running:
            for _name, raw in MALFORMED_JOBS:
                await redis.lpush(JOBS, raw)
            await wait_until(lambda: dead_count_is(redis, len(MALFORMED_JOBS)))
            assert not running.task.done()
            assert await answers_healthz(admin_port)
            await redis.lpush(JOBS, blast_job("after-poison", good_numbers))
            await wait_until(lambda: is_done(pool, "after-poison"))
            assert not running.task.done()

    entries = await dead_entries(redis)
    by_payload = {original_payload(entry): entry for entry in entries}
    assert len(by_payload) == len(MALFORMED_JOBS), "every payload kept, byte for byte"
    for name, raw in MALFORMED_JOBS:
        entry = by_payload[raw]
        assert REASON_WORDS[name].lower() in entry["reason"].lower(), (name, entry["reason"])
        assert entry["reason"].isprintable(), name  # one line
        assert "job_id" in entry
    poison = dict(MALFORMED_JOBS)
    assert by_payload[poison["unknown_account"]]["job_id"] == "poison-unknown_account"
    assert "payload_base64" in by_payload[poison["invalid_utf8"]]
    assert await ledger.count_states(pool, "after-poison") == {"sent": len(good_numbers)}
    assert await pool.fetchval("SELECT count(*) FROM campaigns") == 1
    assert await redis.llen(PROCESSING) == 0
    assert await redis.keys("blastd:deliveries:*") == []
    events = [entry["event"] for entry in logs]
    assert "job_crashed" not in events
    assert events.count("job_dead_lettered") == len(MALFORMED_JOBS)
    dead_logs = [entry for entry in logs if entry["event"] == "job_dead_lettered"]
    assert {entry["log_level"] for entry in dead_logs} == {"error"}


async def test_a_dead_letter_entry_names_the_job_id_when_the_job_had_one(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    raw = blast_job("no-valid-number", ["12", "call me"])
    async with running_daemon(make_settings(servers, sandbox.url)):
        await redis.lpush(JOBS, raw)
        await wait_until(lambda: dead_count_is(redis, 1))
    [entry] = await dead_entries(redis)
    assert entry["job_id"] == "no-valid-number"
    assert entry["reason"].startswith("no valid recipient")
    assert entry["payload"].encode() == raw
    assert await ledger.load_campaign(pool, "no-valid-number") is None


async def test_jobs_taken_by_a_dead_instance_are_recovered_and_sent(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """The dead instance is registered but holds no lease: the heartbeat reaps it."""
    numbers = numbers_from(10_000_100, 4)
    await redis.lpush("blastd:processing:dead-instance", blast_job("orphan", numbers))
    await redis.sadd("blastd:instances", "dead-instance")
    with capture_logs() as logs:
        async with running_daemon(make_settings(servers, sandbox.url)):
            await wait_until(lambda: is_done(pool, "orphan"))
            await wait_until(lambda: _not_registered(redis, "dead-instance"))
    assert await ledger.count_states(pool, "orphan") == {"sent": 4}
    assert await redis.llen("blastd:processing:dead-instance") == 0
    recovered = [entry for entry in logs if entry["event"] == "instance_recovered"]
    assert [(entry["instance"], entry["jobs"]) for entry in recovered] == [("dead-instance", 1)]


async def _not_registered(redis: aioredis.Redis, instance_id: str) -> bool:
    return not await redis.sismember("blastd:instances", instance_id)  # type: ignore[misc]


async def test_an_instance_with_a_live_lease_keeps_its_jobs(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """A live peer's processing list is its own work. A dead peer registered beside it shows
    that a reaping pass, which looks at every registered instance, has run."""
    job = blast_job("peer-job", numbers_from(10_000_150, 2))
    await redis.lpush("blastd:processing:live-peer", job)
    await redis.set("blastd:instance:live-peer", "token", px=60_000)
    await redis.lpush(
        "blastd:processing:dead-peer", blast_job("orphan", numbers_from(10_000_160, 1))
    )
    await redis.sadd("blastd:instances", "live-peer", "dead-peer")
    async with running_daemon(make_settings(servers, sandbox.url)):
        await wait_until(lambda: _not_registered(redis, "dead-peer"))
        await wait_until(lambda: is_done(pool, "orphan"))
    assert await redis.lrange("blastd:processing:live-peer", 0, -1) == [job]
    assert await redis.sismember("blastd:instances", "live-peer")  # type: ignore[misc]
    assert await ledger.load_campaign(pool, "peer-job") is None


async def test_jobs_left_by_this_instances_predecessor_are_recovered_at_start_in_order(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """The predecessor took 'first' then 'second'; 'third' still waited in the jobs list."""
    await redis.lpush(PROCESSING, blast_job("first", numbers_from(10_000_200, 2)))
    await redis.lpush(PROCESSING, blast_job("second", numbers_from(10_000_210, 2)))
    await redis.lpush(JOBS, blast_job("third", numbers_from(10_000_220, 2)))
    with capture_logs() as logs:
        async with running_daemon(make_settings(servers, sandbox.url)):
            for campaign_id in ("first", "second", "third"):
                await wait_until(lambda cid=campaign_id: is_done(pool, cid))
            await wait_until(lambda: intake_is_idle(redis))
    rows = await pool.fetch("SELECT id FROM campaigns ORDER BY created_at")
    assert [r["id"] for r in rows] == ["first", "second", "third"]
    recovered = [entry for entry in logs if entry["event"] == "instance_recovered"]
    assert [(entry["instance"], entry["jobs"]) for entry in recovered] == [("test-instance", 2)]


async def test_a_job_taken_too_often_is_dead_lettered_as_poison(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """A job that crashed the daemon max_job_deliveries times is not taken a fourth time."""
    raw = blast_job("crashes-daemon", numbers_from(10_000_300, 2))
    deliveries_key = f"blastd:deliveries:{hashlib.sha1(raw).hexdigest()}"
    settings = make_settings(servers, sandbox.url)
    await redis.set(deliveries_key, settings.max_job_deliveries)
    async with running_daemon(settings):
        await redis.lpush(JOBS, raw)
        await wait_until(lambda: dead_count_is(redis, 1))
        await wait_until(lambda: intake_is_idle(redis))
    [entry] = await dead_entries(redis)
    assert f"taken {settings.max_job_deliveries} times" in entry["reason"]
    assert original_payload(entry) == raw
    assert await ledger.load_campaign(pool, "crashes-daemon") is None
    assert not await redis.exists(deliveries_key)
    assert (await sandbox.stats())["requests"] == 0


@pytest.mark.parametrize("key", [JOBS, DEAD, PROCESSING, "blastd:instances"])
async def test_recipients_key_naming_one_of_blastds_own_keys_is_dead_lettered(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    key: str,
) -> None:
    job = orjson.dumps(
        {
            "type": "blast",
            "id": "steals-a-key",
            "account": "cloud-main",
            "message": {"text": "hi"},
            "recipients_key": key,
        }
    )
    async with running_daemon(make_settings(servers, sandbox.url)):
        await redis.lpush(JOBS, job)
        await wait_until(lambda: dead_count_is(redis, 1))
        await redis.lpush(JOBS, blast_job("still-works", numbers_from(10_000_400, 1)))
        await wait_until(lambda: is_done(pool, "still-works"))
    [entry] = await dead_entries(redis)
    assert "own keys" in entry["reason"]
    assert entry["job_id"] == "steals-a-key"
    assert await ledger.load_campaign(pool, "steals-a-key") is None


async def test_recipients_key_that_is_missing_is_dead_lettered(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    job = key_job("nobody-home", "blastd:recipients:never-filled", message=HALO)
    async with running_daemon(make_settings(servers, sandbox.url)):
        await redis.lpush(JOBS, job)
        await wait_until(lambda: dead_count_is(redis, 1))
    [entry] = await dead_entries(redis)
    assert "empty or missing" in entry["reason"]
    assert entry["job_id"] == "nobody-home"
    assert await ledger.load_campaign(pool, "nobody-home") is None


async def test_recipients_key_that_is_not_a_list_is_dead_lettered_with_a_reason(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """A producer mistake (a string where a list belongs) is the job's fault, not a crash."""
    await redis.set("blastd:recipients:a-string", "+6281210000000")
    job = key_job("wrong-type", "blastd:recipients:a-string", message=HALO)
    with capture_logs() as logs:
        async with running_daemon(make_settings(servers, sandbox.url)):
            await redis.lpush(JOBS, job)
            await wait_until(lambda: dead_count_is(redis, 1))
    [entry] = await dead_entries(redis)
    assert "recipients_key" in entry["reason"]
    assert "job_crashed" not in [log["event"] for log in logs]
    assert await ledger.load_campaign(pool, "wrong-type") is None


async def test_recipients_key_campaign_keeps_bad_entries_as_skipped_and_deletes_the_list(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    key = "blastd:recipients:mixed"
    good = numbers_from(10_000_500, 3)
    entries = [
        orjson.dumps({"to": good[0], "vars": {"name": "A"}}),
        b'{"to": ',
        orjson.dumps({"to": good[1], "vars": {"name": "B"}}),
        orjson.dumps({"to": "12", "vars": {"name": "C"}}),
        orjson.dumps({"to": good[2], "vars": {"name": "D"}}),
    ]
    await redis.rpush(key, *entries)
    with capture_logs() as logs:
        async with running_daemon(make_settings(servers, sandbox.url)):
            await redis.lpush(JOBS, key_job("from-key", key, message=HALO))
            await wait_until(lambda: is_done(pool, "from-key"))
    created = [entry for entry in logs if entry["event"] == "campaign_created"]
    assert [(entry["pending"], entry["skipped"]) for entry in created] == [(3, 2)]
    rows = await pool.fetch("SELECT seq, phone, state, error_text FROM recipients ORDER BY seq")
    assert [r["state"] for r in rows] == ["sent", "skipped", "sent", "skipped", "sent"]
    assert [r["phone"] for r in rows if r["state"] == "sent"] == good
    assert "JSON" in rows[1]["error_text"]
    assert "invalid" in rows[3]["error_text"]
    assert not await redis.exists(key)
    assert await sandbox.recipients() == {n.lstrip("+"): 1 for n in good}


def _one_message_job(
    job_id: str, message: dict[str, Any], values: list[dict[str, str]], first: int
) -> bytes:
    numbers = numbers_from(first, len(values))
    recipients = [{"to": n, "vars": v} for n, v in zip(numbers, values, strict=True)]
    job = {"type": "blast", "id": job_id, "account": "cloud-main", "message": message}
    return orjson.dumps(job | {"recipients": recipients})


async def test_a_recipient_whose_rendered_message_whatsapp_would_refuse_is_skipped_with_why(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    text = {"text": "Halo {name}"}
    caption = {"video": {"link": "https://cdn.example.com/v.mp4", "caption": "{name}"}}
    template = {"template": {"name": "promo_nov", "language": "id", "params": ["{name}", "X"]}}
    spacing = "rendered template parameter 1 has a newline, a tab or more than four spaces in a row"
    cases = {
        "text": (text, [("x" * 5000, "rendered text is 5005 characters, over 4096"), (" ", None)]),
        "blank": ({"text": "{name}"}, [("  ", "rendered text is blank"), ("A", None)]),
        "cap": (caption, [("y" * 1025, "rendered caption is 1025 characters, over 1024")]),
        "tpl": (
            template,
            [
                ("", "rendered template parameter 1 is empty"),
                ("a\nb", spacing),
                ("a\tb", spacing),
                ("a     b", spacing),
                ("a    b", None),
            ],
        ),
    }
    cases["cap"][1].append(("z" * 1024, None))
    async with running_daemon(make_settings(servers, sandbox.url)):
        for i, (job_id, (message, outcomes)) in enumerate(cases.items()):
            values = [{"name": name} for name, _ in outcomes]
            await redis.lpush(JOBS, _one_message_job(job_id, message, values, 10_000_600 + 10 * i))
        for job_id in cases:
            await wait_until(lambda job_id=job_id: is_done(pool, job_id))
    for job_id, (_message, outcomes) in cases.items():
        rows = await pool.fetch(
            "SELECT state, error_text FROM recipients WHERE campaign_id = $1 ORDER BY seq", job_id
        )
        expected = [("skipped", why) if why else ("sent", None) for _, why in outcomes]
        assert [(r["state"], r["error_text"]) for r in rows] == expected, job_id
