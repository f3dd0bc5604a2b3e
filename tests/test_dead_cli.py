"""`blastd dead`: list, show and requeue dead-letter entries, as a real CLI process."""

from __future__ import annotations

from datetime import datetime, timedelta

import orjson
import pytest
import redis.asyncio as aioredis

from blastd import ledger
from tests.harness import (
    SandboxHandle,
    Servers,
    campaign_counts,
    is_done,
    make_settings,
    numbers_from,
    run_cli,
    running_daemon,
    wait_until,
)

JOBS = "blastd:jobs"
DEAD = "blastd:dead"


async def has_dead(redis: aioredis.Redis, count: int) -> bool:
    return bool(await redis.llen(DEAD) == count)


async def test_a_dead_job_is_listed_shown_and_once_fixed_requeued_to_completion(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    cli_env: dict[str, str],
) -> None:
    """The producer wrote the recipients as a string; the operator fixes the key, requeues."""
    job = orjson.dumps(
        {
            "type": "blast",
            "id": "keyed",
            "account": "cloud-main",
            "message": {"text": "Halo"},
            "recipients_key": "promo-recipients",
        }
    )
    await redis.set("promo-recipients", "not a list")
    async with running_daemon(make_settings(servers, sandbox.url)):
        await redis.lpush(JOBS, job)
        await wait_until(lambda: has_dead(redis, 1))

        listed = await run_cli(cli_env, "dead", "list")
        assert listed.code == 0
        [line] = listed.stdout.splitlines()
        index, dead_at, job_id, size, reason = line.split("  ", 4)
        assert (index, job_id, size) == ("0", "keyed", f"{len(job)}B")
        assert reason == "recipients_key 'promo-recipients' is a string, not a list"
        assert datetime.fromisoformat(dead_at).utcoffset() == timedelta(0)

        shown = await run_cli(cli_env, "dead", "show", "0")
        assert shown.code == 0
        entry = orjson.loads(shown.stdout)
        assert (entry["payload"], entry["job_id"], entry["reason"]) == (
            job.decode(),
            "keyed",
            reason,
        )

        await redis.delete("promo-recipients")
        await redis.rpush("promo-recipients", *numbers_from(43_000_000, 3))
        requeued = await run_cli(cli_env, "dead", "requeue", "0")
        assert (requeued.code, requeued.stdout) == (0, "requeued entry 0 (job keyed)\n")
        await wait_until(lambda: is_done(pool, "keyed"))
    assert await campaign_counts(pool, "keyed") == {"sent": 3}
    assert await redis.llen(DEAD) == 0


async def test_requeue_restores_a_payload_that_was_not_utf8_byte_for_byte(
    servers: Servers, redis: aioredis.Redis, sandbox: SandboxHandle, cli_env: dict[str, str]
) -> None:
    raw = b'\xff\xfe{"type": "blast"}'
    async with running_daemon(make_settings(servers, sandbox.url)):
        await redis.lpush(JOBS, raw)
        await wait_until(lambda: has_dead(redis, 1))
    assert "payload_base64" in orjson.loads(await redis.lindex(DEAD, 0))
    listed = await run_cli(cli_env, "dead", "list")
    assert f"  -  {len(raw)}B  job is not valid UTF-8 (byte 0)" in listed.stdout
    requeued = await run_cli(cli_env, "dead", "requeue", "0")
    assert requeued.code == 0
    assert await redis.lrange(JOBS, 0, -1) == [raw]
    assert await redis.llen(DEAD) == 0


async def test_requeue_all_moves_every_entry_so_the_oldest_runs_first(
    servers: Servers, redis: aioredis.Redis, sandbox: SandboxHandle, cli_env: dict[str, str]
) -> None:
    first, second = b"not json 1", b"not json 2"
    async with running_daemon(make_settings(servers, sandbox.url)):
        await redis.lpush(JOBS, first, second)
        await wait_until(lambda: has_dead(redis, 2))
    newest = await run_cli(cli_env, "dead", "list", "--limit", "1")
    [line] = newest.stdout.splitlines()
    assert line.startswith("1  "), "indexes count from the oldest entry"
    shown = await run_cli(cli_env, "dead", "show", "0")
    assert orjson.loads(shown.stdout)["payload"] == first.decode()
    requeued = await run_cli(cli_env, "dead", "requeue", "--all")
    assert (requeued.code, requeued.stdout) == (0, "requeued 2 entries\n")
    assert await redis.lrange(JOBS, 0, -1) == [second, first], "RPOP takes the first one first"
    assert await redis.llen(DEAD) == 0


async def test_an_entry_without_a_payload_is_not_requeued(
    redis: aioredis.Redis, cli_env: dict[str, str]
) -> None:
    await redis.lpush(DEAD, orjson.dumps({"reason": "written by hand"}))
    listed = await run_cli(cli_env, "dead", "list")
    assert listed.stdout == "0  -  -  -  written by hand\n"
    requeued = await run_cli(cli_env, "dead", "requeue", "0")
    assert requeued.code == 1
    assert (
        requeued.stderr.strip().splitlines()[-1] == "blastd: dead-letter entry 0 holds no payload"
    )
    assert await redis.llen(DEAD) == 1
    assert await redis.llen(JOBS) == 0


@pytest.mark.parametrize(
    ("args", "code", "stream", "text"),
    [
        (("dead", "list"), 0, "stdout", "no dead-letter entries"),
        (("dead", "show", "3"), 1, "stderr", "blastd: no dead-letter entry 3"),
        (("dead", "requeue", "3"), 1, "stderr", "blastd: no dead-letter entry 3"),
        (("dead", "requeue"), 2, "stderr", "give an INDEX or --all"),
        (("dead", "requeue", "0", "--all"), 2, "stderr", "give an INDEX or --all"),
        (("dead", "show", "--", "-1"), 2, "stderr", "-1 is not in the range x>=0"),
    ],
)
async def test_dead_commands_on_an_empty_list_and_bad_arguments(
    redis: aioredis.Redis,
    cli_env: dict[str, str],
    args: tuple[str, ...],
    code: int,
    stream: str,
    text: str,
) -> None:
    assert await redis.llen(DEAD) == 0
    result = await run_cli(cli_env, *args)
    assert result.code == code
    assert text in getattr(result, stream)
