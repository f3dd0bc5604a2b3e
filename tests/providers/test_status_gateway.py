"""The status gateway adapter against the status sandbox over real loopback HTTP: both request
shapes, the three statuses, resends by id, and the classification of every answer."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from blastd.config import StatusGatewayAccount
from blastd.errors import (
    BatchTooLargeError,
    CampaignFatalError,
    PermanentError,
    ProviderError,
    ThrottledError,
    TransientError,
    UncertainOutcomeError,
)
from blastd.providers.base import OutboundMessage, TextBody
from blastd.providers.status_gateway import (
    StatusContent,
    StatusGatewayProvider,
    jid_of,
)
from tests.harness import status_emulator

TOKEN = "sandbox-token"
JIDS = [jid_of("+6281200000001"), jid_of("+6281200000002")]
TEXT = StatusContent("text", text="Promo!", background_color="#315575", font=2)
IMAGE = StatusContent("image", url="https://cdn.example.com/p.jpg", caption="Baru")
VIDEO = StatusContent("video", url="https://cdn.example.com/v.mp4")


def provider_for(url: str, http: aiohttp.ClientSession, **fields: Any) -> StatusGatewayProvider:
    account = StatusGatewayAccount.model_validate(
        {"kind": "status_gateway", "base_url": url, "token": TOKEN, "instance": "sandbox", **fields}
    )
    return StatusGatewayProvider("test", account, http)


async def sandbox_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        return await response.json()


async def refusal(http: aiohttp.ClientSession, knobs: dict[str, Any], **fields: Any) -> Exception:
    """The error one text status raises against a sandbox with `knobs`."""
    async with status_emulator(**knobs) as url:
        with pytest.raises(ProviderError) as caught:
            await provider_for(url, http, **fields).post_status(TEXT, JIDS, None)
    return caught.value


def test_a_jid_is_the_number_without_its_plus() -> None:
    assert jid_of("+6281234567890") == "6281234567890@s.whatsapp.net"


@pytest.mark.parametrize("flavour", ["evolution", "story"])
@pytest.mark.parametrize("content", [TEXT, IMAGE, VIDEO], ids=["text", "image", "video"])
async def test_a_status_is_posted_then_resent_under_its_id(
    http: aiohttp.ClientSession, flavour: str, content: StatusContent
) -> None:
    auth_style = "apikey" if flavour == "evolution" else "x_api_key"
    async with status_emulator() as url:
        provider = provider_for(url, http, flavour=flavour, auth_style=auth_style)
        message_id = await provider.post_status(content, JIDS[:1], None)
        resent_id = await provider.post_status(content, JIDS[1:], message_id)
        statuses = await sandbox_json(http, url + "/_sandbox/statuses")
    assert message_id.startswith("3EB0")
    assert resent_id == message_id
    assert statuses == {message_id: {"contacts": 2, "deliveries": 2}}


async def test_the_message_id_field_is_a_setting(http: aiohttp.ClientSession) -> None:
    async with status_emulator(message_id_field="id") as url:
        provider = provider_for(url, http, message_id_field="id")
        message_id = await provider.post_status(TEXT, JIDS[:1], None)
        assert await provider.post_status(TEXT, JIDS[1:], message_id) == message_id


async def test_a_gateway_that_ignores_the_id_answers_with_a_new_one(
    http: aiohttp.ClientSession,
) -> None:
    async with status_emulator(honour_message_id=False) as url:
        provider = provider_for(url, http)
        message_id = await provider.post_status(TEXT, JIDS[:1], None)
        assert await provider.post_status(TEXT, JIDS[1:], message_id) != message_id


async def test_an_answer_without_an_id_is_uncertain_for_an_anchor_and_accepted_for_a_resend(
    http: aiohttp.ClientSession,
) -> None:
    async with status_emulator() as url:
        provider = provider_for(url, http, message_id_path="key.nothing")
        with pytest.raises(UncertainOutcomeError):
            await provider.post_status(TEXT, JIDS[:1], None)
        assert await provider.post_status(TEXT, JIDS[1:], "3EB0ABC") == "3EB0ABC"


@pytest.mark.parametrize(
    ("knobs", "fields", "error_type", "code"),
    [
        ({"fail_requests": {"1": 503}}, {}, TransientError, "http_503"),
        ({"fail_requests": {"1": 429}, "retry_after_s": 7}, {}, ThrottledError, "http_429"),
        ({"max_batch_size": 1}, {}, BatchTooLargeError, "http_413"),
        ({"max_batch_size": 1, "too_large_status": 500}, {}, BatchTooLargeError, "http_500"),
        ({"tokens": ["other"]}, {}, CampaignFatalError, "http_401"),
        ({}, {"instance": "missing"}, CampaignFatalError, "http_404"),
        ({"session_connected": False}, {}, CampaignFatalError, "session"),
        ({"latency_ms": 500}, {"request_timeout_s": 0.05}, UncertainOutcomeError, "timeout"),
    ],
    ids=["5xx", "429", "413", "frame-too-large-500", "401", "404", "session", "timeout"],
)
async def test_answers_are_classified(
    http: aiohttp.ClientSession,
    knobs: dict[str, Any],
    fields: dict[str, Any],
    error_type: type[ProviderError],
    code: str,
) -> None:
    error = await refusal(http, knobs, **fields)
    assert type(error) is error_type
    assert isinstance(error, ProviderError)
    assert error.code == code
    if isinstance(error, ThrottledError):
        assert error.retry_after_s == 7
    assert TOKEN not in error.text


async def test_a_refused_request_is_permanent(http: aiohttp.ClientSession) -> None:
    bad_font = StatusContent("text", text="Promo!", font=9)
    async with status_emulator() as url:
        with pytest.raises(PermanentError) as caught:
            await provider_for(url, http).post_status(bad_font, JIDS, None)
    assert caught.value.code == "http_400"
    assert "font" in caught.value.text


async def test_a_connection_refused_is_transient(http: aiohttp.ClientSession) -> None:
    async with status_emulator() as url:
        pass  # closed again: nothing listens on the port any more
    with pytest.raises(TransientError) as caught:
        await provider_for(url, http).post_status(TEXT, JIDS, None)
    assert caught.value.code == "network"


async def test_a_blast_through_a_status_account_stops_its_campaign(
    http: aiohttp.ClientSession,
) -> None:
    provider = provider_for("http://127.0.0.1:9", http)
    with pytest.raises(CampaignFatalError):
        await provider.send_batch([OutboundMessage(1, "+6281200000001", TextBody("x"))])
