"""The D-ID adapter against the D-ID emulator over real loopback HTTP, and its pure readers.

Tests that look at one job state pass the emulator a hand-moved clock (every render takes
60 s on it); the webhook test uses the real clock with renders compressed to milliseconds."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from blastd.config import DidAccount
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
from blastd.providers.answers import MAX_RETRY_AFTER_S, Answer
from blastd.providers.video.accounts import build_video_provider
from blastd.providers.video.base import VideoRequest, VideoStatus
from blastd.providers.video.did import DidProvider, build_job_body, read_job, refusal_error
from blastd.sandbox.did import DidSandboxConfig, build_did_app
from tests.harness import Clock, get_json, sandbox_json, serving, set_knobs, wait_until

KEY = "api-user@example.com:s3cr3t-pass"
ENCODED_KEY = base64.b64encode(KEY.encode()).decode()
SECRETS = (KEY, ENCODED_KEY)
AUTH = {"Authorization": f"Basic {KEY}"}
PRESENTER = "v2_public_Amber@0zSz8kflCN"
PHOTO = "https://create-images-results.d-id.com/DefaultPresenters/Noelle_f/image.png"
REFERENCE = "cmp42-r9001"
RENDER_S = 60.0  # median render time; with sigma 0 every job takes exactly this long
ERROR_KINDS = ("FaceError", "SourceError", "LogoError", "DriverError", "UnknownError")


def sandbox_config(**knobs: Any) -> DidSandboxConfig:
    return DidSandboxConfig.model_validate(
        {"tokens": [KEY], "render_median_s": RENDER_S, "render_sigma": 0.0, **knobs}
    )


def did_emulator(
    config: DidSandboxConfig | None = None, now: Callable[[], float] | None = None
) -> contextlib.AbstractAsyncContextManager[str]:
    """The emulator mounted at /did; yields the URL ending in /did."""
    app = build_did_app(config or sandbox_config(), **({"now": now} if now else {}))
    return serving(app, "/did")


def account_for(base_url: str, **fields: Any) -> DidAccount:
    return DidAccount.model_validate(
        {"kind": "did", "base_url": base_url, "token": KEY, "presenter_id": PRESENTER, **fields}
    )


def provider_for(base_url: str, http: aiohttp.ClientSession, **fields: Any) -> DidProvider:
    return DidProvider("did-main", account_for(base_url, **fields), http)


def request_for(reference: str = REFERENCE, **fields: Any) -> VideoRequest:
    return VideoRequest(reference=reference, script="Halo Budi! Terima kasih.", **fields)


async def submit_error(
    config: DidSandboxConfig, http: aiohttp.ClientSession, **fields: Any
) -> tuple[ProviderError, Any]:
    """Submit once to an emulator with `config`; the error raised and the emulator's stats."""
    async with did_emulator(config) as base_url:
        with pytest.raises(ProviderError) as caught:
            await provider_for(base_url, http, **fields).submit(request_for())
        stats = await sandbox_json(http, base_url, "stats")
    assert KEY not in caught.value.text
    assert ENCODED_KEY not in caught.value.text
    return caught.value, stats


async def test_clip_carries_presenter_driver_reference_and_config(
    http: aiohttp.ClientSession,
) -> None:
    async with did_emulator() as base_url:
        provider = provider_for(base_url, http, driver_id="uM00QMwJ9x", result_format="mov")
        job_id = await provider.submit(request_for())
        job = await get_json(http, f"{base_url}/clips/{job_id}", AUTH)
    assert job_id.startswith("clp_")
    assert job["presenter_id"] == PRESENTER
    assert job["driver_id"] == "uM00QMwJ9x"
    assert (job["user_data"], job["name"]) == (REFERENCE, REFERENCE)
    assert job["config"] == {"result_format": "mov"}


async def test_talk_carries_the_photo_instead_of_a_presenter(http: aiohttp.ClientSession) -> None:
    async with did_emulator() as base_url:
        provider = provider_for(base_url, http, endpoint="talks", source_url=PHOTO)
        job_id = await provider.submit(request_for())
        status = await provider.status(job_id)
        job = await get_json(http, f"{base_url}/talks/{job_id}", AUTH)
    assert job_id.startswith("tlk_")
    assert status == VideoStatus(job_id, "running")
    assert job["source_url"] == PHOTO
    assert "presenter_id" not in job


def test_options_override_the_account_defaults() -> None:
    account = account_for("https://api.d-id.com", voice_id="id-ID-GadisNeural")
    options = {
        "presenter_id": "amy-jcwCkr1grs",
        "driver_id": "d1",
        "voice_id": "Rachel",
        "voice_provider": "elevenlabs",
        "avatar_id": "meant for another kind of account",
    }
    request = request_for(webhook_url="https://hooks.example.com/d-id?token=t", options=options)
    assert build_job_body(request, account) == {
        "presenter_id": "amy-jcwCkr1grs",
        "driver_id": "d1",
        "script": {
            "type": "text",
            "input": "Halo Budi! Terima kasih.",
            "provider": {"type": "elevenlabs", "voice_id": "Rachel"},
        },
        "config": {"result_format": "mp4"},
        "user_data": REFERENCE,
        "name": REFERENCE,
        "webhook": "https://hooks.example.com/d-id?token=t",
    }


def test_account_defaults_fill_a_talk_and_no_voice_leaves_d_ids_default() -> None:
    account = account_for("https://api.d-id.com", endpoint="talks", source_url=PHOTO)
    body = build_job_body(request_for(options={"source_url": ""}), account)
    assert body["source_url"] == PHOTO, "an empty option counts as unset"
    assert body["script"] == {"type": "text", "input": "Halo Budi! Terima kasih."}
    assert "webhook" not in body
    assert "presenter_id" not in body


@pytest.mark.parametrize(
    ("endpoint", "code"), [("clips", "no_presenter_id"), ("talks", "no_source_url")]
)
async def test_a_job_without_presenter_or_photo_stops_the_campaign_before_any_request(
    http: aiohttp.ClientSession, endpoint: str, code: str
) -> None:
    async with did_emulator() as base_url:
        provider = provider_for(base_url, http, endpoint=endpoint, presenter_id=None)
        with pytest.raises(CampaignFatalError) as caught:
            await provider.submit(request_for())
        stats = await sandbox_json(http, base_url, "stats")
    assert caught.value.code == code
    assert stats["requests"] == 0


@pytest.mark.parametrize("auth_form", ["raw", "base64"])
async def test_the_key_goes_raw_or_base64_as_configured(
    http: aiohttp.ClientSession, auth_form: str
) -> None:
    config = sandbox_config(auth_forms=[auth_form])
    async with did_emulator(config) as base_url:
        job_id = await provider_for(base_url, http, auth_form=auth_form).submit(request_for())
    assert job_id.startswith("clp_")


async def test_a_key_form_the_api_refuses_is_campaign_fatal_without_the_key(
    http: aiohttp.ClientSession,
) -> None:
    error, stats = await submit_error(sandbox_config(auth_forms=["raw"]), http, auth_form="base64")
    assert isinstance(error, CampaignFatalError)
    assert (error.code, error.text) == ("AuthorizationError", "user unauthenticated")
    assert stats["created"] == 0


async def test_a_missing_key_is_a_config_error(http: aiohttp.ClientSession) -> None:
    account = account_for("https://api.d-id.com", token=None)
    with pytest.raises(ConfigError, match="did-main__token"):
        DidProvider("did-main", account, http)


async def test_build_video_provider_picks_the_did_adapter(http: aiohttp.ClientSession) -> None:
    provider = build_video_provider("did-main", account_for("https://api.d-id.com"), http)
    assert isinstance(provider, DidProvider)
    assert provider.can_find


async def test_a_clip_is_running_until_done_then_succeeds_with_a_fetchable_link(
    http: aiohttp.ClientSession,
) -> None:
    clock = Clock()
    async with did_emulator(now=clock) as base_url:
        provider = provider_for(base_url, http)
        job_id = await provider.submit(request_for())
        created = await provider.status(job_id)
        clock.now_s += RENDER_S / 2
        started = await provider.status(job_id)
        clock.now_s += RENDER_S
        done = await provider.status(job_id)
        assert done.video_url is not None
        async with http.get(done.video_url) as response:
            video = (response.status, response.content_type)
    assert created == started == VideoStatus(job_id, "running")
    assert (done.state, done.error_code) == ("succeeded", None)
    assert video == (200, "video/mp4")


@pytest.mark.parametrize("kind", ERROR_KINDS)
async def test_a_render_error_fails_with_its_kind_retryable_only_when_unknown(
    http: aiohttp.ClientSession, kind: str
) -> None:
    clock = Clock()
    async with did_emulator(sandbox_config(fail_by_reference={REFERENCE: kind}), clock) as url:
        provider = provider_for(url, http)
        job_id = await provider.submit(request_for())
        clock.now_s += RENDER_S * 2
        status = await provider.status(job_id)
    assert (status.state, status.error_code) == ("failed", kind)
    assert status.error_text, "D-ID's description"
    assert status.retryable == (kind == "UnknownError")


async def test_a_rejected_job_fails_as_rejected_and_is_not_retryable(
    http: aiohttp.ClientSession,
) -> None:
    clock = Clock()
    config = sandbox_config(fail_by_reference={REFERENCE: "rejected"})
    async with did_emulator(config, clock) as base_url:
        provider = provider_for(base_url, http)
        job_id = await provider.submit(request_for())
        clock.now_s += RENDER_S * 2
        status = await provider.status(job_id)
    assert (status.state, status.error_code, status.retryable) == ("failed", "rejected", False)
    assert status.error_text


async def test_a_job_that_never_finishes_stays_running(http: aiohttp.ClientSession) -> None:
    clock = Clock()
    config = sandbox_config(fail_by_reference={REFERENCE: "never_finish"})
    async with did_emulator(config, clock) as base_url:
        provider = provider_for(base_url, http)
        job_id = await provider.submit(request_for())
        clock.now_s += RENDER_S * 100
        status = await provider.status(job_id)
    assert status == VideoStatus(job_id, "running")


async def test_an_unknown_job_is_not_found_not_an_error(http: aiohttp.ClientSession) -> None:
    async with did_emulator() as base_url:
        clip_provider = provider_for(base_url, http)
        talk_id = await provider_for(base_url, http, endpoint="talks", source_url=PHOTO).submit(
            request_for()
        )
        unknown = await clip_provider.status("clp_never-created")
        other_endpoint = await clip_provider.status(talk_id)
    assert unknown == VideoStatus("clp_never-created", "not_found")
    assert other_endpoint.state == "not_found"


def test_done_without_a_result_url_is_a_failed_render() -> None:
    status = read_job("clp_1", {"id": "clp_1", "status": "done"}, SECRETS)
    assert (status.state, status.error_code) == ("failed", "missing_result_url")


def test_an_error_without_a_kind_fails_without_retry_and_hides_the_key() -> None:
    job = {"status": "error", "error": {"description": f"bad key {KEY} / {ENCODED_KEY}"}}
    status = read_job("clp_1", job, SECRETS)
    assert (status.state, status.error_code, status.retryable) == ("failed", "error", False)
    assert status.error_text == "bad key [token] / [token]"


def test_a_status_d_id_never_documented_reads_as_running() -> None:
    assert read_job("clp_1", {"status": "queued_v2"}, SECRETS) == VideoStatus("clp_1", "running")


@pytest.mark.parametrize(
    ("knobs", "error_class", "code"),
    [
        ({"credits": 0}, CampaignFatalError, "InsufficientCreditsError"),
        ({"forbidden": True}, CampaignFatalError, "PermissionDeniedError"),
        ({"presenter_ids": ["someone-else"]}, PermanentError, "BadRequestError"),
        ({"transient_p": 1.0}, TransientError, "http_500"),
    ],
    ids=["402-credits", "403-forbidden", "400-bad-request", "500-before-create"],
)
async def test_a_refused_create_is_classified_by_status_with_the_kind_as_code(
    http: aiohttp.ClientSession, knobs: dict[str, Any], error_class: type, code: str
) -> None:
    error, stats = await submit_error(sandbox_config(**knobs), http)
    assert type(error) is error_class
    assert error.code == code
    assert stats["created"] == 0


async def test_a_submit_to_a_missing_endpoint_is_permanent(http: aiohttp.ClientSession) -> None:
    async with did_emulator() as base_url:
        with pytest.raises(PermanentError) as caught:
            await provider_for(base_url + "/v9", http).submit(request_for())
    assert caught.value.code == "http_404"


@pytest.mark.parametrize(
    ("retry_after_s", "expected_s"),
    [(7, 7.0), (1.5, 1.5), (100_000, MAX_RETRY_AFTER_S), (None, None)],
    ids=["seconds", "fraction", "capped", "absent"],
)
async def test_429_throttles_submit_and_status_with_retry_after(
    http: aiohttp.ClientSession, retry_after_s: float | None, expected_s: float | None
) -> None:
    async with did_emulator() as base_url:
        provider = provider_for(base_url, http)
        job_id = await provider.submit(request_for())
        await set_knobs(http, base_url, throttled_p=1.0, retry_after_s=retry_after_s)
        with pytest.raises(ThrottledError) as on_submit:
            await provider.submit(request_for("cmp42-r9002"))
        with pytest.raises(ThrottledError) as on_status:
            await provider.status(job_id)
    for caught in (on_submit, on_status):
        assert caught.value.code == "TooManyRequestsError"
        assert caught.value.retry_after_s == expected_s


async def test_a_5xx_after_create_is_transient_and_find_recovers_the_job(
    http: aiohttp.ClientSession,
) -> None:
    async with did_emulator(sandbox_config(create_5xx_after_create_p=1.0)) as base_url:
        provider = provider_for(base_url, http)
        with pytest.raises(TransientError) as caught:
            await provider.submit(request_for())
        found = await provider.find(REFERENCE)
        [job] = await sandbox_json(http, base_url, "jobs")
    assert caught.value.code == "http_500"
    assert found == job["id"]


async def test_5xx_on_status_is_transient(http: aiohttp.ClientSession) -> None:
    async with did_emulator() as base_url:
        provider = provider_for(base_url, http)
        job_id = await provider.submit(request_for())
        await set_knobs(http, base_url, transient_p=1.0)
        with pytest.raises(TransientError) as caught:
            await provider.status(job_id)
    assert caught.value.code == "http_500"


async def test_an_unreadable_2xx_on_submit_is_an_uncertain_outcome(
    http: aiohttp.ClientSession,
) -> None:
    error, stats = await submit_error(sandbox_config(malformed_body_p=1.0), http)
    assert isinstance(error, UncertainOutcomeError)
    assert error.code == "http_201"
    assert stats["created"] == 1, "the job exists: it must not be submitted again blindly"


async def test_a_slow_answer_to_a_submission_leaves_it_in_doubt(
    http: aiohttp.ClientSession,
) -> None:
    """The talk may have been created: the runner looks it up before submitting again."""
    error, _ = await submit_error(sandbox_config(latency_ms=2000), http, request_timeout_s=0.05)
    assert isinstance(error, UncertainOutcomeError)
    assert (error.code, error.text) == ("timeout", "no answer from D-ID within 0.05 s")


async def test_a_refused_connection_is_transient(http: aiohttp.ClientSession) -> None:
    provider = provider_for(f"http://127.0.0.1:{free_port()}/did", http)
    with pytest.raises(TransientError) as caught:
        await provider.status("clp_1")
    assert caught.value.code == "network"
    assert KEY not in caught.value.text


@pytest.mark.parametrize(
    ("status", "body", "error_class", "code"),
    [
        (400, {"kind": "DriverNotValidError"}, PermanentError, "DriverNotValidError"),
        (451, {"kind": "ModerationError"}, PermanentError, "ModerationError"),
        (404, {"kind": "NotFoundError"}, PermanentError, "NotFoundError"),
        (409, {}, TransientError, "http_409"),
        (401, {"message": "Unauthorized"}, CampaignFatalError, "http_401"),
        (502, {}, TransientError, "http_502"),
    ],
)
def test_refusals_without_an_emulator_knob_are_classified_by_status(
    status: int, body: dict[str, str], error_class: type, code: str
) -> None:
    error = refusal_error(Answer(status, orjson.dumps(body), None), SECRETS)
    assert (type(error), error.code) == (error_class, code)


def test_a_refusal_quoting_the_key_keeps_it_out_of_the_text() -> None:
    body = {"kind": "AuthorizationError", "description": f"bad key {KEY} ({ENCODED_KEY})"}
    error = refusal_error(Answer(401, orjson.dumps(body), None), SECRETS)
    assert error.text == "bad key [token] ([token])"


async def test_find_matches_user_data_or_name_among_the_listed_jobs(
    http: aiohttp.ClientSession,
) -> None:
    async with did_emulator() as base_url:
        provider = provider_for(base_url, http)
        ids = [await provider.submit(request_for(f"cmp42-r{n}")) for n in range(3)]
        named_only = {"presenter_id": PRESENTER, "script": {"input": "Halo"}, "name": "by-name"}
        async with http.post(base_url + "/clips", json=named_only, headers=AUTH) as response:
            by_name_id = (await response.json())["id"]
        found = [await provider.find(f"cmp42-r{n}") for n in range(3)]
        found_by_name = await provider.find("by-name")
        missing = await provider.find("cmp42-r404")
    assert found == ids
    assert found_by_name == by_name_id
    assert missing is None


async def test_find_reads_one_page_of_find_list_limit_jobs(http: aiohttp.ClientSession) -> None:
    async with did_emulator() as base_url:
        provider = provider_for(base_url, http, find_list_limit=2)
        oldest, *_ = [await provider.submit(request_for(f"cmp42-r{n}")) for n in range(3)]
        newest = await provider.find("cmp42-r2")
        beyond_the_page = await provider.find("cmp42-r0")
    assert oldest.startswith("clp_")
    assert newest is not None
    assert beyond_the_page is None


async def test_the_webhook_names_the_submitted_job(
    http: aiohttp.ClientSession, webhook_sink: tuple[str, list[Any]]
) -> None:
    sink_url, bodies = webhook_sink
    config = sandbox_config(render_median_s=1.0, render_min_s=0.0, time_compression=100.0)
    async with did_emulator(config) as base_url:
        provider = provider_for(base_url, http)
        job_id = await provider.submit(request_for(webhook_url=sink_url))
        await wait_until(lambda: bodies, timeout_s=10, interval_s=0.01)
    [body] = bodies
    assert provider.webhook_job_id(body) == job_id
    assert read_job(job_id, body, SECRETS).state == "succeeded"


@pytest.mark.parametrize("payload", [{}, {"id": 42}, {"id": ""}, {"job": {"id": "clp_1"}}])
async def test_a_webhook_without_a_string_id_names_no_job(
    http: aiohttp.ClientSession, payload: dict[str, Any]
) -> None:
    assert provider_for("https://api.d-id.com", http).webhook_job_id(payload) is None
