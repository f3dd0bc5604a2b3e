"""The video pipeline through the daemon: D-ID renders on the sandbox (time compressed),
polled through Redis, delivered over the Cloud API emulator; failures, timeouts, webhooks,
retries by scope, video_poll jobs and the key layout of an external producer (docs/video.md)."""

from __future__ import annotations

import re
import time
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from blastd import controls, ledger, queues
from tests.conftest import Servers
from tests.harness import (
    ACCOUNT,
    campaign_counts,
    has_state,
    is_done,
    numbers_from,
    recipient_rows,
    running_daemon,
    serving,
    wait_until,
)
from tests.video_harness import (
    DID_ACCOUNT,
    PRESENTER,
    ULTRAMSG_ACCOUNT,
    VIDEO_API_ACCOUNT,
    VideoSandbox,
    default_schedule,
    make_video_settings,
    video_blast_job,
    video_sandbox,
)

JOBS = "blastd:jobs"
DEAD = "blastd:dead"


async def test_a_video_blast_renders_once_per_recipient_and_delivers_each_video(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    numbers = numbers_from(1, 40)
    async with video_sandbox() as sandbox:
        settings = make_video_settings(servers, sandbox, video={"progress_batch": 7})
        async with running_daemon(settings):
            await redis.lpush(JOBS, video_blast_job("vb-1", numbers))
            await wait_until(lambda: is_done(pool, "vb-1"), timeout_s=60)
        did_stats = await sandbox.did.stats()
        delivered = await sandbox.cloud.recipients()
        jobs = await sandbox.jobs()
    rows = await recipient_rows(pool, "vb-1")
    assert {r["state"] for r in rows} == {"sent"}
    assert (did_stats["created"], did_stats["duplicates"]) == (40, {})
    assert sorted(int(job["reference"]) for job in jobs) == sorted(r["id"] for r in rows)
    assert all(r["video_url"] and r["video_job_id"] and r["renders"] == 1 for r in rows)
    assert delivered == {n.removeprefix("+"): 1 for n in numbers}
    scripts = {job["reference"]: job.get("script") for job in jobs}
    assert all(script is None or script.startswith("Halo N") for script in scripts.values())


async def test_a_1000_row_video_blast_runs_end_to_end_in_compressed_time(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    """A video_blast of 1,000 rows, 10 renders in flight, progress saved every 50."""
    numbers = numbers_from(10_000, 1_000)
    async with video_sandbox(seed=11) as sandbox:
        settings = make_video_settings(servers, sandbox)
        async with running_daemon(settings):
            await redis.lpush(JOBS, video_blast_job("vb-1000", numbers))
            await wait_until(lambda: is_done(pool, "vb-1000"), timeout_s=120)
        did_stats = await sandbox.did.stats()
        delivered = await sandbox.cloud.recipients()
        jobs = await sandbox.jobs()
    assert await campaign_counts(pool, "vb-1000") == {"sent": 1_000}
    assert (did_stats["created"], did_stats["duplicates"]) == (1_000, {})
    assert delivered == {n.removeprefix("+"): 1 for n in numbers}
    polls = sorted(job["polls"] for job in jobs)
    print(f"\n1,000-row video blast: polls per job median {polls[500]}, max {polls[-1]}")


async def test_a_failed_render_ends_video_failed_with_its_kind_and_sends_the_notice(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    numbers = numbers_from(100, 3)
    async with video_sandbox() as sandbox:
        settings = make_video_settings(servers, sandbox)
        job = orjson.loads(video_blast_job("vb-face", numbers))
        job["message"]["failure_notice"] = "Maaf {name}, video gagal: {reason}"
        async with running_daemon(settings):
            # the references are ledger ids: the campaign's first recipient is id 1
            await sandbox.did.configure(fail_by_reference={"1": "FaceError"})
            await redis.lpush(JOBS, orjson.dumps(job))
            await wait_until(lambda: is_done(pool, "vb-face"), timeout_s=60)
        delivered = await sandbox.cloud.recipients()
    rows = {r["id"]: r for r in await recipient_rows(pool, "vb-face")}
    assert rows[1]["state"] == "video_failed"
    assert (rows[1]["error_code"], rows[1]["notice"]) == ("FaceError", "sent")
    assert [rows[i]["state"] for i in (2, 3)] == ["sent", "sent"]
    # the notice went to the failed one; the videos to the others
    assert delivered == {n.removeprefix("+"): 1 for n in numbers}


async def test_an_unknown_error_is_rendered_again_once_then_fails(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    async with video_sandbox(fail_by_reference={"1": "UnknownError"}) as sandbox:
        settings = make_video_settings(servers, sandbox)
        async with running_daemon(settings):
            await redis.lpush(JOBS, video_blast_job("vb-unknown", numbers_from(200, 1)))
            await wait_until(lambda: is_done(pool, "vb-unknown"), timeout_s=60)
        did_stats = await sandbox.did.stats()
    (row,) = await recipient_rows(pool, "vb-unknown")
    assert (row["state"], row["error_code"], row["renders"]) == ("video_failed", "UnknownError", 2)
    assert did_stats["duplicates"] == {"1": 2}  # the one deliberate second render


async def test_a_render_that_never_finishes_times_out_with_the_timeout_notice(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    async with video_sandbox(fail_by_reference={"1": "never_finish"}) as sandbox:
        settings = make_video_settings(servers, sandbox, video={"timeout_s": 1.0})
        job = orjson.loads(video_blast_job("vb-slow", numbers_from(300, 1)))
        job["message"]["failure_notice"] = "Maaf, waktu habis ({timeout_min} menit)"
        async with running_daemon(settings):
            await redis.lpush(JOBS, orjson.dumps(job))
            await wait_until(lambda: is_done(pool, "vb-slow"), timeout_s=60)
        jobs = await sandbox.jobs()
    (row,) = await recipient_rows(pool, "vb-slow")
    assert (row["state"], row["error_code"], row["notice"]) == ("video_failed", "timeout", "sent")
    assert 1 <= jobs[0]["polls"] <= settings.video.max_attempts


async def test_out_of_credits_pauses_the_campaign_and_a_resume_after_top_up_finishes_it(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    async with video_sandbox(credits=2) as sandbox:
        settings = make_video_settings(servers, sandbox, did={"concurrency": 1})
        async with running_daemon(settings):
            await redis.lpush(JOBS, video_blast_job("vb-credits", numbers_from(400, 5)))
            await wait_until(lambda: has_state(pool, "vb-credits", "paused"), timeout_s=30)
            campaign = await ledger.load_campaign(pool, "vb-credits")
            assert campaign is not None
            assert "credits" in (campaign.state_reason or "")
            await sandbox.did.configure(credits=None)
            await controls.apply_control(pool, "vb-credits", "resume")
            await wait_until(lambda: is_done(pool, "vb-credits"), timeout_s=60)
        did_stats = await sandbox.did.stats()
    assert await campaign_counts(pool, "vb-credits") == {"sent": 5}
    assert (did_stats["created"], did_stats["duplicates"]) == (5, {})


async def test_retry_scope_videos_renders_only_the_failed_ones_again(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    async with video_sandbox(fail_by_reference={"2": "SourceError"}) as sandbox:
        settings = make_video_settings(servers, sandbox)
        async with running_daemon(settings):
            await redis.lpush(JOBS, video_blast_job("vb-retry", numbers_from(500, 3)))
            await wait_until(lambda: is_done(pool, "vb-retry"), timeout_s=60)
            assert (await campaign_counts(pool, "vb-retry")) == {"sent": 2, "video_failed": 1}
            await sandbox.did.configure(fail_by_reference={})
            result = await controls.apply_control(pool, "vb-retry", "retry_failed", scope="videos")
            assert result is not None
            assert result.recipients == 1
            await wait_until(lambda: is_done(pool, "vb-retry"), timeout_s=60)
        did_stats = await sandbox.did.stats()
        delivered = await sandbox.cloud.recipients()
    assert await campaign_counts(pool, "vb-retry") == {"sent": 3}
    assert did_stats["duplicates"] == {"2": 2}  # only the failed one rendered again
    assert sorted(delivered.values()) == [1, 1, 1]


async def test_a_video_the_provider_refuses_goes_as_text_with_the_link(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    (number,) = numbers_from(600, 1)
    async with video_sandbox() as sandbox:
        settings = make_video_settings(servers, sandbox)
        await sandbox.cloud.configure(fail_video_numbers={number: 131053})
        async with running_daemon(settings):
            await redis.lpush(JOBS, video_blast_job("vb-link", [number]))
            await wait_until(lambda: is_done(pool, "vb-link"), timeout_s=60)
        delivered = await sandbox.cloud.recipients()
    (row,) = await recipient_rows(pool, "vb-link")
    assert row["state"] == "sent"
    assert row["video_url"]
    assert delivered == {number.removeprefix("+"): 1}  # the text; the video was refused


async def test_the_did_webhook_ends_the_wait_without_polling(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    async with video_sandbox() as sandbox:
        did = {"webhook_url": "placeholder", "webhook_secret": "hook-secret"}
        # Polls come only every 10 minutes of real time: each render is found by its webhook.
        video = {"webhook_poll_interval_s": 600.0, "first_poll_s": 600.0, "timeout_s": 1200.0}
        settings = make_video_settings(servers, sandbox, did=did, video=video, admin_port=0)
        port = _free_port()
        settings.admin.port = port
        settings.accounts[DID_ACCOUNT].webhook_url = (  # type: ignore[union-attr]
            f"http://127.0.0.1:{port}/webhooks/video/{DID_ACCOUNT}"
        )
        async with running_daemon(settings):
            await redis.lpush(JOBS, video_blast_job("vb-hook", numbers_from(700, 5)))
            await wait_until(lambda: is_done(pool, "vb-hook"), timeout_s=60)
        jobs = await sandbox.jobs()
    assert await campaign_counts(pool, "vb-hook") == {"sent": 5}
    assert [job["polls"] for job in jobs] == [1] * 5  # the one poll a webhook triggers


async def test_a_lost_webhook_is_covered_by_the_guard_polls(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    async with video_sandbox(webhook_drop_p=1.0) as sandbox:
        port = _free_port()
        did = {"webhook_url": f"http://127.0.0.1:{port}/webhooks/video/{DID_ACCOUNT}"}
        settings = make_video_settings(servers, sandbox, did=did, admin_port=port)
        async with running_daemon(settings):
            await redis.lpush(JOBS, video_blast_job("vb-lost-hook", numbers_from(750, 5)))
            await wait_until(lambda: is_done(pool, "vb-lost-hook"), timeout_s=60)
        stats = await sandbox.did.stats()
    assert await campaign_counts(pool, "vb-lost-hook") == {"sent": 5}
    assert stats["webhook_events_delivered"] == 0


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _create_clip(sandbox: VideoSandbox, reference: str) -> str:
    body = {
        "presenter_id": PRESENTER,
        "script": {"type": "text", "input": "Hola, tu video"},
        "user_data": reference,
    }
    headers = {"Authorization": "Basic sandbox-token"}
    async with sandbox.http.post(sandbox.did.url + "/clips", json=body, headers=headers) as r:
        assert r.status == 201, await r.text()
        created: dict[str, Any] = await r.json()
    return str(created["id"])


async def test_a_video_poll_job_delivers_the_video_with_the_elapsed_time(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    (number,) = numbers_from(800, 1)
    async with video_sandbox() as sandbox:
        settings = make_video_settings(servers, sandbox)
        clip_id = await _create_clip(sandbox, "external-1")
        job = {
            "type": "video_poll",
            "id": "poll-1",
            "job_id": clip_id,
            "account": DID_ACCOUNT,
            "notify": {"account": ACCOUNT, "to": number, "caption": "Listo en {elapsed_s} s"},
        }
        async with running_daemon(settings):
            await redis.lpush(JOBS, orjson.dumps(job))
            await wait_until(lambda: is_done(pool, "poll-1"), timeout_s=60)
            audit = await redis.get(f"blastd:video:completed:{clip_id}")
            assert await redis.exists(f"blastd:video:job:{clip_id}") == 0
        delivered = await sandbox.cloud.recipients()
    (row,) = await recipient_rows(pool, "poll-1")
    assert (row["state"], row["video_job_id"]) == ("sent", clip_id)
    assert audit is not None
    assert orjson.loads(audit)["status"] == "completed"
    assert delivered == {number.removeprefix("+"): 1}


async def test_a_video_poll_through_ultramsg_is_a_video_message_with_its_caption(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    """The UltraMsg path: POST /messages/video with the link and the caption."""
    (number,) = numbers_from(850, 1)
    async with video_sandbox() as sandbox:
        settings = make_video_settings(servers, sandbox)
        clip_id = await _create_clip(sandbox, "ultra-1")
        notify = {"account": ULTRAMSG_ACCOUNT, "to": number, "caption": "Listo en {elapsed_s} s"}
        job = {
            "type": "video_poll",
            "id": "poll-ultra",
            "job_id": clip_id,
            "account": DID_ACCOUNT,
            "notify": notify,
        }
        async with running_daemon(settings):
            await redis.lpush(JOBS, orjson.dumps(job))
            await wait_until(lambda: is_done(pool, "poll-ultra"), timeout_s=60)
        async with sandbox.http.get(sandbox.ultramsg.url + "/_sandbox/messages") as response:
            messages = orjson.loads(await response.read())
    (row,) = await recipient_rows(pool, "poll-ultra")
    (message,) = messages
    assert row["state"] == "sent"
    assert message["type"] == "video"
    assert message["video"] == row["video_url"]
    assert message["caption"].startswith("Listo en ")


async def test_bare_keys_with_an_empty_prefix_work_for_an_existing_producer(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    (number,) = numbers_from(900, 1)
    async with video_sandbox() as sandbox:
        settings = make_video_settings(servers, sandbox, video={"key_prefix": ""})
        clip_id = await _create_clip(sandbox, "external-producer")
        state = {"account": DID_ACCOUNT, "notify": {"account": ACCOUNT, "to": number}}
        async with running_daemon(settings):
            # What a producer written for the earlier polling worker does: the record, then the
            # id on the queue (docs/video.md).
            await redis.set(f"video:job:{clip_id}", orjson.dumps(state), ex=600)
            await redis.lpush("video:poll:queue", clip_id)
            await wait_until(lambda: is_done(pool, clip_id), timeout_s=60)
            assert await redis.exists(f"video:completed:{clip_id}") == 1
        delivered = await sandbox.cloud.recipients()
    assert delivered == {number.removeprefix("+"): 1}


CHATS = "producer:conversations"


def _worker_record(clip_id: str, conversation_id: str, started_ms: int) -> bytes:
    """The bytes the earlier worker's producer writes: JSON.stringify of its record."""
    metadata = {"prompt": "a cat", "model": "did", "aspectRatio": "16:9"}
    record = {
        "jobId": clip_id,
        "conversationId": conversation_id,
        "startTime": started_ms,
        "metadata": metadata,
    }
    return orjson.dumps(record)


@pytest.mark.parametrize("kind", ["redis_hash", "http"])
async def test_the_earlier_workers_producer_works_unchanged_through_a_conversation_resolver(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, kind: str
) -> None:
    (number,) = numbers_from(950, 1)
    chat = orjson.dumps({"to": number, "account": ULTRAMSG_ACCOUNT})

    async def lookup(request: web.Request) -> web.Response:
        known = request.match_info["conversation_id"] == "conv-7"
        return web.Response(body=chat, status=200 if known else 404)

    app = web.Application()
    app.router.add_get("/chats/{conversation_id}", lookup)
    async with video_sandbox() as sandbox, serving(app) as chats_url:
        resolver = (
            {"kind": "redis_hash", "key": CHATS}
            if kind == "redis_hash"
            else {"kind": "http", "url": chats_url + "/chats/{conversation_id}"}
        )
        video = {
            "key_prefix": "",
            "conversation_resolver": resolver,
            "external_account": DID_ACCOUNT,
            "timeout_s": 300,  # the earlier worker's five minutes, from the record's startTime
        }
        settings = make_video_settings(servers, sandbox, video=video)
        await redis.hset(CHATS, "conv-7", chat)
        clip_id = await _create_clip(sandbox, "worker-record")
        started_ms = int(time.time() * 1000) - 120_000  # the render began two minutes ago
        async with running_daemon(settings):
            await redis.set(
                f"video:job:{clip_id}", _worker_record(clip_id, "conv-7", started_ms), ex=600
            )
            await redis.lpush("video:poll:queue", clip_id)
            await wait_until(lambda: is_done(pool, clip_id), timeout_s=60)
            delivered_ms = int(time.time() * 1000)
        async with sandbox.http.get(sandbox.ultramsg.url + "/_sandbox/messages") as response:
            messages = orjson.loads(await response.read())
    (message,) = messages
    assert message["type"] == "video"
    elapsed = re.search(r"generated in (\d+) seconds", message["caption"])
    assert elapsed is not None, message["caption"]
    assert 120 <= int(elapsed.group(1)) <= (delivered_ms - started_ms) // 1000 + 1
    (row,) = await recipient_rows(pool, clip_id)
    assert (row["state"], row["video_job_id"]) == ("sent", clip_id)


async def test_a_worker_record_started_over_five_minutes_ago_times_out_with_the_notice(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    (number,) = numbers_from(960, 1)
    async with video_sandbox() as sandbox:
        resolver = {"kind": "redis_hash", "key": CHATS}
        video = {
            "key_prefix": "",
            "conversation_resolver": resolver,
            "external_account": DID_ACCOUNT,
            "timeout_s": 300,
        }
        settings = make_video_settings(servers, sandbox, video=video)
        await redis.hset(CHATS, "conv-8", orjson.dumps({"to": number, "account": ACCOUNT}))
        clip_id = await _create_clip(sandbox, "worker-late")
        started_ms = int(time.time() * 1000) - 301_000
        async with running_daemon(settings):
            await redis.set(f"video:job:{clip_id}", _worker_record(clip_id, "conv-8", started_ms))
            await redis.lpush("video:poll:queue", clip_id)
            await wait_until(lambda: is_done(pool, clip_id), timeout_s=60)
    (row,) = await recipient_rows(pool, clip_id)
    assert (row["state"], row["error_code"]) == ("video_failed", "timeout")


async def test_an_unresolved_worker_record_is_dead_and_requeued_onto_the_video_queue(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    """Dead-lettered with the reason; once the conversation is known, `blastd dead requeue`
    puts the record back onto the video poll queue, where the producer put it."""
    (number,) = numbers_from(970, 1)
    async with video_sandbox() as sandbox:
        resolver = {"kind": "redis_hash", "key": CHATS}
        video = {
            "key_prefix": "",
            "conversation_resolver": resolver,
            "external_account": DID_ACCOUNT,
            "timeout_s": 300,
        }
        settings = make_video_settings(servers, sandbox, video=video)
        clip_id = await _create_clip(sandbox, "worker-unknown")
        raw = _worker_record(clip_id, "conv-late", int(time.time() * 1000))
        async with running_daemon(settings):
            await redis.set(f"video:job:{clip_id}", raw, ex=600)
            await redis.lpush("video:poll:queue", clip_id)
            dead = await wait_until(lambda: redis.lindex(DEAD, 0))
            await redis.hset(CHATS, "conv-late", orjson.dumps({"to": number, "account": ACCOUNT}))
            requeued = await queues.requeue_dead(redis, "blastd:", 0)
            await wait_until(lambda: is_done(pool, clip_id), timeout_s=60)
            assert await redis.llen(JOBS) == 0
        delivered = await sandbox.cloud.recipients()
    entry = orjson.loads(dead)
    assert entry["reason"] == f"video:job:{clip_id}: conversation 'conv-late' is not known"
    assert entry["payload"].encode() == raw
    assert requeued is not None
    assert await redis.llen(DEAD) == 0
    assert delivered == {number.removeprefix("+"): 1}


async def test_an_external_record_that_is_not_a_video_poll_is_dead_lettered_with_its_reason(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    async with video_sandbox() as sandbox:
        settings = make_video_settings(servers, sandbox, video={"key_prefix": ""})
        async with running_daemon(settings):
            await redis.set("video:job:bad-1", b'{"metadata": {}}', ex=600)
            await redis.lpush("video:poll:queue", "bad-1")
            raw = await wait_until(lambda: redis.lindex(DEAD, 0))
            assert await redis.exists("video:job:bad-1") == 0
    entry = orjson.loads(raw)
    assert entry["reason"].startswith("video:job:bad-1: ")
    assert entry["reason"] == "video:job:bad-1: missing account; missing notify"


async def test_a_generic_video_api_renders_with_its_own_dialect_and_failures(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    numbers = numbers_from(1_100, 4)
    async with video_sandbox() as sandbox:
        settings = make_video_settings(servers, sandbox)
        # reference 2 fails, 3 is unknown to the job store for its first polls (the grace
        # period covers it), 4 is never found
        faults = {"2": "failed", "3": "not_found_at_first", "4": "not_found"}
        await sandbox.video_api.configure(fail_by_reference=faults, not_found_first_polls=2)
        job = orjson.loads(video_blast_job("vb-generic", numbers))
        job["video"]["account"] = VIDEO_API_ACCOUNT
        async with running_daemon(settings):
            await redis.lpush(JOBS, orjson.dumps(job))
            await wait_until(lambda: is_done(pool, "vb-generic"), timeout_s=60)
        api_stats = await sandbox.video_api.stats()
    rows = {r["id"]: r for r in await recipient_rows(pool, "vb-generic")}
    assert [rows[i]["state"] for i in (1, 2, 3, 4)] == [
        "sent",
        "video_failed",
        "sent",
        "video_failed",
    ]
    assert rows[2]["error_code"] == "failed"
    assert rows[4]["error_code"] in ("not_found", "timeout")
    assert (api_stats["created"], api_stats["duplicates"]) == (4, {})


async def test_renders_survive_a_redis_wipe_and_are_polled_again_from_the_ledger(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    numbers = numbers_from(1_200, 20)
    # Renders of about 3 s: the wipe lands while every one of them is being polled.
    async with video_sandbox(time_compression=20.0) as sandbox:
        video = {**default_schedule(20.0), "key_prefix": "wipe:"}
        settings = make_video_settings(servers, sandbox, video=video)
        async with running_daemon(settings):
            await redis.lpush(JOBS, video_blast_job("vb-wipe", numbers))
            await wait_until(lambda: _all_rendering(pool, "vb-wipe", 20), timeout_s=30)
            await redis.execute_command("FLUSHDB")
            await wait_until(lambda: is_done(pool, "vb-wipe"), timeout_s=60)
        did_stats = await sandbox.did.stats()
        delivered = await sandbox.cloud.recipients()
    assert await campaign_counts(pool, "vb-wipe") == {"sent": 20}
    assert did_stats["duplicates"] == {}
    assert delivered == {n.removeprefix("+"): 1 for n in numbers}


async def _all_rendering(pool: ledger.Pool, campaign_id: str, count: int) -> bool:
    rendering = await pool.fetchval(
        "SELECT count(*) FROM recipients WHERE campaign_id = $1 AND state = 'rendering' "
        "AND video_job_id IS NOT NULL",
        campaign_id,
    )
    return bool(rendering == count)


async def test_two_daemons_share_a_video_blast_and_deliver_each_video_once(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    numbers = numbers_from(1_300, 100)
    async with video_sandbox() as sandbox:
        first = make_video_settings(servers, sandbox, instance_id="video-1")
        second = make_video_settings(servers, sandbox, instance_id="video-2")
        async with running_daemon(first), running_daemon(second):
            await redis.lpush(JOBS, video_blast_job("vb-two", numbers))
            await wait_until(lambda: is_done(pool, "vb-two"), timeout_s=60)
        did_stats = await sandbox.did.stats()
        delivered = await sandbox.cloud.recipients()
    assert await campaign_counts(pool, "vb-two") == {"sent": 100}
    assert (did_stats["created"], did_stats["duplicates"]) == (100, {})
    assert delivered == {n.removeprefix("+"): 1 for n in numbers}


async def test_a_render_past_its_window_when_the_daemon_starts_is_failed_with_the_notice(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool
) -> None:
    """A video_poll job whose 5 minutes passed while no daemon ran (started_at long ago):
    polled once, still rendering, so it ends with the timeout notice."""
    (number,) = numbers_from(1_400, 1)
    async with video_sandbox(fail_by_reference={"late": "never_finish"}) as sandbox:
        settings = make_video_settings(servers, sandbox)
        clip_id = await _create_clip(sandbox, "late")
        job = {
            "type": "video_poll",
            "id": "poll-late",
            "job_id": clip_id,
            "account": DID_ACCOUNT,
            "started_at": "2026-01-01T00:00:00Z",
            "notify": {"account": ACCOUNT, "to": number},
        }
        await redis.lpush(JOBS, orjson.dumps(job))
        async with running_daemon(settings):
            await wait_until(lambda: is_done(pool, "poll-late"), timeout_s=60)
        jobs = await sandbox.jobs()
        delivered = await sandbox.cloud.recipients()
    (row,) = await recipient_rows(pool, "poll-late")
    assert (row["state"], row["error_code"], row["notice"]) == ("video_failed", "timeout", "sent")
    assert [job["polls"] for job in jobs] == [1]
    assert delivered == {number.removeprefix("+"): 1}  # the notice
