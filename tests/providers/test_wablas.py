"""The Wablas adapter against the Wablas sandbox over loopback: requests, mapping, every class."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from blastd.config import WablasAccount
from blastd.embedded import free_port
from blastd.errors import (
    CampaignFatalError,
    PermanentError,
    ProviderError,
    QualityError,
    ThrottledError,
    TransientError,
    UncertainOutcomeError,
)
from blastd.providers.base import (
    OutboundMessage,
    SendReceipt,
    SendResult,
    TemplateBody,
    TextBody,
    VideoBody,
)
from blastd.providers.registry import build_provider
from blastd.providers.wablas import (
    TrackingUpdate,
    WablasProvider,
    classify_refusal,
    parse_incoming_messages,
    parse_tracking_webhook,
)
from tests.harness import TOKEN, SandboxHandle, digits

NUMBERS = ("+6281200000001", "+6281200000002", "+6281200000003")
LINK = "https://cdn.example.com/v/123.mp4"


def account(base_url: str, **fields: Any) -> WablasAccount:
    return WablasAccount.model_validate(
        {"kind": "wablas", "base_url": base_url, "token": TOKEN, **fields}
    )


def provider(base_url: str, http: aiohttp.ClientSession, **fields: Any) -> WablasProvider:
    return WablasProvider("wablas-test", account(base_url, **fields), http)


def texts(numbers: tuple[str, ...] = NUMBERS) -> list[OutboundMessage]:
    return [OutboundMessage(i, n, TextBody(f"Halo {i}")) for i, n in enumerate(numbers)]


def videos(numbers: tuple[str, ...] = NUMBERS) -> list[OutboundMessage]:
    return [OutboundMessage(i, n, VideoBody(LINK, f"Video {i}")) for i, n in enumerate(numbers)]


def ids_of(results: list[SendResult]) -> list[str]:
    assert all(isinstance(r, SendReceipt) for r in results), results
    return [r.provider_message_id for r in results if isinstance(r, SendReceipt)]


async def send_error(wablas_provider: WablasProvider, messages: list[OutboundMessage]) -> Any:
    with pytest.raises(ProviderError) as caught:
        await wablas_provider.send_batch(messages)
    return caught.value


async def test_build_provider_dispatches_a_wablas_account(http: aiohttp.ClientSession) -> None:
    assert isinstance(build_provider("w", account("http://x"), http), WablasProvider)


async def test_bulk_text_goes_in_one_v2_request_with_one_receipt_per_message(
    wablas: SandboxHandle, http: aiohttp.ClientSession
) -> None:
    results = await provider(wablas.url, http).send_batch(texts())
    ids = ids_of(results)
    assert len(set(ids)) == 3
    stats = await wablas.stats()
    assert (stats["requests"], stats["batch_sizes"]) == (1, {"3": 1})
    assert await wablas.recipients() == {digits(n): 1 for n in NUMBERS}


async def test_batch_size_one_uses_the_single_send_endpoint(
    wablas: SandboxHandle, http: aiohttp.ClientSession
) -> None:
    """The single endpoint takes the item's fields at the top level: a v2 body would fail."""
    single = provider(wablas.url, http, batch_size=1)
    for message in texts():
        ids_of(await single.send_batch([message]))
    stats = await wablas.stats()
    assert (stats["requests"], stats["batch_sizes"]) == (3, {"1": 3})


@pytest.mark.parametrize("batch_size", [1, 100])
async def test_video_messages_carry_their_link_to_the_video_endpoints(
    wablas: SandboxHandle, http: aiohttp.ClientSession, batch_size: int
) -> None:
    """The sandbox refuses an unreachable video URL: proof the link arrived as `video`."""
    sender = provider(wablas.url, http, batch_size=batch_size)
    batch = videos()[:batch_size]
    assert len(ids_of(await sender.send_batch(batch))) == len(batch)
    await wablas.configure(unreachable_media=[LINK])
    error = await send_error(sender, batch)
    assert (type(error), error.code) == (PermanentError, "media_refused")
    assert "download" in error.text


async def test_oversized_video_is_refused_for_the_request(
    wablas: SandboxHandle, http: aiohttp.ClientSession
) -> None:
    await wablas.configure(media_bytes={LINK: 3 * 1024 * 1024})
    error = await send_error(provider(wablas.url, http), videos())
    assert (type(error), error.code) == (PermanentError, "media_refused")


async def test_template_messages_are_refused_without_a_request(
    wablas: SandboxHandle, http: aiohttp.ClientSession
) -> None:
    template = OutboundMessage(9, NUMBERS[0], TemplateBody("promo_nov", "id", ("Budi",)))
    [result] = await provider(wablas.url, http).send_batch([template])
    assert isinstance(result, PermanentError)
    assert (result.code, result.text) == (
        "template_unsupported",
        "template messages need a cloud_api account",
    )
    assert (await wablas.stats())["requests"] == 0


@pytest.mark.parametrize(
    "knobs", [{"reverse_items": True}, {"item_array": "message"}], ids=["reordered", "singular"]
)
async def test_items_are_matched_to_messages_by_phone(
    wablas: SandboxHandle, http: aiohttp.ClientSession, knobs: dict[str, Any]
) -> None:
    """A failure configured for the middle number lands on the middle message, whatever the
    order or the name of the answer's array."""
    await wablas.configure(fail_numbers={digits(NUMBERS[1]): "rejected"}, **knobs)
    results = await provider(wablas.url, http).send_batch(texts())
    assert [type(r) for r in results] == [SendReceipt, PermanentError, SendReceipt]
    failed = results[1]
    assert isinstance(failed, PermanentError)
    assert (failed.code, failed.text) == ("item_rejected", "failure configured for this recipient")


@pytest.mark.parametrize("status", ["failed", "cancel", "reject"])
async def test_refused_item_statuses_fail_only_their_message(
    wablas: SandboxHandle, http: aiohttp.ClientSession, status: str
) -> None:
    await wablas.configure(fail_numbers={digits(NUMBERS[2]): status})
    results = await provider(wablas.url, http).send_batch(texts())
    assert [type(r) for r in results] == [SendReceipt, SendReceipt, PermanentError]
    assert isinstance(results[2], PermanentError)
    assert results[2].code == f"item_{status}"


async def test_a_message_missing_from_the_answer_is_uncertain(
    wablas: SandboxHandle, http: aiohttp.ClientSession
) -> None:
    await wablas.configure(omit_numbers=[digits(NUMBERS[0])])
    results = await provider(wablas.url, http).send_batch(texts())
    assert [type(r) for r in results] == [UncertainOutcomeError, SendReceipt, SendReceipt]


@pytest.mark.parametrize(
    ("sandbox_auth", "fields", "is_accepted"),
    [
        ("token", {}, True),
        ("token_secret", {"secret_key": "sandbox-secret"}, True),
        ("either", {"secret_key": "sandbox-secret"}, True),
        ("token_secret", {}, False),
        ("token", {"secret_key": "sandbox-secret"}, False),
        ("either", {"secret_key": "wrong-secret"}, False),
    ],
)
async def test_authorization_is_the_token_or_token_dot_secret(
    wablas: SandboxHandle,
    http: aiohttp.ClientSession,
    sandbox_auth: str,
    fields: dict[str, str],
    is_accepted: bool,
) -> None:
    await wablas.configure(auth=sandbox_auth)
    sender = provider(wablas.url, http, **fields)
    if is_accepted:
        ids_of(await sender.send_batch(texts()))
        return
    error = await send_error(sender, texts())
    assert (type(error), error.code) == (CampaignFatalError, "credentials")
    assert "sandbox-secret" not in error.text
    assert TOKEN not in error.text


async def test_http_401_without_a_readable_reason_is_campaign_fatal(
    wablas: SandboxHandle, http: aiohttp.ClientSession
) -> None:
    await wablas.configure(auth_failure="http_401")
    error = await send_error(provider(wablas.url, http, token="revoked-token"), texts())
    assert isinstance(error, CampaignFatalError)


@pytest.mark.parametrize(
    ("knobs", "error_class", "code"),
    [
        ({"transient_p": 1.0}, TransientError, "http_500"),
        ({"fail_numbers_http": {digits(NUMBERS[0]): 503}}, TransientError, "http_503"),
        ({"token_error_p": 1.0}, CampaignFatalError, "credentials"),
        ({"quota_error_p": 1.0}, CampaignFatalError, "billing"),
        ({"quota": 2}, CampaignFatalError, "billing"),
        ({"device_error_p": 1.0}, QualityError, "device_disconnected"),
        ({"device_connected": False}, QualityError, "device_disconnected"),
        ({"malformed_body_p": 1.0}, UncertainOutcomeError, "http_200"),
    ],
)
async def test_refused_requests_raise_the_class_their_answer_means(
    wablas: SandboxHandle,
    http: aiohttp.ClientSession,
    knobs: dict[str, Any],
    error_class: type[ProviderError],
    code: str,
) -> None:
    await wablas.configure(**knobs)
    error = await send_error(provider(wablas.url, http), texts())
    assert (type(error), error.code) == (error_class, code)
    assert error.text


async def test_throttling_carries_retry_after(
    wablas: SandboxHandle, http: aiohttp.ClientSession
) -> None:
    await wablas.configure(throttled_p=1.0, retry_after_s=7)
    error = await send_error(provider(wablas.url, http), texts())
    assert isinstance(error, ThrottledError)
    assert (error.code, error.retry_after_s) == ("http_429", 7.0)


async def test_a_batch_over_the_limit_is_campaign_fatal_and_names_the_setting(
    wablas: SandboxHandle, http: aiohttp.ClientSession
) -> None:
    await wablas.configure(max_batch=2)
    error = await send_error(provider(wablas.url, http, batch_size=3), texts())
    assert (type(error), error.code) == (CampaignFatalError, "batch_too_large")
    assert "BLASTD_ACCOUNTS__wablas-test__batch_size" in error.text
    assert (await wablas.stats())["accepted"] == 0


async def test_an_answer_after_the_timeout_leaves_the_batch_in_doubt(
    wablas: SandboxHandle, http: aiohttp.ClientSession
) -> None:
    """The sandbox accepted the batch before its latency: the timeout hides a success."""
    await wablas.configure(latency_ms=2000)
    error = await send_error(provider(wablas.url, http, request_timeout_s=0.1), texts())
    assert (type(error), error.code) == (UncertainOutcomeError, "timeout")
    assert (await wablas.stats())["accepted"] == 3


async def test_nobody_listening_is_transient(http: aiohttp.ClientSession) -> None:
    error = await send_error(provider(f"http://127.0.0.1:{free_port()}", http), texts())
    assert (type(error), error.code) == (TransientError, "network")


async def test_request_flags_go_per_item_or_beside_data(
    wablas: SandboxHandle, http: aiohttp.ClientSession
) -> None:
    """The sandbox accepts both placements; the adapter puts them where the account says."""
    flags = {"request_flags": {"retry": False, "priority": True}}
    for placement in (False, True):
        sender = provider(wablas.url, http, flags_at_top_level=placement, **flags)
        ids_of(await sender.send_batch(texts()))
    assert (await wablas.stats())["accepted"] == 6


def test_refusals_are_classified_by_the_accounts_keywords() -> None:
    custom = account("http://x", device_keywords=("perangkat terputus",))
    assert isinstance(classify_refusal("Perangkat terputus", custom, None), QualityError)
    unknown = classify_refusal("something new", account("http://x"), None)
    assert (type(unknown), unknown.code) == (QualityError, "status_false")
    number = classify_refusal("phone number not registered", account("http://x"), None)
    assert (type(number), number.code) == (PermanentError, "invalid_number")


STATES = account("http://x").tracking_states


@pytest.mark.parametrize(
    "body",
    [
        orjson.dumps({"id": "m1", "phone": "6281", "status": "read"}),
        orjson.dumps([{"message_id": "m1", "status": "read"}, {"id": "m2", "status": "pending"}]),
        b"messageId=m1&status=read&phone=6281",
    ],
    ids=["object", "array", "form"],
)
def test_tracking_webhook_bodies_of_every_shape_are_read(body: bytes) -> None:
    assert parse_tracking_webhook(body, STATES) == [TrackingUpdate("m1", "read")]


def test_tracking_failures_carry_the_status_and_reason() -> None:
    body = orjson.dumps({"id": "m1", "status": "cancel", "note": "number blocked"})
    assert parse_tracking_webhook(body, STATES) == [
        TrackingUpdate("m1", "failed", "tracking_cancel", "number blocked")
    ]


def test_a_tracking_body_that_is_not_json_nor_a_form_is_refused() -> None:
    with pytest.raises(ValueError, match="tracking body"):
        parse_tracking_webhook(b"{not json", STATES)


INCOMING = {"id": "in-1", "phone": "6281234567890", "message": "STOP", "isGroup": False}


@pytest.mark.parametrize(
    "body",
    [
        orjson.dumps(INCOMING),
        orjson.dumps([INCOMING]),
        b"id=in-1&phone=6281234567890&message=STOP&isGroup=False",
    ],
    ids=["object", "array", "form"],
)
def test_incoming_messages_of_every_body_shape_are_read(body: bytes) -> None:
    assert parse_incoming_messages(body) == [("+6281234567890", "STOP")]
    assert parse_tracking_webhook(body, STATES) == []


@pytest.mark.parametrize(
    "entry",
    [
        {**INCOMING, "status": "read"},
        {**INCOMING, "isGroup": "true"},
        {**INCOMING, "phone": ""},
        {key: value for key, value in INCOMING.items() if key != "message"},
    ],
    ids=["tracking-status", "group", "no-number", "no-text"],
)
def test_statuses_groups_and_incomplete_entries_are_not_messages(entry: dict[str, Any]) -> None:
    assert parse_incoming_messages(orjson.dumps(entry)) == []


def test_a_body_that_is_neither_json_nor_a_form_gives_no_message() -> None:
    assert parse_incoming_messages(b"{not json") == []
