"""The generic video-job emulator over real loopback HTTP, mounted at /video as
`python -m blastd.sandbox` serves it: the default dialect, the dialect knobs,
per-job scripts, faults, expiring links and callbacks.

Tests that look at one state pass a hand-moved clock; tests of what happens when a job ends
use the real clock with renders compressed to tens of milliseconds."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from blastd.sandbox.video_api import VideoApiSandboxConfig, build_video_api_app
from tests.harness import Clock, json_request, sandbox_json, sandbox_process, serving, set_knobs
from tests.video_harness import FAST, FIXED, fetch, running_receiver

TOKEN = "sandbox-token"
KEY_HEADERS = {"X-API-Key": TOKEN}


def video_emulator(
    config: VideoApiSandboxConfig | None = None, now: Callable[[], float] | None = None
) -> contextlib.AbstractAsyncContextManager[str]:
    """The emulator mounted at /video; yields the URL ending in /video."""
    app = build_video_api_app(config or VideoApiSandboxConfig(), **({"now": now} if now else {}))
    return serving(app, "/video")


def job_body(**extra: object) -> dict[str, object]:
    return {"script": "Halo Budi!", "avatarId": "a1", "reference": "cmp42-r9001", **extra}


async def request(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    document: object = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    """One request with the default key unless other headers are given."""
    return await json_request(
        http, method, url, document, KEY_HEADERS if headers is None else headers
    )


async def submit(http: aiohttp.ClientSession, base_url: str, **extra: object) -> str:
    status, body, _ = await request(http, "POST", base_url + "/job", job_body(**extra))
    assert status == 200, body
    job_id: str = body["jobId"]
    return job_id


async def poll(http: aiohttp.ClientSession, base_url: str, job_id: str) -> tuple[int, Any]:
    status, body, _ = await request(http, "GET", f"{base_url}/job/{job_id}")
    return status, body


async def test_default_dialect_is_the_design_notes(http: aiohttp.ClientSession) -> None:
    clock = Clock()
    async with video_emulator(VideoApiSandboxConfig.model_validate(FIXED), clock) as base_url:
        status, body, _ = await request(http, "POST", base_url + "/job", job_body())
        running = await poll(http, base_url, body["jobId"])
        clock.now_s += 60
        completed = await poll(http, base_url, body["jobId"])
        video = await fetch(http, completed[1]["videoUrl"])
        (row,) = await sandbox_json(http, base_url, "jobs")
    assert (status, list(body)) == (200, ["jobId"])
    assert running == (200, {"status": "processing"})
    assert completed[0] == 200
    assert set(completed[1]) == {"status", "videoUrl"}
    assert completed[1]["status"] == "completed"
    assert completed[1]["videoUrl"].startswith(base_url + "/_files/")
    assert (video[0], video[2], video[1][4:8]) == (200, "video/mp4", b"ftyp")
    assert (row["reference"], row["status"], row["polls"]) == ("cmp42-r9001", "done", 2)


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-API-Key": "wrong"}, {"Authorization": TOKEN}],
    ids=["none", "wrong", "other"],
)
async def test_wrong_key_is_401_on_submit_and_poll(
    http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    async with video_emulator() as base_url:
        submitted = await request(http, "POST", base_url + "/job", job_body(), headers)
        polled = await request(http, "GET", base_url + "/job/job_x", headers=headers)
        stats = await sandbox_json(http, base_url, "stats")
    assert submitted[:2] == (401, {"error": "unauthorized"})
    assert polled[0] == 401
    assert stats["created"] == 0


async def test_dialect_knobs_rename_paths_fields_and_auth_at_runtime(
    http: aiohttp.ClientSession,
) -> None:
    clock = Clock()
    dialect = {
        "auth_header": "Authorization",
        "auth_template": "Bearer {api_key}",
        "submit_path": "/v2/renders",
        "submit_http_status": 202,
        "status_path": "/v2/renders/{job_id}/state",
        "job_id_field": "data.id",
        "status_field": "state",
        "url_field": "result.url",
        "status_processing": "queued",
        "status_completed": "SUCCEEDED",
        "reference_field": "client_ref",
    }
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with video_emulator(VideoApiSandboxConfig.model_validate(FIXED), clock) as base_url:
        await set_knobs(http, base_url, **dialect)
        old_path = await request(http, "POST", base_url + "/job", job_body(), bearer)
        document = {"script": "Halo", "client_ref": "ref-7"}
        created = await request(http, "POST", base_url + "/v2/renders", document, bearer)
        job_id = created[1]["data"]["id"]
        running = await request(http, "GET", f"{base_url}/v2/renders/{job_id}/state", None, bearer)
        clock.now_s += 60
        done = await request(http, "GET", f"{base_url}/v2/renders/{job_id}/state", None, bearer)
        (row,) = await sandbox_json(http, base_url, "jobs")
    assert old_path[0] == 404
    assert created[0] == 202
    assert running[:2] == (200, {"state": "queued"})
    assert done[1]["state"] == "SUCCEEDED"
    assert done[1]["result"]["url"].startswith(base_url + "/_files/")
    assert row["reference"] == "ref-7"


@pytest.mark.parametrize(
    "knobs",
    [{"status_path": "/job/{id}"}, {"submit_path": "job"}, {"auth_template": "Bearer"}],
    ids=["status-path-without-job-id", "relative-submit-path", "template-without-key"],
)
async def test_bad_dialect_knobs_are_refused(
    http: aiohttp.ClientSession, knobs: dict[str, str]
) -> None:
    async with video_emulator() as base_url:
        status, _, _ = await request(http, "POST", base_url + "/_sandbox/config", knobs)
    assert status == 400


async def test_failed_not_found_and_unknown_statuses(http: aiohttp.ClientSession) -> None:
    clock = Clock()
    faults = {"bad": "failed", "lost": "not_found", "late": "not_found_at_first"}
    knobs = {**FIXED, "fail_by_reference": faults, "not_found_first_polls": 2}
    async with video_emulator(VideoApiSandboxConfig.model_validate(knobs), clock) as base_url:
        ids = {ref: await submit(http, base_url, reference=ref) for ref in faults}
        late = [(await poll(http, base_url, ids["late"]))[1]["status"] for _ in range(3)]
        await set_knobs(http, base_url, status_unknown="rendering")
        unknown = await poll(http, base_url, ids["bad"])
        clock.now_s += 10_000
        failed = await poll(http, base_url, ids["bad"])
        lost = await poll(http, base_url, ids["lost"])
        never_created = await poll(http, base_url, "job_unknown")
        await set_knobs(http, base_url, http_404_for_not_found=True, error_field="message")
        lost_404 = await poll(http, base_url, ids["lost"])
        await set_knobs(
            http,
            base_url,
            http_404_for_not_found=False,
            status_failed="ERRORED",
            status_not_found="missing",
        )
        renamed = [(await poll(http, base_url, ids[ref]))[1]["status"] for ref in ("bad", "lost")]
    assert late == ["not_found", "not_found", "processing"]
    assert unknown == (200, {"status": "rendering"})
    assert failed == (200, {"status": "failed", "error": "render crashed"})
    assert lost == never_created == (200, {"status": "not_found"})
    assert lost_404 == (404, {"message": "job not found"})
    assert renamed == ["ERRORED", "missing"]


async def test_required_fields_and_callback_url_are_checked(http: aiohttp.ClientSession) -> None:
    config = VideoApiSandboxConfig(required_fields=("script", "avatarId"))
    async with video_emulator(config) as base_url:
        no_avatar = await request(http, "POST", base_url + "/job", {"script": "Halo"})
        bad_callback = await request(
            http, "POST", base_url + "/job", job_body(callbackUrl="mailto:x")
        )
        not_json = await request(http, "POST", base_url + "/job", [1])
        ok = await request(http, "POST", base_url + "/job", job_body(callbackUrl=""))
    assert no_avatar[:2] == (400, {"error": "avatarId is required"})
    assert bad_callback[:2] == (400, {"error": "callbackUrl must be a URL"})
    assert not_json[0] == 400
    assert ok[0] == 200, "an empty callback is none"


@pytest.mark.parametrize(("retry_after_s", "header"), [(2.5, "2.5"), (None, None)])
async def test_429_on_submit_and_poll_with_optional_retry_after(
    http: aiohttp.ClientSession, retry_after_s: float | None, header: str | None
) -> None:
    config = VideoApiSandboxConfig(throttled_p=1.0, retry_after_s=retry_after_s)
    async with video_emulator(config) as base_url:
        submitted = await request(http, "POST", base_url + "/job", job_body())
        polled = await request(http, "GET", base_url + "/job/job_x")
    assert (submitted[0], polled[0]) == (429, 429)
    assert submitted[2].get("Retry-After") == polled[2].get("Retry-After") == header


async def test_5xx_after_submit_creates_the_job_a_resubmit_duplicates(
    http: aiohttp.ClientSession,
) -> None:
    config = VideoApiSandboxConfig(create_5xx_after_create_p=1.0)
    async with video_emulator(config) as base_url:
        failed = await request(http, "POST", base_url + "/job", job_body())
        await set_knobs(http, base_url, create_5xx_after_create_p=0.0, transient_p=1.0)
        before = await request(http, "POST", base_url + "/job", job_body())
        await set_knobs(http, base_url, transient_p=0.0)
        await submit(http, base_url)
        stats = await sandbox_json(http, base_url, "stats")
    assert (failed[0], before[0]) == (500, 502)
    assert (stats["created"], stats["duplicates"]) == (2, {"cmp42-r9001": 2})


async def test_forbidden_malformed_and_slow_submits(http: aiohttp.ClientSession) -> None:
    async with video_emulator(VideoApiSandboxConfig(forbidden=True)) as base_url:
        forbidden = await request(http, "POST", base_url + "/job", job_body())
    async with video_emulator(VideoApiSandboxConfig(malformed_body_p=1.0)) as base_url:
        malformed = await request(http, "POST", base_url + "/job", job_body())
    async with video_emulator(VideoApiSandboxConfig(latency_ms=300.0)) as base_url:
        with pytest.raises(asyncio.TimeoutError):
            await http.post(
                base_url + "/job",
                json=job_body(),
                headers=KEY_HEADERS,
                timeout=aiohttp.ClientTimeout(total=0.05),
            )
        jobs = await sandbox_json(http, base_url, "jobs")
    assert forbidden[:2] == (403, {"error": "permission denied"})
    assert malformed[0] == 200
    assert isinstance(malformed[1], bytes)
    assert malformed[1].startswith(b'{"jobId')
    assert len(jobs) == 1, "the slow answer's job was created"


async def test_expired_video_url_answers_403(http: aiohttp.ClientSession) -> None:
    clock = Clock()
    config = VideoApiSandboxConfig.model_validate(
        {**FIXED, "fail_by_reference": {"stale": "expired_link"}}
    )
    async with video_emulator(config, clock) as base_url:
        fresh_id = await submit(http, base_url)
        stale_id = await submit(http, base_url, reference="stale")
        clock.now_s += 10_000
        _, fresh = await poll(http, base_url, fresh_id)
        _, stale = await poll(http, base_url, stale_id)
        await set_knobs(http, base_url, link_ttl_s=0)
        _, expired = await poll(http, base_url, fresh_id)
        statuses = [(await fetch(http, done["videoUrl"]))[0] for done in (fresh, stale, expired)]
    assert {fresh["status"], stale["status"]} == {"completed"}
    assert statuses == [200, 403, 403]


async def test_callback_posts_ended_jobs_to_the_named_field(http: aiohttp.ClientSession) -> None:
    config = VideoApiSandboxConfig.model_validate(
        {**FAST, "callback_field": "notify", "fail_by_reference": {"bad": "failed"}}
    )
    async with running_receiver() as (receiver, hook), video_emulator(config) as base_url:
        ok_id = await submit(http, base_url, notify=hook)
        bad_id = await submit(http, base_url, notify=hook, reference="bad")
        await submit(http, base_url, callbackUrl=hook, reference="other-field")
        bodies = await receiver.wait_for(2)
        await set_knobs(http, base_url, webhook_user_data=False, job_id_field="data.id")
        _, quiet, _ = await request(http, "POST", base_url + "/job", job_body(notify=hook))
        quiet_id = quiet["data"]["id"]
        bodies = await receiver.wait_for(3)
    by_id = {body.get("jobId") or body["data"]["id"]: body for body in bodies}
    assert by_id[ok_id]["status"] == "completed"
    assert by_id[ok_id]["reference"] == "cmp42-r9001"
    assert "videoUrl" in by_id[ok_id]
    assert by_id[bad_id] == {
        "status": "failed",
        "error": "render crashed",
        "jobId": bad_id,
        "reference": "bad",
    }
    assert "reference" not in by_id[quiet_id]
    assert len(bodies) == 3, "the job naming its callback in another field got none"


def test_module_entry_point_serves_the_video_api_under_its_prefix() -> None:
    with sandbox_process() as base_url:
        submit_request = urllib.request.Request(
            f"{base_url}/video/job",
            data=orjson.dumps(job_body()),
            headers={**KEY_HEADERS, "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(submit_request, timeout=10) as response:
            body = orjson.loads(response.read())
        poll_request = urllib.request.Request(
            f"{base_url}/video/job/{body['jobId']}", headers=KEY_HEADERS
        )
        with urllib.request.urlopen(poll_request, timeout=10) as response:
            state = orjson.loads(response.read())
    assert body["jobId"].startswith("job_")
    assert state == {"status": "processing"}
