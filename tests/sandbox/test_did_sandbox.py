"""The D-ID emulator over real loopback HTTP, mounted at /did as `python -m blastd.sandbox`
serves it: the job state machine, validation, account and per-job faults, links, webhooks and
the control endpoints.

Tests that look at one state pass a hand-moved clock; tests of what happens when a job ends
use the real clock with renders compressed to tens of milliseconds."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import statistics
import urllib.request
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from blastd.sandbox.did import DidSandboxConfig, build_did_app
from tests.harness import (
    Clock,
    json_request,
    poll_stats,
    sandbox_json,
    sandbox_process,
    serving,
    set_knobs,
    wait_until,
)
from tests.video_harness import FAST, FIXED, fetch, running_receiver

TOKEN = "sandbox-token"
BASIC = f"Basic {TOKEN}"
PRESENTER = "v2_public_Amber@0zSz8kflCN"
PHOTO = "https://create-images-results.d-id.com/DefaultPresenters/Noelle_f/image.png"


def did_emulator(
    config: DidSandboxConfig | None = None, now: Callable[[], float] | None = None
) -> contextlib.AbstractAsyncContextManager[str]:
    """The emulator mounted at /did; yields the URL ending in /did."""
    app = build_did_app(config or DidSandboxConfig(), **({"now": now} if now else {}))
    return serving(app, "/did")


def clip_body(**extra: object) -> dict[str, object]:
    script = {"type": "text", "input": "Halo Budi! Terima kasih sudah bergabung."}
    return {"presenter_id": PRESENTER, "script": script, "user_data": "cmp42-r9001", **extra}


def talk_body(**extra: object) -> dict[str, object]:
    clip = clip_body()
    del clip["presenter_id"]
    return {**clip, "source_url": PHOTO, **extra}


async def request(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    document: object = None,
    authorization: str | None = BASIC,
) -> tuple[int, Any, dict[str, str]]:
    """One request, authorized unless told otherwise."""
    headers = {"Authorization": authorization} if authorization else {}
    return await json_request(http, method, url, document, headers)


async def create(
    http: aiohttp.ClientSession, base_url: str, kind: str = "clips", document: object = None
) -> dict[str, Any]:
    status, body, _ = await request(http, "POST", f"{base_url}/{kind}", document or clip_body())
    assert status == 201, body
    return dict(body)


async def get_job(http: aiohttp.ClientSession, base_url: str, job_id: str) -> dict[str, Any]:
    kind = "clips" if job_id.startswith("clp_") else "talks"
    status, body, _ = await request(http, "GET", f"{base_url}/{kind}/{job_id}")
    assert status == 200, body
    return dict(body)


async def ended_jobs(http: aiohttp.ClientSession, base_url: str, count: int) -> list[Any]:
    """/_sandbox/jobs once `count` jobs have ended."""

    async def jobs_if_ended() -> list[Any] | None:
        jobs = await sandbox_json(http, base_url, "jobs")
        return jobs if sum(job["done_at"] is not None for job in jobs) >= count else None

    result: list[Any] = await wait_until(jobs_if_ended, timeout_s=10, interval_s=0.01)
    return result


async def test_clip_goes_created_started_done_on_the_clock_not_on_polls(
    http: aiohttp.ClientSession,
) -> None:
    clock = Clock()
    config = DidSandboxConfig.model_validate(FIXED)
    async with did_emulator(config, clock) as base_url:
        created = await create(http, base_url)
        first = await get_job(http, base_url, created["id"])
        pending_status, _, _ = await fetch(http, first["pending_url"])
        clock.now_s += 10
        second = await get_job(http, base_url, created["id"])
        clock.now_s += 50
        done = await get_job(http, base_url, created["id"])
        status, mp4, content_type = await fetch(http, done["result_url"])
    assert set(created) == {"id", "object", "created_at", "created_by", "status"}
    assert created["id"].startswith("clp_")
    assert (created["object"], created["status"]) == ("clip", "created")
    assert created["created_at"].endswith("Z")
    assert first["status"] == "created"
    assert "pending_url" in first
    assert "result_url" not in first
    assert (second["status"], "started_at" in second) == ("started", True)
    assert done["status"] == "done"
    assert "pending_url" not in done
    assert "Expires=" in done["result_url"]
    assert done["result_url"].startswith(base_url + "/_files/")
    assert (done["user_data"], done["presenter_id"]) == ("cmp42-r9001", PRESENTER)
    assert done["duration"] >= 1
    assert set(done["metadata"]) == {"num_frames", "processing_fps", "resolution", "size_kib"}
    assert (status, content_type, mp4[4:8]) == (200, "video/mp4", b"ftyp")
    assert pending_status == 404, "the video is not there before the job is done"


async def test_talk_needs_a_source_url_and_is_read_under_talks_only(
    http: aiohttp.ClientSession,
) -> None:
    async with did_emulator() as base_url:
        talk = await create(http, base_url, "talks", talk_body())
        as_talk = await get_job(http, base_url, talk["id"])
        as_clip = await request(http, "GET", f"{base_url}/clips/{talk['id']}")
        unknown = await request(http, "GET", f"{base_url}/talks/tlk_unknown")
    assert (talk["id"][:4], talk["object"]) == ("tlk_", "talk")
    assert as_talk["source_url"] == PHOTO
    assert as_clip[:2] == (404, {"kind": "NotFoundError", "description": "not found"})
    assert unknown[0] == 404


@pytest.mark.parametrize(
    "authorization",
    [BASIC, "Basic " + base64.b64encode(TOKEN.encode()).decode()],
    ids=["raw", "base64"],
)
async def test_key_is_accepted_raw_or_base64(
    http: aiohttp.ClientSession, authorization: str
) -> None:
    async with did_emulator() as base_url:
        status, _, _ = await request(
            http, "POST", base_url + "/clips", clip_body(), authorization=authorization
        )
    assert status == 201


@pytest.mark.parametrize(
    "authorization",
    [None, "Basic wrong-key", f"Bearer {TOKEN}", "Basic " + base64.b64encode(b"x").decode()],
    ids=["missing", "wrong", "bearer", "wrong-base64"],
)
async def test_unknown_key_is_a_401_authorization_error(
    http: aiohttp.ClientSession, authorization: str | None
) -> None:
    async with did_emulator() as base_url:
        answer = await request(
            http, "POST", base_url + "/clips", clip_body(), authorization=authorization
        )
        read = await request(http, "GET", base_url + "/clips", authorization=authorization)
        stats = await sandbox_json(http, base_url, "stats")
    assert answer[:2] == (
        401,
        {"kind": "AuthorizationError", "description": "user unauthenticated"},
    )
    assert read[0] == 401
    assert (stats["created"], stats["rejected_by_code"]) == (0, {"http_401": 2})


async def test_auth_forms_knob_refuses_the_form_left_out(http: aiohttp.ClientSession) -> None:
    encoded = "Basic " + base64.b64encode(TOKEN.encode()).decode()
    config = DidSandboxConfig(auth_forms=frozenset({"raw"}), tokens=frozenset({"u:p", TOKEN}))
    async with did_emulator(config) as base_url:
        raw = await request(http, "POST", base_url + "/clips", clip_body(), "Basic u:p")
        encoded_answer = await request(http, "POST", base_url + "/clips", clip_body(), encoded)
    assert (raw[0], encoded_answer[0]) == (201, 401)


@pytest.mark.parametrize(
    ("kind", "document", "description"),
    [
        ("clips", {**clip_body(), "script": None}, "Failed to validate script"),
        ("clips", clip_body(script={"type": "text", "input": " "}), "Failed to validate script"),
        ("clips", clip_body(script={"type": "audio"}), "Failed to validate script"),
        ("clips", {**clip_body(), "presenter_id": None}, "presenter_id is required"),
        ("talks", {**talk_body(), "source_url": None}, "invalid source url"),
        ("talks", talk_body(source_url="not-a-url"), "invalid source url"),
        ("clips", clip_body(user_data="x" * 1001), "user_data must be a string"),
        ("clips", clip_body(webhook="ftp://x"), "webhook must be a URL"),
        ("clips", [1, 2], "The request body must be a JSON object"),
    ],
    ids=[
        "no-script",
        "empty-input",
        "audio-without-url",
        "no-presenter",
        "no-source-url",
        "bad-source-url",
        "long-user-data",
        "bad-webhook",
        "not-an-object",
    ],
)
async def test_invalid_bodies_are_a_400_bad_request(
    http: aiohttp.ClientSession, kind: str, document: object, description: str
) -> None:
    async with did_emulator() as base_url:
        status, body, _ = await request(http, "POST", f"{base_url}/{kind}", document)
        stats = await sandbox_json(http, base_url, "stats")
    assert (status, body["kind"]) == (400, "BadRequestError")
    assert body["description"].startswith(description)
    assert stats["created"] == 0


async def test_presenter_ids_knob_refuses_unknown_presenters(http: aiohttp.ClientSession) -> None:
    config = DidSandboxConfig(presenter_ids=frozenset({"amy-jcwCkr1grs"}))
    async with did_emulator(config) as base_url:
        unknown = await request(http, "POST", base_url + "/clips", clip_body())
        known = await request(
            http, "POST", base_url + "/clips", clip_body(presenter_id="amy-jcwCkr1grs")
        )
    assert unknown[:2] == (400, {"kind": "BadRequestError", "description": "presenter not found"})
    assert known[0] == 201


ERROR_KINDS = ["FaceError", "SourceError", "LogoError", "DriverError", "UnknownError"]


async def test_per_reference_faults_end_in_each_error_kind_or_rejected(
    http: aiohttp.ClientSession,
) -> None:
    clock = Clock()
    faults = {f"ref-{kind}": kind for kind in [*ERROR_KINDS, "rejected", "never_finish"]}
    config = DidSandboxConfig.model_validate({**FIXED, "fail_by_reference": faults})
    async with did_emulator(config, clock) as base_url:
        ids = {
            kind: (await create(http, base_url, document=clip_body(user_data=ref)))["id"]
            for ref, kind in faults.items()
        }
        clock.now_s += 10_000
        ended = {kind: await get_job(http, base_url, job_id) for kind, job_id in ids.items()}
        rows = await sandbox_json(http, base_url, "jobs")
    for kind in ERROR_KINDS:
        assert ended[kind]["status"] == "error", kind
        assert ended[kind]["error"]["kind"] == kind
        assert ended[kind]["error"]["description"]
        assert "result_url" not in ended[kind]
    assert ended["rejected"]["status"] == "rejected"
    assert ended["never_finish"]["status"] == "started"
    assert "pending_url" in ended["never_finish"]
    never = next(row for row in rows if row["fault"] == "never_finish")
    assert (never["status"], never["done_at"]) == ("started", None)


async def test_render_fault_p_draws_faults_per_job(http: aiohttp.ClientSession) -> None:
    clock = Clock()
    config = DidSandboxConfig.model_validate({**FIXED, "render_fault_p": {"FaceError": 1.0}})
    async with did_emulator(config, clock) as base_url:
        job_id = (await create(http, base_url))["id"]
        await set_knobs(http, base_url, render_fault_p={}, never_finish_p=1.0)
        never_id = (await create(http, base_url))["id"]
        clock.now_s += 10_000
        face = await get_job(http, base_url, job_id)
        never = await get_job(http, base_url, never_id)
    assert face["error"]["kind"] == "FaceError"
    assert never["status"] == "started"


@pytest.mark.parametrize(
    "knobs",
    [
        {"render_fault_p": {"NoSuchError": 0.5}},
        {"fail_by_reference": {"r": "failed"}},
        {"render_fault_p": {"FaceError": 0.6}, "never_finish_p": 0.6},
    ],
    ids=["unknown-kind", "other-providers-kind", "over-one"],
)
async def test_bad_fault_knobs_are_refused(
    http: aiohttp.ClientSession, knobs: dict[str, Any]
) -> None:
    async with did_emulator() as base_url:
        status, body, _ = await request(http, "POST", base_url + "/_sandbox/config", knobs)
    assert status == 400, body


async def test_expired_links_answer_403(http: aiohttp.ClientSession) -> None:
    clock = Clock()
    config = DidSandboxConfig.model_validate(
        {**FIXED, "fail_by_reference": {"stale": "expired_link"}}
    )
    async with did_emulator(config, clock) as base_url:
        fresh_id = (await create(http, base_url))["id"]
        stale_id = (await create(http, base_url, document=clip_body(user_data="stale")))["id"]
        clock.now_s += 10_000
        fresh = await get_job(http, base_url, fresh_id)
        stale = await get_job(http, base_url, stale_id)
        await set_knobs(http, base_url, link_ttl_s=0)
        expired = await get_job(http, base_url, fresh_id)
        answers = [
            await fetch(http, url)
            for url in (fresh["result_url"], stale["result_url"], expired["result_url"])
        ]
        unsigned = await fetch(http, fresh["result_url"].split("?")[0])
    assert stale["status"] == "done"
    assert [status for status, _, _ in answers] == [200, 403, 403]
    assert b"<Code>AccessDenied</Code>" in answers[1][1]
    assert answers[1][2] == "application/xml"
    assert unsigned[0] == 403


async def test_list_shows_the_newest_jobs_of_its_kind_with_user_data(
    http: aiohttp.ClientSession,
) -> None:
    async with did_emulator(DidSandboxConfig(list_limit=2)) as base_url:
        ids = [
            (await create(http, base_url, document=clip_body(user_data=f"r{n}")))["id"]
            for n in range(3)
        ]
        await create(http, base_url, "talks", talk_body())
        default = await request(http, "GET", base_url + "/clips")
        limited = await request(http, "GET", base_url + "/clips?limit=1")
        everything = await request(http, "GET", base_url + "/clips?limit=10")
        talks = await request(http, "GET", base_url + "/talks")
        bad = await request(http, "GET", base_url + "/clips?limit=zero")
        stats = await sandbox_json(http, base_url, "stats")
    assert [job["id"] for job in default[1]["clips"]] == ids[:0:-1]
    assert [job["user_data"] for job in limited[1]["clips"]] == ["r2"]
    assert [job["id"] for job in everything[1]["clips"]] == ids[::-1]
    assert {job["status"] for job in everything[1]["clips"]} <= {"created", "started"}
    assert [job["object"] for job in talks[1]["talks"]] == ["talk"]
    assert bad[0] == 400
    assert stats["polls"] == 0, "lists are not polls"


async def test_credits_run_out_into_402_and_errors_give_them_back(
    http: aiohttp.ClientSession,
) -> None:
    config = DidSandboxConfig.model_validate(
        {**FAST, "credits": 2, "fail_by_reference": {"bad": "UnknownError"}}
    )
    async with did_emulator(config) as base_url:
        await create(http, base_url)
        await create(http, base_url, document=clip_body(user_data="bad"))
        refused = await request(http, "POST", base_url + "/clips", clip_body())
        spent = await request(http, "GET", base_url + "/credits")
        await ended_jobs(http, base_url, 2)
        refunded = await request(http, "GET", base_url + "/credits")
        again = await request(http, "POST", base_url + "/clips", clip_body())
    assert refused[:2] == (
        402,
        {"kind": "InsufficientCreditsError", "description": "not enough credits"},
    )
    assert (spent[1]["remaining"], spent[1]["total"]) == (0, 2)
    assert spent[1]["credits"][0]["remaining"] == 0
    assert set(spent[1]["credits"][0]) == {"owner_id", "remaining", "total", "expire_at"}
    assert refunded[1]["remaining"] == 1, "the UnknownError job is not billed"
    assert again[0] == 201


async def test_forbidden_knob_refuses_creates_with_403(http: aiohttp.ClientSession) -> None:
    async with did_emulator(DidSandboxConfig(forbidden=True)) as base_url:
        answer = await request(http, "POST", base_url + "/clips", clip_body())
        jobs = await sandbox_json(http, base_url, "jobs")
    assert (answer[0], answer[1]["kind"]) == (403, "PermissionDeniedError")
    assert jobs == []


@pytest.mark.parametrize(("retry_after_s", "header"), [(7.0, "7"), (None, None)])
async def test_throttled_requests_are_429_with_optional_retry_after(
    http: aiohttp.ClientSession, retry_after_s: float | None, header: str | None
) -> None:
    config = DidSandboxConfig(throttled_p=1.0, retry_after_s=retry_after_s)
    async with did_emulator(config) as base_url:
        created = await request(http, "POST", base_url + "/clips", clip_body())
        read = await request(http, "GET", base_url + "/clips/clp_x")
        stats = await sandbox_json(http, base_url, "stats")
    assert (created[0], created[1]["kind"], read[0]) == (429, "TooManyRequestsError", 429)
    assert created[2].get("Retry-After") == header
    assert (stats["created"], stats["rejected_by_code"]) == (0, {"http_429": 2})


async def test_5xx_before_create_makes_no_job_and_rotates_statuses(
    http: aiohttp.ClientSession,
) -> None:
    async with did_emulator(DidSandboxConfig(transient_p=1.0)) as base_url:
        answers = [await request(http, "POST", base_url + "/clips", clip_body()) for _ in range(4)]
        stats = await sandbox_json(http, base_url, "stats")
    assert [status for status, _, _ in answers] == [500, 502, 503, 500]
    assert stats["created"] == 0


async def test_5xx_after_create_leaves_a_job_that_a_retry_duplicates(
    http: aiohttp.ClientSession,
) -> None:
    async with did_emulator(DidSandboxConfig(create_5xx_after_create_p=1.0)) as base_url:
        failed = await request(http, "POST", base_url + "/clips", clip_body())
        await set_knobs(http, base_url, create_5xx_after_create_p=0.0)
        listed = await request(http, "GET", base_url + "/clips")
        await create(http, base_url)
        stats = await sandbox_json(http, base_url, "stats")
    assert failed[0] == 500
    assert [job["user_data"] for job in listed[1]["clips"]] == ["cmp42-r9001"]
    assert (stats["created"], stats["duplicates"]) == (2, {"cmp42-r9001": 2})


async def test_malformed_body_knob_cuts_the_201_but_creates_the_job(
    http: aiohttp.ClientSession,
) -> None:
    async with did_emulator(DidSandboxConfig(malformed_body_p=1.0)) as base_url:
        status, body, _ = await request(http, "POST", base_url + "/clips", clip_body())
        jobs = await sandbox_json(http, base_url, "jobs")
    assert status == 201
    assert isinstance(body, bytes), "the body is not readable JSON"
    assert body.startswith(b'{"id":"clp_')
    assert len(jobs) == 1


async def test_latency_knob_delays_answers_past_a_client_timeout(
    http: aiohttp.ClientSession,
) -> None:
    async with did_emulator(DidSandboxConfig(latency_ms=300.0)) as base_url:
        timeout = aiohttp.ClientTimeout(total=0.05)
        with pytest.raises(asyncio.TimeoutError):
            await http.post(
                base_url + "/clips",
                json=clip_body(),
                headers={"Authorization": BASIC},
                timeout=timeout,
            )
        jobs = await sandbox_json(http, base_url, "jobs")
    assert len(jobs) == 1, "the answer was decided before the delay"


async def test_render_times_are_seeded_log_normal_at_least_the_minimum_and_compressed(
    http: aiohttp.ClientSession,
) -> None:
    async def render_times_s(**knobs: Any) -> list[float]:
        clock = Clock()
        async with did_emulator(DidSandboxConfig.model_validate(knobs), clock) as base_url:
            for _ in range(101):
                await create(http, base_url)
            clock.now_s += 1e9
            jobs = await sandbox_json(http, base_url, "jobs")
        return [job["done_at"] - job["created_at"] for job in jobs]

    drawn = await render_times_s(seed=7, render_min_s=0.0)
    repeated = await render_times_s(seed=7, render_min_s=0.0)
    floored = await render_times_s(seed=7, render_min_s=60.0, time_compression=10.0)
    assert drawn == repeated
    assert 50.0 < statistics.median(drawn) < 72.0, "median near render_median_s (60)"
    assert min(drawn) < 60.0 < max(drawn)
    assert min(floored) == pytest.approx(6.0)
    assert max(floored) < max(drawn) / 9


async def test_jobs_view_counts_polls_and_reset_forgets_jobs(http: aiohttp.ClientSession) -> None:
    config = DidSandboxConfig.model_validate({**FAST, "credits": 1})
    async with did_emulator(config) as base_url:
        job_id = (await create(http, base_url))["id"]
        for _ in range(3):
            await get_job(http, base_url, job_id)
        await request(http, "GET", base_url + "/clips/clp_unknown")
        (row,) = await ended_jobs(http, base_url, 1)
        stats = await sandbox_json(http, base_url, "stats")
        async with http.post(base_url + "/_sandbox/reset") as response:
            assert response.status == 200
        after = await request(http, "GET", f"{base_url}/clips/{job_id}")
        after_stats = await sandbox_json(http, base_url, "stats")
        after_jobs = await sandbox_json(http, base_url, "jobs")
        credits = await request(http, "GET", base_url + "/credits")
    assert (row["id"], row["reference"], row["status"], row["polls"]) == (
        job_id,
        "cmp42-r9001",
        "done",
        3,
    )
    assert row["done_at"] > row["created_at"]
    assert (stats["created"], stats["polls"], stats["duplicates"]) == (1, 4, {})
    assert after[0] == 404
    assert (after_stats["created"], after_jobs) == (0, [])
    assert credits[1]["remaining"] == 1


async def test_webhook_posts_the_ended_job_without_any_poll(http: aiohttp.ClientSession) -> None:
    config = DidSandboxConfig.model_validate(
        {**FAST, "fail_by_reference": {"bad": "FaceError", "no": "rejected"}}
    )
    async with running_receiver() as (receiver, hook), did_emulator(config) as base_url:
        for user_data in ("cmp42-r9001", "bad", "no"):
            await create(http, base_url, document=clip_body(webhook=hook, user_data=user_data))
        await create(http, base_url, document=clip_body(user_data="silent"))  # no webhook
        bodies = await receiver.wait_for(3)
        stats = await poll_stats(http, base_url, lambda s: s["webhook_events_delivered"] == 3)
    by_reference = {body["user_data"]: body for body in bodies}
    assert set(by_reference) == {"cmp42-r9001", "bad", "no"}
    assert by_reference["cmp42-r9001"]["status"] == "done"
    assert "result_url" in by_reference["cmp42-r9001"]
    assert by_reference["bad"]["error"]["kind"] == "FaceError"
    assert by_reference["no"]["status"] == "rejected"
    assert stats["polls"] == 0


async def test_webhook_knobs_repeat_omit_user_data_and_withhold(
    http: aiohttp.ClientSession,
) -> None:
    config = DidSandboxConfig.model_validate(
        {**FAST, "webhook_repeats": 2, "webhook_user_data": False}
    )
    async with running_receiver() as (receiver, hook), did_emulator(config) as base_url:
        job_id = (await create(http, base_url, document=clip_body(webhook=hook)))["id"]
        bodies = await receiver.wait_for(2)
        await set_knobs(http, base_url, webhook_drop_p=1.0)
        await create(http, base_url, document=clip_body(webhook=hook))
        stats = await poll_stats(http, base_url, lambda s: s["webhook_events_withheld"] == 1)
        await ended_jobs(http, base_url, 2)
    assert [body["id"] for body in bodies] == [job_id, job_id]
    assert all("user_data" not in body for body in bodies)
    assert stats["webhook_events_delivered"] == 2
    assert len(receiver.bodies) == 2, "the withheld webhook never came"


async def test_webhook_delay_holds_the_post_after_the_job_ended(
    http: aiohttp.ClientSession,
) -> None:
    config = DidSandboxConfig.model_validate({**FAST, "webhook_delay_ms": 60_000})
    async with running_receiver() as (receiver, hook), did_emulator(config) as base_url:
        await create(http, base_url, document=clip_body(webhook=hook))
        await ended_jobs(http, base_url, 1)
        stats = await poll_stats(http, base_url, lambda s: s["webhook_events_pending"] == 1)
    assert stats["webhook_events_delivered"] == 0
    assert receiver.bodies == []


def test_module_entry_point_serves_did_under_its_prefix() -> None:
    with sandbox_process() as base_url:
        create_request = urllib.request.Request(
            f"{base_url}/did/clips",
            data=orjson.dumps(clip_body()),
            headers={"Authorization": BASIC, "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(create_request, timeout=10) as response:
            status, body = response.status, orjson.loads(response.read())
        with urllib.request.urlopen(f"{base_url}/did/_sandbox/jobs", timeout=10) as response:
            jobs = orjson.loads(response.read())
    assert (status, body["status"]) == (201, "created")
    assert [job["id"] for job in jobs] == [body["id"]]
