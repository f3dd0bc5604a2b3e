"""The generic video-job adapter against the generic emulator over real loopback HTTP, in
several dialects, and its pure path and template helpers.

Job states move on hand-moved clocks: the emulator's (every render takes 60 s on it) and the
adapter's own (the not-found grace after a submit)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from blastd.config import VideoApiAccount
from blastd.embedded import free_port
from blastd.errors import (
    CampaignFatalError,
    ConfigError,
    PermanentError,
    ProviderError,
    ThrottledError,
    TransientError,
    UncertainOutcomeError,
)
from blastd.providers.answers import MAX_RETRY_AFTER_S, error_for_status
from blastd.providers.video.accounts import build_video_provider
from blastd.providers.video.base import VideoRequest, VideoStatus
from blastd.providers.video.video_api import (
    VideoApiProvider,
    error_text_at,
    job_id_text,
    path_parts,
    render_submit_body,
    value_at,
)
from blastd.sandbox.video_api import VideoApiSandboxConfig, build_video_api_app
from tests.harness import Clock, sandbox_json, serving, set_knobs, wait_until

KEY = "k_live_123-s3cr3t"
REFERENCE = "cmp42-r9001"
RENDER_S = 60.0  # median render time; with sigma 0 every job takes exactly this long
GRACE_S = 30.0

# The default names (the same on both sides), and a dialect changing every one.
DEFAULT_DIALECT: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
NESTED: tuple[dict[str, Any], dict[str, Any]] = (
    {
        "auth_header": "Authorization",
        "auth_template": "Bearer {api_key}",
        "submit_path": "/v2/renders",
        "submit_http_status": 202,
        "status_path": "/v2/renders/{job_id}/status",
        "reference_field": "clientRef",
        "callback_field": "hook",
        "job_id_field": "data.id",
        "status_field": "state",
        "url_field": "result.url",
        "error_field": "detail.message",
        "status_processing": "RUNNING",
        "status_completed": "DONE",
        "status_failed": "ERROR",
        "http_404_for_not_found": True,
    },
    {
        "auth_header": "Authorization",
        "auth_template": "Bearer {api_key}",
        "submit_path": "/v2/renders",
        "submit_body": {"script": "{script}", "clientRef": "{reference}", "hook": "{callback_url}"},
        "job_id_path": "$.data.id",
        "status_path": "/v2/renders/{job_id}/status",
        "status_field_path": "state",
        "video_url_path": "result.url",
        "error_path": "$.detail.message",
        "status_map": {" Running": "running", "DONE": "succeeded", "error": "failed"},
    },
)
DIALECTS = pytest.mark.parametrize("dialect", [DEFAULT_DIALECT, NESTED], ids=["default", "nested"])


def sandbox_config(**knobs: Any) -> VideoApiSandboxConfig:
    return VideoApiSandboxConfig.model_validate(
        {"tokens": [KEY], "render_median_s": RENDER_S, "render_sigma": 0.0, **knobs}
    )


def video_emulator(
    config: VideoApiSandboxConfig | None = None, now: Callable[[], float] | None = None
) -> contextlib.AbstractAsyncContextManager[str]:
    """The emulator mounted at /video; yields the URL ending in /video."""
    app = build_video_api_app(config or sandbox_config(), **({"now": now} if now else {}))
    return serving(app, "/video")


def account_for(base_url: str, **fields: Any) -> VideoApiAccount:
    return VideoApiAccount.model_validate(
        {"kind": "video_api", "base_url": base_url, "token": KEY, **fields}
    )


def provider_for(
    base_url: str, http: aiohttp.ClientSession, now: Clock | None = None, **fields: Any
) -> VideoApiProvider:
    account = account_for(base_url, **fields)
    return VideoApiProvider("acme-video", account, http, now=now or Clock())


def request_for(reference: str = REFERENCE, **fields: Any) -> VideoRequest:
    return VideoRequest(reference=reference, script="Halo Budi!", **fields)


async def submit_error(
    config: VideoApiSandboxConfig, http: aiohttp.ClientSession, **fields: Any
) -> tuple[ProviderError, Any]:
    """Submit once to an emulator with `config`; the error raised and the emulator's stats."""
    async with video_emulator(config) as base_url:
        with pytest.raises(ProviderError) as caught:
            await provider_for(base_url, http, **fields).submit(request_for())
        stats = await sandbox_json(http, base_url, "stats")
    assert KEY not in caught.value.text
    return caught.value, stats


@DIALECTS
async def test_a_job_runs_then_succeeds_with_a_fetchable_link(
    http: aiohttp.ClientSession, dialect: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    knobs, fields = dialect
    clock = Clock()
    async with video_emulator(sandbox_config(**knobs), clock) as base_url:
        provider = provider_for(base_url, http, **fields)
        job_id = await provider.submit(request_for())
        running = await provider.status(job_id)
        clock.now_s += RENDER_S
        done = await provider.status(job_id)
        assert done.video_url is not None
        async with http.get(done.video_url) as response:
            video = (response.status, response.content_type)
        [job] = await sandbox_json(http, base_url, "jobs")
    assert job_id == job["id"]
    assert job["reference"] == REFERENCE
    assert running == VideoStatus(job_id, "running")
    assert (done.state, done.error_code) == ("succeeded", None)
    assert video == (200, "video/mp4")


@DIALECTS
async def test_a_failed_job_fails_with_its_status_and_error_text(
    http: aiohttp.ClientSession, dialect: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    knobs, fields = dialect
    clock = Clock()
    config = sandbox_config(fail_by_reference={REFERENCE: "failed"}, **knobs)
    async with video_emulator(config, clock) as base_url:
        provider = provider_for(base_url, http, **fields)
        job_id = await provider.submit(request_for())
        clock.now_s += RENDER_S
        status = await provider.status(job_id)
    expected_code = config.status_failed.lower()
    assert status == VideoStatus(
        job_id, "failed", error_code=expected_code, error_text="render crashed"
    )


@DIALECTS
async def test_a_job_the_api_never_saw_is_not_found(
    http: aiohttp.ClientSession, dialect: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    knobs, fields = dialect
    async with video_emulator(sandbox_config(**knobs)) as base_url:
        status = await provider_for(base_url, http, **fields).status("job_unknown")
    assert status == VideoStatus("job_unknown", "not_found")


async def test_http_404_is_an_error_when_the_dialect_says_it_is_no_job_state(
    http: aiohttp.ClientSession,
) -> None:
    async with video_emulator(sandbox_config(http_404_for_not_found=True)) as base_url:
        provider = provider_for(base_url, http, http_404_means_not_found=False)
        with pytest.raises(PermanentError) as caught:
            await provider.status("job_unknown")
    assert (caught.value.code, caught.value.text) == ("http_404", "job not found")


@pytest.mark.parametrize("http_404", [False, True], ids=["body-not-found", "http-404"])
async def test_not_found_right_after_our_submit_reads_as_running_for_the_grace(
    http: aiohttp.ClientSession, http_404: bool
) -> None:
    adapter_clock = Clock()
    config = sandbox_config(
        http_404_for_not_found=http_404, fail_by_reference={REFERENCE: "not_found"}
    )
    async with video_emulator(config) as base_url:
        provider = provider_for(base_url, http, adapter_clock, not_found_grace_s=GRACE_S)
        job_id = await provider.submit(request_for())
        within = await provider.status(job_id)
        adapter_clock.now_s += GRACE_S
        after = await provider.status(job_id)
        restarted = provider_for(base_url, http, not_found_grace_s=GRACE_S)
        unknown_to_a_new_adapter = await restarted.status(job_id)
    assert within == VideoStatus(job_id, "running")
    assert after == VideoStatus(job_id, "not_found")
    assert unknown_to_a_new_adapter == VideoStatus(job_id, "not_found")


async def test_an_eventually_consistent_job_is_followed_through_to_done(
    http: aiohttp.ClientSession,
) -> None:
    clock = Clock()
    config = sandbox_config(
        fail_by_reference={REFERENCE: "not_found_at_first"}, not_found_first_polls=2
    )
    async with video_emulator(config, clock) as base_url:
        provider = provider_for(base_url, http)
        job_id = await provider.submit(request_for())
        hidden = [await provider.status(job_id) for _ in range(2)]
        clock.now_s += RENDER_S
        done = await provider.status(job_id)
    assert hidden == [VideoStatus(job_id, "running")] * 2
    assert done.state == "succeeded"


async def test_no_grace_means_not_found_at_once(http: aiohttp.ClientSession) -> None:
    config = sandbox_config(fail_by_reference={REFERENCE: "not_found_at_first"})
    async with video_emulator(config) as base_url:
        provider = provider_for(base_url, http, not_found_grace_s=0)
        job_id = await provider.submit(request_for())
        status = await provider.status(job_id)
    assert status == VideoStatus(job_id, "not_found")


async def test_an_unknown_status_follows_the_policy_and_is_logged_once(
    http: aiohttp.ClientSession,
) -> None:
    async with video_emulator(sandbox_config(status_unknown=" Rendering_V2 ")) as base_url:
        as_running = provider_for(base_url, http)
        as_failed = provider_for(base_url, http, unknown_status="failed")
        job_id = await as_running.submit(request_for())
        with capture_logs() as logs:
            running = [await as_running.status(job_id) for _ in range(3)]
        failed = await as_failed.status(job_id)
    assert running == [VideoStatus(job_id, "running")] * 3
    # Each poll's own debug line (provider_request) aside, the unknown status is logged once.
    unknown = [log for log in logs if log["event"] != "provider_request"]
    assert [(log["event"], log["status"], log["account"]) for log in unknown] == [
        ("video_status_unknown", "rendering_v2", "acme-video")
    ]
    assert KEY not in str(logs)
    assert (failed.state, failed.error_code) == ("failed", "rendering_v2")


async def test_success_without_a_url_at_the_configured_path_is_a_failed_job(
    http: aiohttp.ClientSession,
) -> None:
    clock = Clock()
    async with video_emulator(now=clock) as base_url:
        provider = provider_for(base_url, http, video_url_path="url")
        job_id = await provider.submit(request_for())
        clock.now_s += RENDER_S
        status = await provider.status(job_id)
    assert (status.state, status.error_code) == ("failed", "missing_result_url")


async def test_options_fill_submit_templates_and_an_unset_one_drops_its_field(
    http: aiohttp.ClientSession,
) -> None:
    config = sandbox_config(required_fields=["script", "avatarId"])
    body = {"script": "{script}", "avatarId": "{avatar_id}", "reference": "{reference}"}
    async with video_emulator(config) as base_url:
        provider = provider_for(base_url, http, submit_body=body)
        job_id = await provider.submit(request_for(options={"avatar_id": "a1"}))
        with pytest.raises(PermanentError) as caught:
            await provider.submit(request_for())
    assert job_id.startswith("job_")
    assert (caught.value.code, caught.value.text) == ("http_400", "avatarId is required")


def test_render_submit_body_leaves_out_empty_fields_and_keeps_our_names() -> None:
    templates = {
        "script": "{script}",
        "ref": "blastd-{reference}",
        "callbackUrl": "{callback_url}",
        "avatarId": "{avatar_id}",
        "braces": "{{literal}}",
    }
    options = {"script": "an option cannot replace the script"}
    assert render_submit_body(templates, request_for(options=options)) == {
        "script": "Halo Budi!",
        "ref": f"blastd-{REFERENCE}",
        "braces": "{literal}",
    }


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("auth_template", "Bearer"),
        ("auth_template", "{api_key} {script}"),
        ("status_path", "/job/{id}"),
        ("submit_body", {"script": "{script!r}"}),
        ("submit_body", {"script": "{script.upper}"}),
        ("submit_body", {"script": "{script"}),
    ],
)
async def test_a_template_that_cannot_render_right_is_a_config_error(
    http: aiohttp.ClientSession, setting: str, value: Any
) -> None:
    with pytest.raises(ConfigError, match=f"acme-video__{setting}"):
        provider_for("https://video.example.com", http, **{setting: value})


async def test_a_missing_key_is_a_config_error(http: aiohttp.ClientSession) -> None:
    with pytest.raises(ConfigError, match="acme-video__token"):
        provider_for("https://video.example.com", http, token=None)


async def test_the_api_cannot_find_jobs(http: aiohttp.ClientSession) -> None:
    account = account_for("https://video.example.com")
    provider = build_video_provider("acme-video", account, http)
    assert isinstance(provider, VideoApiProvider)
    assert not provider.can_find
    assert await provider.find(REFERENCE) is None


@pytest.mark.parametrize(
    ("knobs", "error_class", "code", "created"),
    [
        ({"tokens": ["another-key"]}, CampaignFatalError, "http_401", 0),
        ({"forbidden": True}, CampaignFatalError, "http_403", 0),
        ({"required_fields": ["avatarId"]}, PermanentError, "http_400", 0),
        ({"transient_p": 1.0}, TransientError, "http_500", 0),
        ({"create_5xx_after_create_p": 1.0}, TransientError, "http_500", 1),
        ({"malformed_body_p": 1.0}, UncertainOutcomeError, "http_200", 1),
    ],
    ids=["401", "403", "400", "500-before-create", "500-after-create", "unreadable-2xx"],
)
async def test_a_refused_submit_is_classified_by_status(
    http: aiohttp.ClientSession,
    knobs: dict[str, Any],
    error_class: type,
    code: str,
    created: int,
) -> None:
    error, stats = await submit_error(sandbox_config(**knobs), http)
    assert (type(error), error.code) == (error_class, code)
    assert stats["created"] == created


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (422, PermanentError),
        (402, CampaignFatalError),
        (408, TransientError),
        (409, TransientError),
        (504, TransientError),
    ],
)
def test_statuses_without_an_emulator_knob_are_classified(status: int, error_class: type) -> None:
    assert type(error_for_status(status, f"http_{status}", "", None)) is error_class


@pytest.mark.parametrize(
    ("retry_after_s", "expected_s"),
    [(7, 7.0), (0.5, 0.5), (100_000, MAX_RETRY_AFTER_S), (None, None)],
    ids=["seconds", "fraction", "capped", "absent"],
)
async def test_429_throttles_submit_and_status_with_retry_after(
    http: aiohttp.ClientSession, retry_after_s: float | None, expected_s: float | None
) -> None:
    async with video_emulator() as base_url:
        provider = provider_for(base_url, http)
        job_id = await provider.submit(request_for())
        await set_knobs(http, base_url, throttled_p=1.0, retry_after_s=retry_after_s)
        with pytest.raises(ThrottledError) as on_submit:
            await provider.submit(request_for("cmp42-r9002"))
        with pytest.raises(ThrottledError) as on_status:
            await provider.status(job_id)
    for caught in (on_submit, on_status):
        assert caught.value.code == "http_429"
        assert caught.value.retry_after_s == expected_s


async def test_5xx_on_status_is_transient(http: aiohttp.ClientSession) -> None:
    async with video_emulator() as base_url:
        provider = provider_for(base_url, http)
        job_id = await provider.submit(request_for())
        await set_knobs(http, base_url, transient_p=1.0)
        with pytest.raises(TransientError) as caught:
            await provider.status(job_id)
    assert (caught.value.code, caught.value.text) == ("http_500", "HTTP 500")


async def test_a_slow_answer_to_a_submission_leaves_it_in_doubt(
    http: aiohttp.ClientSession,
) -> None:
    """The job may have been created: the runner looks it up by reference before submitting
    it again."""
    error, _ = await submit_error(sandbox_config(latency_ms=2000), http, request_timeout_s=0.05)
    assert isinstance(error, UncertainOutcomeError)
    assert (error.code, error.text) == ("timeout", "no answer within 0.05 s")


async def test_a_refused_connection_is_transient(http: aiohttp.ClientSession) -> None:
    provider = provider_for(f"http://127.0.0.1:{free_port()}/video", http)
    with pytest.raises(TransientError) as caught:
        await provider.status("job_1")
    assert caught.value.code == "network"
    assert KEY not in caught.value.text


@DIALECTS
async def test_the_callback_names_the_submitted_job(
    http: aiohttp.ClientSession,
    webhook_sink: tuple[str, list[Any]],
    dialect: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    knobs, fields = dialect
    sink_url, bodies = webhook_sink
    fast = {"render_median_s": 1.0, "render_min_s": 0.0, "time_compression": 100.0}
    async with video_emulator(sandbox_config(**knobs, **fast)) as base_url:
        provider = provider_for(base_url, http, **fields)
        job_id = await provider.submit(request_for(webhook_url=sink_url))
        await wait_until(lambda: bodies, timeout_s=10, interval_s=0.01)
    [body] = bodies
    assert provider.webhook_job_id(body) == job_id


async def test_a_callback_without_the_configured_path_falls_back_to_id(
    http: aiohttp.ClientSession,
) -> None:
    provider = provider_for("https://video.example.com", http, job_id_path="data.id")
    assert provider.webhook_job_id({"id": "job_1", "status": "completed"}) == "job_1"
    assert provider.webhook_job_id({"data": {"id": 7}}) == "7"
    assert provider.webhook_job_id({"status": "completed"}) is None


@pytest.mark.parametrize(
    ("path", "parts"),
    [("jobId", ("jobId",)), ("$.data.jobId", ("data", "jobId")), ("$", ()), ("", ())],
)
def test_paths_are_dotted_with_an_optional_dollar(path: str, parts: tuple[str, ...]) -> None:
    assert path_parts(path) == parts


def test_value_at_walks_objects_and_list_indexes() -> None:
    document = {"data": {"items": [{"url": "u0"}, {"url": "u1"}]}, "flag": True}
    assert value_at(document, path_parts("data.items.1.url")) == "u1"
    assert value_at(document, path_parts("data.items.2.url")) is None
    assert value_at(document, path_parts("flag.deeper")) is None
    assert value_at(document, ()) is document


@pytest.mark.parametrize(
    ("value", "text"), [("9b2f", "9b2f"), (42, "42"), ("", None), (True, None), (None, None)]
)
def test_a_job_id_is_a_string_or_an_integer(value: object, text: str | None) -> None:
    assert job_id_text(value) == text


def test_an_error_quoting_the_key_keeps_it_out_of_the_text() -> None:
    document = {"error": {"message": f"key {KEY} is over quota"}}
    assert error_text_at(document, ("error",), KEY) == '{"message":"key [token] is over quota"}'
    assert error_text_at(document, ("missing",), KEY) is None
