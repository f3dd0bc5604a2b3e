"""The Cloud API adapter against the sandbox over real loopback HTTP, and its webhook helpers."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from pydantic import SecretStr

from blastd.config import CloudApiAccount
from blastd.errors import (
    CampaignFatalError,
    ConfigurationError,
    MarketingCapError,
    OptedOutError,
    PairLimitError,
    PermanentError,
    ProviderError,
    QualityError,
    ThrottledError,
    TransientError,
    UncertainOutcomeError,
)
from blastd.providers.answers import parse_retry_after_s
from blastd.providers.base import (
    OutboundMessage,
    StatusUpdate,
    TemplateBody,
    TextBody,
    VideoBody,
)
from blastd.providers.cloud_api import (
    CloudApiProvider,
    answer_verification,
    build_request_body,
    is_valid_signature,
    parse_status_webhook,
)
from blastd.sandbox.cloud_api import SandboxConfig
from tests.harness import cloud_api_emulator, sandbox_json, serving

TOKEN = "sandbox-token"
APP_SECRET = "test-app-secret"
NUMBER = "+6281200000001"
DIGITS = NUMBER.removeprefix("+")
VIDEO_LINK = "https://cdn.example.com/v/123.mp4"


def provider_for(
    base_url: str, http: aiohttp.ClientSession, token: str = TOKEN, **account: Any
) -> CloudApiProvider:
    settings = CloudApiAccount(
        kind="cloud_api",
        base_url=base_url,
        phone_number_id="100000000000001",
        token=SecretStr(token),
        **account,
    )
    return CloudApiProvider("test", settings, http)


def text_to(to: str = NUMBER, ledger_id: int = 1) -> OutboundMessage:
    return OutboundMessage(ledger_id=ledger_id, to=to, body=TextBody("Halo Budi"))


async def send_one(config: SandboxConfig, http: aiohttp.ClientSession) -> ProviderError:
    """Send one text through a sandbox with `config` and return the error it raised."""
    async with cloud_api_emulator(config) as base_url:
        with pytest.raises(ProviderError) as caught:
            await provider_for(base_url, http).send(text_to())
    return caught.value


async def test_text_is_sent_to_digits_only_and_returns_the_wamid(
    http: aiohttp.ClientSession,
) -> None:
    async with cloud_api_emulator() as base_url:
        receipt = await provider_for(base_url, http).send(text_to())
        recipients = await sandbox_json(http, base_url, "recipients")
    assert receipt.provider_message_id.startswith("wamid.")
    assert recipients == {DIGITS: 1}


@pytest.mark.parametrize(
    "body",
    [
        TemplateBody("promo_nov", "id", ("Budi", "X1")),
        TemplateBody("promo_nov", "id", ("Budi", "X1"), header_video_link=VIDEO_LINK),
        TemplateBody("hello_world", "en_US"),
        VideoBody(VIDEO_LINK, caption="Your video is ready"),
        VideoBody(VIDEO_LINK),
    ],
    ids=[
        "template",
        "template-with-video-header",
        "template-without-params",
        "video",
        "bare-video",
    ],
)
async def test_template_and_video_bodies_are_accepted(
    http: aiohttp.ClientSession, body: TemplateBody | VideoBody
) -> None:
    async with cloud_api_emulator() as base_url:
        receipt = await provider_for(base_url, http).send(OutboundMessage(7, NUMBER, body))
    assert receipt.provider_message_id.startswith("wamid.")


def test_template_request_carries_header_video_body_params_and_ledger_id() -> None:
    body = TemplateBody("promo_nov", "id", ("Budi", "X1"), header_video_link=VIDEO_LINK)
    request = build_request_body(OutboundMessage(42, NUMBER, body))
    assert request == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": DIGITS,
        "biz_opaque_callback_data": "blastd:42",
        "type": "template",
        "template": {
            "name": "promo_nov",
            "language": {"code": "id"},
            "components": [
                {
                    "type": "header",
                    "parameters": [{"type": "video", "video": {"link": VIDEO_LINK}}],
                },
                {
                    "type": "body",
                    "parameters": [
                        {"type": "text", "text": "Budi"},
                        {"type": "text", "text": "X1"},
                    ],
                },
            ],
        },
    }


@pytest.mark.parametrize(
    ("body", "error_class", "code"),
    [
        (TemplateBody("promo_nov", "id", ("only one",)), PermanentError, "132000"),
        (TemplateBody("no_such_template", "id"), CampaignFatalError, "132001"),
    ],
    ids=["wrong-param-count", "unknown-template"],
)
async def test_template_problems_found_by_the_sandbox_are_classified(
    http: aiohttp.ClientSession, body: TemplateBody, error_class: type[ProviderError], code: str
) -> None:
    async with cloud_api_emulator() as base_url:
        with pytest.raises(error_class) as caught:
            await provider_for(base_url, http).send(OutboundMessage(1, NUMBER, body))
    assert caught.value.code == code


GRAPH_CODE_CLASSES: list[tuple[int, type[ProviderError]]] = [
    *[(code, TransientError) for code in (1, 2, 131000, 131016, 131053)],
    *[(code, ThrottledError) for code in (4, 80007, 130429)],
    (131056, PairLimitError),
    (131050, OptedOutError),
    (131049, MarketingCapError),
    *[(code, QualityError) for code in (131048, 368, 132015)],
    *[
        (code, PermanentError)
        for code in (100, 130472, 131008, 131009, 131026, 131047, 131051, 132000)
    ],
    *[
        (code, CampaignFatalError)
        for code in (0, 3, 10, 190, 200, 299, 131031, 131042, 132001, 132016)
    ],
    (999_999, PermanentError),  # unknown code on a 400
]


@pytest.mark.parametrize(("graph_code", "error_class"), GRAPH_CODE_CLASSES)
async def test_graph_error_code_decides_the_error_class(
    http: aiohttp.ClientSession, graph_code: int, error_class: type[ProviderError]
) -> None:
    error = await send_one(SandboxConfig(fail_numbers={DIGITS: graph_code}), http)
    assert type(error) is error_class
    assert error.code == str(graph_code)
    assert error.text == "failure configured for this recipient"


@pytest.mark.parametrize(
    ("http_status", "error_class"),
    [
        (500, TransientError),
        (502, TransientError),
        (503, TransientError),
        (429, ThrottledError),
        (401, CampaignFatalError),
        (402, CampaignFatalError),
        (400, ConfigurationError),  # not Graph at all: the base URL or path is wrong
        (404, ConfigurationError),
        (405, PermanentError),
    ],
)
async def test_http_status_decides_when_the_body_is_not_a_graph_error(
    http: aiohttp.ClientSession, http_status: int, error_class: type[ProviderError]
) -> None:
    error = await send_one(SandboxConfig(fail_numbers_http={DIGITS: http_status}), http)
    assert type(error) is error_class
    assert error.code == f"http_{http_status}"


@pytest.mark.parametrize(
    ("knob", "error_class", "code"),
    [
        ("transient_p", TransientError, "131000"),
        ("throttled_p", ThrottledError, "130429"),
        ("pair_limit_p", PairLimitError, "131056"),
        ("quality_p", QualityError, "131048"),
        ("permanent_p", PermanentError, "131026"),
        ("fatal_p", CampaignFatalError, "190"),
    ],
)
async def test_injected_faults_reach_the_adapter_as_their_class(
    http: aiohttp.ClientSession, knob: str, error_class: type[ProviderError], code: str
) -> None:
    error = await send_one(SandboxConfig.model_validate({knob: 1.0}), http)
    assert type(error) is error_class
    assert error.code == code


async def test_throttled_error_carries_the_retry_after_header(
    http: aiohttp.ClientSession,
) -> None:
    error = await send_one(SandboxConfig(throttled_p=1.0, retry_after_s=7), http)
    assert isinstance(error, ThrottledError)
    assert error.retry_after_s == 7.0


async def test_throttled_error_without_retry_after_leaves_the_wait_to_us(
    http: aiohttp.ClientSession,
) -> None:
    error = await send_one(SandboxConfig(throttled_p=1.0), http)
    assert isinstance(error, ThrottledError)
    assert error.retry_after_s is None


async def test_sandbox_rate_limit_reaches_the_adapter_as_throttled(
    http: aiohttp.ClientSession,
) -> None:
    """Rate 1/s: of three sends in a row at most one fits the window, whatever the clock."""
    async with cloud_api_emulator(SandboxConfig(rate_per_s=1)) as base_url:
        provider = provider_for(base_url, http)
        outcomes = await asyncio.gather(
            *(provider.send(text_to(f"+62812000000{i}")) for i in range(3)),
            return_exceptions=True,
        )
    throttled = [o for o in outcomes if isinstance(o, ThrottledError)]
    assert throttled
    assert {error.code for error in throttled} == {"130429"}


async def test_pair_limit_reaches_the_adapter_for_that_recipient_only(
    http: aiohttp.ClientSession,
) -> None:
    config = SandboxConfig(pair_limit=True, pair_burst=1)
    async with cloud_api_emulator(config) as base_url:
        provider = provider_for(base_url, http)
        await provider.send(text_to())
        with pytest.raises(PairLimitError) as caught:
            await provider.send(text_to())
        other = await provider.send(text_to("+6281299999999"))
    assert caught.value.code == "131056"
    assert other.provider_message_id.startswith("wamid.")


async def test_sending_twice_shows_as_a_duplicate_in_sandbox_stats(
    http: aiohttp.ClientSession,
) -> None:
    async with cloud_api_emulator() as base_url:
        provider = provider_for(base_url, http)
        await provider.send(text_to())
        await provider.send(text_to())
        stats = await sandbox_json(http, base_url, "stats")
    assert stats["duplicates"] == {DIGITS: 2}


async def test_unreadable_2xx_is_uncertain_and_counted_as_accepted(
    http: aiohttp.ClientSession,
) -> None:
    """The sandbox rotates a cut-off body and a body without messages[0].id."""
    async with cloud_api_emulator(SandboxConfig(malformed_body_p=1.0)) as base_url:
        provider = provider_for(base_url, http)
        errors = []
        for _ in range(2):
            with pytest.raises(UncertainOutcomeError) as caught:
                await provider.send(text_to())
            errors.append(caught.value)
        stats = await sandbox_json(http, base_url, "stats")
    assert [error.code for error in errors] == ["http_200", "http_200"]
    assert stats["accepted"] == 2


async def test_wrong_token_is_campaign_fatal(http: aiohttp.ClientSession) -> None:
    async with cloud_api_emulator() as base_url:
        with pytest.raises(CampaignFatalError) as caught:
            await provider_for(base_url, http, token="expired-token").send(text_to())
    assert caught.value.code == "190"


async def test_request_timeout_leaves_the_message_in_doubt(http: aiohttp.ClientSession) -> None:
    """The sandbox took the message and answered too late: sending it again could be a
    duplicate (tests/providers/test_lost_answers.py has every class)."""
    async with cloud_api_emulator(SandboxConfig(latency_ms=500)) as base_url:
        provider = provider_for(base_url, http, request_timeout_s=0.05)
        with pytest.raises(UncertainOutcomeError) as caught:
            await provider.send(text_to())
    assert caught.value.code == "timeout"


async def test_refused_connection_is_transient(http: aiohttp.ClientSession) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    provider = provider_for(f"http://127.0.0.1:{closed_port}", http)
    with pytest.raises(TransientError) as caught:
        await provider.send(text_to())
    assert caught.value.code == "network"


async def test_error_text_never_contains_the_token_and_is_cut_to_300_chars(
    http: aiohttp.ClientSession,
) -> None:
    """A provider that echoes our Authorization header back in its error details."""

    async def echo_token(request: web.Request) -> web.Response:
        details = "x" * 280 + request.headers["Authorization"] + "y" * 100
        error = {
            "code": 100,
            "message": "(#100) Invalid parameter",
            "error_data": {"details": details},
        }
        return web.json_response({"error": error}, status=400)

    app = web.Application()
    app.router.add_post("/{version}/{phone_number_id}/messages", echo_token)
    secret = "EAAG-very-secret-token"
    async with serving(app) as base_url:
        with pytest.raises(PermanentError) as caught:
            await provider_for(base_url, http, token=secret).send(text_to())
    assert secret not in caught.value.text
    assert secret[:8] not in caught.value.text
    assert len(caught.value.text) == 300


WRONG_ENDPOINT_ANSWERS: list[tuple[dict[str, Any], type[ProviderError]]] = [
    (
        {
            "code": 100,
            "error_subcode": 33,
            "type": "GraphMethodException",
            "message": "Unsupported post request. Object with ID '1' does not exist",
        },
        ConfigurationError,
    ),
    (
        {"code": 2635, "type": "OAuthException", "message": "(#2635) deprecated version"},
        ConfigurationError,
    ),
    (
        {"code": 2500, "type": "OAuthException", "message": "Unknown path components: /v9.0"},
        ConfigurationError,
    ),
    ({"code": 100, "message": "(#100) Invalid parameter"}, PermanentError),
    ({"code": 100, "error_subcode": 2494010, "message": "(#100) Invalid"}, PermanentError),
]


@pytest.mark.parametrize(("error", "error_class"), WRONG_ENDPOINT_ANSWERS)
async def test_an_answer_proving_the_endpoint_wrong_is_a_configuration_error(
    http: aiohttp.ClientSession, error: dict[str, Any], error_class: type[ProviderError]
) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"error": error}, status=400)

    app = web.Application()
    app.router.add_post("/{version}/{phone_number_id}/messages", answer)
    async with serving(app) as base_url:
        with pytest.raises(ProviderError) as caught:
            await provider_for(base_url, http).send(text_to())
    assert type(caught.value) is error_class
    assert caught.value.code == str(error["code"])


NOW = datetime(2026, 11, 22, 9, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "expected_s"),
    [
        (None, None),
        ("120", 120.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        ("999999", 300.0),
        ("soon", None),
        ("nan", None),
        ("", None),
        ((NOW + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT"), 30.0),
        ((NOW - timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT"), 0.0),
        ((NOW + timedelta(days=1)).strftime("%a, %d %b %Y %H:%M:%S GMT"), 300.0),
    ],
    ids=[
        "absent",
        "seconds",
        "fraction",
        "negative",
        "huge",
        "garbage",
        "nan",
        "empty",
        "date-ahead",
        "date-past",
        "date-far",
    ],
)
def test_retry_after_is_parsed_from_seconds_or_http_date(
    header: str | None, expected_s: float | None
) -> None:
    assert parse_retry_after_s(header, NOW) == expected_s


class Receiver:
    """A webhook endpoint that keeps the raw bytes and signature of every POST."""

    def __init__(self, expected_statuses: int) -> None:
        self.posts: list[tuple[bytes, str | None]] = []
        self.expected_statuses = expected_statuses
        self.received_statuses = 0
        self.done = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.posts.append((raw, request.headers.get("X-Hub-Signature-256")))
        document = orjson.loads(raw)
        for entry in document["entry"]:
            for change in entry["changes"]:
                self.received_statuses += len(change["value"]["statuses"])
        if self.received_statuses >= self.expected_statuses:
            self.done.set()
        return web.Response(text="ok")


async def receive_webhooks(
    http: aiohttp.ClientSession, messages: list[OutboundMessage], expected: int, **knobs: Any
) -> tuple[Receiver, list[str]]:
    """Send `messages` through a sandbox that posts webhooks to a Receiver; wait for them."""
    receiver = Receiver(expected)
    app = web.Application()
    app.router.add_post("/webhooks", receiver.handle)
    async with serving(app) as receiver_url:
        config = SandboxConfig(
            webhook_url=receiver_url + "/webhooks", app_secret=APP_SECRET, **knobs
        )
        async with cloud_api_emulator(config) as base_url:
            provider = provider_for(base_url, http)
            receipts = [await provider.send(message) for message in messages]
            async with asyncio.timeout(10):
                await receiver.done.wait()
    return receiver, [receipt.provider_message_id for receipt in receipts]


async def test_status_webhooks_are_signed_and_decode_to_our_ledger_id(
    http: aiohttp.ClientSession,
) -> None:
    receiver, (wamid,) = await receive_webhooks(http, [text_to(ledger_id=42)], expected=3)
    assert all(is_valid_signature(raw, header, APP_SECRET) for raw, header in receiver.posts)
    updates = [update for raw, _ in receiver.posts for update in parse_status_webhook(raw)]
    assert updates == [
        StatusUpdate(ledger_id=42, status="sent", provider_message_id=wamid),
        StatusUpdate(ledger_id=42, status="delivered", provider_message_id=wamid),
        StatusUpdate(ledger_id=42, status="read", provider_message_id=wamid),
    ]


async def test_tampered_webhook_body_or_wrong_secret_fails_the_signature(
    http: aiohttp.ClientSession,
) -> None:
    receiver, _ = await receive_webhooks(
        http, [text_to(ledger_id=5)], expected=1, webhook_statuses=("sent",)
    )
    ((raw, header),) = receiver.posts
    tampered = raw.replace(b"blastd:5", b"blastd:6")
    assert tampered != raw
    assert is_valid_signature(raw, header, APP_SECRET)
    assert not is_valid_signature(tampered, header, APP_SECRET)
    assert not is_valid_signature(raw, header, "another-secret")


async def test_async_failure_arrives_as_failed_status_with_code_and_title(
    http: aiohttp.ClientSession,
) -> None:
    receiver, (wamid,) = await receive_webhooks(
        http, [text_to(ledger_id=9)], expected=1, async_fail_numbers={DIGITS: 131026}
    )
    ((raw, _),) = receiver.posts
    assert parse_status_webhook(raw) == [
        StatusUpdate(9, "failed", wamid, error_code="131026", error_text="Message undeliverable")
    ]


@pytest.mark.parametrize(
    "header",
    [None, "", "sha1=abc", "sha256=", "sha256=zz"],
    ids=["absent", "empty", "other-algorithm", "no-digest", "not-hex"],
)
def test_signature_without_a_valid_sha256_digest_is_refused(header: str | None) -> None:
    assert not is_valid_signature(b"{}", header, APP_SECRET)


def test_status_webhook_keeps_well_formed_statuses_with_a_message_id_or_our_id() -> None:
    """A status without our opaque field still names its message by wamid: it is kept, for
    the ledger to match by message id."""

    def status(**fields: object) -> dict[str, object]:
        return {"id": "wamid.A", "status": "delivered", "recipient_id": DIGITS, **fields}

    statuses = [
        status(biz_opaque_callback_data="blastd:3"),
        status(biz_opaque_callback_data="campaign:42:recipient:9001"),
        status(biz_opaque_callback_data="blastd:abc"),
        status(biz_opaque_callback_data="blastd:"),
        status(biz_opaque_callback_data="blastd:4", status="played"),
        status(),
        {"status": "read", "biz_opaque_callback_data": "blastd:5"},
        status(biz_opaque_callback_data="blastd:6", status="failed", errors="odd"),
        "not an object",
    ]
    document = {
        "object": "whatsapp_business_account",
        "entry": [
            {"id": "1", "changes": [{"field": "messages", "value": {"statuses": statuses}}]},
            {"id": "2", "changes": [{"field": "messages", "value": {"messages": []}}]},
            {"id": "3", "changes": "odd"},
            "odd",
        ],
    }
    assert parse_status_webhook(orjson.dumps(document)) == [
        StatusUpdate(3, "delivered", "wamid.A"),
        StatusUpdate(None, "delivered", "wamid.A"),
        StatusUpdate(None, "delivered", "wamid.A"),
        StatusUpdate(None, "delivered", "wamid.A"),
        StatusUpdate(None, "delivered", "wamid.A"),
        StatusUpdate(5, "read", None),
        StatusUpdate(6, "failed", "wamid.A"),
    ]


@pytest.mark.parametrize("raw", [b"[]", b'"text"', b"{}", b'{"entry": null}'])
def test_status_webhook_of_other_json_shapes_has_no_updates(raw: bytes) -> None:
    assert parse_status_webhook(raw) == []


def test_status_webhook_that_is_not_json_raises_value_error() -> None:
    with pytest.raises(ValueError, match="JSON"):
        parse_status_webhook(b"<html>")


@pytest.mark.parametrize(
    ("query", "answer"),
    [
        (
            {"hub.mode": "subscribe", "hub.verify_token": "vt", "hub.challenge": "1158201444"},
            "1158201444",
        ),
        ({"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"}, None),
        ({"hub.mode": "unsubscribe", "hub.verify_token": "vt", "hub.challenge": "1"}, None),
        ({"hub.mode": "subscribe", "hub.verify_token": "vt"}, None),
        ({"hub.mode": "subscribe", "hub.challenge": "1"}, None),
    ],
    ids=["matching", "wrong-token", "wrong-mode", "no-challenge", "no-token"],
)
def test_verification_answers_the_challenge_only_for_our_token(
    query: dict[str, str], answer: str | None
) -> None:
    assert answer_verification(query, "vt") == answer
