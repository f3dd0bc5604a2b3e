"""The UltraMsg adapter against the sandbox over real loopback HTTP, and its webhook helpers."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from blastd.config import UltraMsgAccount
from blastd.embedded import free_port
from blastd.errors import (
    CampaignFatalError,
    PermanentError,
    ProviderError,
    ThrottledError,
    TransientError,
    UncertainOutcomeError,
)
from blastd.providers.base import OutboundMessage, StatusUpdate, TemplateBody, TextBody, VideoBody
from blastd.providers.ultramsg import (
    UltraMsgProvider,
    classify_answer,
    is_valid_secret,
    parse_ack_webhook,
    parse_received_texts,
)
from blastd.sandbox.ultramsg import UltraMsgSandboxConfig
from tests.harness import sandbox_json, ultramsg_emulator

TOKEN = "sandbox-token"
NUMBER = "+6281200000001"
DIGITS = NUMBER.removeprefix("+")
VIDEO_LINK = "https://cdn.example.com/v/123.mp4"


def account_for(base_url: str, token: str = TOKEN, **fields: Any) -> UltraMsgAccount:
    return UltraMsgAccount.model_validate(
        {
            "kind": "ultramsg",
            "base_url": base_url,
            "instance_id": "instance1150",
            "token": token,
            **fields,
        }
    )


def provider_for(
    base_url: str, http: aiohttp.ClientSession, token: str = TOKEN, **fields: Any
) -> UltraMsgProvider:
    return UltraMsgProvider("test", account_for(base_url, token, **fields), http)


def text_to(to: str = NUMBER, ledger_id: int = 1) -> OutboundMessage:
    return OutboundMessage(ledger_id=ledger_id, to=to, body=TextBody("Halo Budi"))


async def send_one(config: UltraMsgSandboxConfig, http: aiohttp.ClientSession) -> ProviderError:
    """Send one text through a sandbox with `config` and return the error it raised."""
    async with ultramsg_emulator(config) as base_url:
        with pytest.raises(ProviderError) as caught:
            await provider_for(base_url, http).send(text_to())
    return caught.value


async def test_text_goes_to_chat_with_priority_and_the_ledger_id_as_reference(
    http: aiohttp.ClientSession,
) -> None:
    async with ultramsg_emulator() as base_url:
        receipt = await provider_for(base_url, http, priority=5).send(text_to(ledger_id=42))
        messages = await sandbox_json(http, base_url, "messages")
    assert receipt.provider_message_id == "1"
    assert messages == [
        {
            "id": 1,
            "instance": "instance1150",
            "type": "chat",
            "to": NUMBER,
            "body": "Halo Budi",
            "priority": "5",
            "referenceId": "blastd:42",
        }
    ]


@pytest.mark.parametrize(
    ("caption", "expected"),
    [("Video untuk Budi", {"caption": "Video untuk Budi"}), (None, {})],
    ids=["captioned", "bare"],
)
async def test_video_goes_to_the_video_endpoint_with_its_caption(
    http: aiohttp.ClientSession, caption: str | None, expected: dict[str, str]
) -> None:
    message = OutboundMessage(9, NUMBER, VideoBody(VIDEO_LINK, caption))
    async with ultramsg_emulator() as base_url:
        receipt = await provider_for(base_url, http).send(message)
        [sent] = await sandbox_json(http, base_url, "messages")
    assert receipt.provider_message_id == "1"
    assert sent == {
        "id": 1,
        "instance": "instance1150",
        "type": "video",
        "to": NUMBER,
        "video": VIDEO_LINK,
        "priority": "10",
        "referenceId": "blastd:9",
        **expected,
    }


@pytest.mark.parametrize("token_placement", ["query", "body"])
@pytest.mark.parametrize("body_format", ["form", "json"])
async def test_token_and_body_travel_the_configured_way(
    http: aiohttp.ClientSession, token_placement: str, body_format: str
) -> None:
    async with ultramsg_emulator() as base_url:
        provider = provider_for(
            base_url, http, token_placement=token_placement, body_format=body_format
        )
        receipt = await provider.send(text_to())
        recipients = await sandbox_json(http, base_url, "recipients")
    assert receipt.provider_message_id == "1"
    assert recipients == {DIGITS: 1}


async def test_bare_digit_instance_id_gets_the_instance_prefix(
    http: aiohttp.ClientSession,
) -> None:
    async with ultramsg_emulator() as base_url:
        receipt = await provider_for(base_url, http, instance_id="1150").send(text_to())
    assert receipt.provider_message_id == "1"


@pytest.mark.parametrize("style", ["queued", "bool"])
async def test_success_variants_are_read_as_receipts(
    http: aiohttp.ClientSession, style: str
) -> None:
    config = UltraMsgSandboxConfig.model_validate({"success_style": style})
    async with ultramsg_emulator(config) as base_url:
        receipt = await provider_for(base_url, http).send(text_to())
    assert receipt.provider_message_id == "1"


async def test_template_is_refused_permanently_without_a_request(
    http: aiohttp.ClientSession,
) -> None:
    """UltraMsg has no Meta templates: the recipient fails, nothing leaves."""
    message = OutboundMessage(1, NUMBER, TemplateBody("promo_nov", "id", ("Budi",)))
    async with ultramsg_emulator() as base_url:
        with pytest.raises(PermanentError) as caught:
            await provider_for(base_url, http).send(message)
        stats = await sandbox_json(http, base_url, "stats")
    assert caught.value.code == "template_unsupported"
    assert stats["requests"] == 0


FAULT_CLASSES: list[tuple[str, type[ProviderError], str, str]] = [
    ("transient", TransientError, "http_500", "HTTP 500"),
    ("throttled", ThrottledError, "http_429", "Too many requests"),
    ("wrong_token", CampaignFatalError, "wrong_token", "Wrong token. Please provide"),
    ("instance_not_found", CampaignFatalError, "instance_not_found", "Instance not found"),
    ("payment", CampaignFatalError, "payment", "Instance stopped due to non-payment"),
    ("not_authenticated", CampaignFatalError, "not_authenticated", "Instance not authenticated"),
    ("invalid_number", PermanentError, "invalid_number", "Invalid number: not registered"),
    ("field_error", PermanentError, "field_error", "to: is invalid"),
    ("malformed", UncertainOutcomeError, "http_200", "2xx body is not a JSON object"),
]


@pytest.mark.parametrize("error_http_status", [200, 400])
@pytest.mark.parametrize(
    ("fault", "error_class", "code", "text"), FAULT_CLASSES, ids=[f[0] for f in FAULT_CLASSES]
)
async def test_every_answer_is_classified_whether_refusals_come_as_200_or_4xx(
    http: aiohttp.ClientSession,
    error_http_status: int,
    fault: str,
    error_class: type[ProviderError],
    code: str,
    text: str,
) -> None:
    config = UltraMsgSandboxConfig.model_validate(
        {"fail_numbers": {DIGITS: fault}, "error_http_status": error_http_status}
    )
    error = await send_one(config, http)
    assert type(error) is error_class
    assert error.code == code
    assert error.text.startswith(text)


async def test_throttled_answer_carries_retry_after(http: aiohttp.ClientSession) -> None:
    error = await send_one(UltraMsgSandboxConfig(throttled_p=1.0, retry_after_s=7), http)
    assert isinstance(error, ThrottledError)
    assert error.retry_after_s == 7.0


async def test_success_without_an_id_is_uncertain(http: aiohttp.ClientSession) -> None:
    """The second malformed body is valid JSON that says sent but names no id."""
    async with ultramsg_emulator(UltraMsgSandboxConfig(malformed_body_p=1.0)) as base_url:
        provider = provider_for(base_url, http)
        errors = []
        for _ in range(2):
            with pytest.raises(UncertainOutcomeError) as caught:
                await provider.send(text_to())
            errors.append(caught.value.text)
    assert errors == ["2xx body is not a JSON object", "2xx without sent=true and an id"]


async def test_unknown_instance_stops_the_campaign(http: aiohttp.ClientSession) -> None:
    async with ultramsg_emulator() as base_url:
        with pytest.raises(CampaignFatalError) as caught:
            await provider_for(base_url, http, instance_id="instance9").send(text_to())
    assert caught.value.code == "instance_not_found"


async def test_instance_waiting_for_a_qr_scan_stops_the_campaign(
    http: aiohttp.ClientSession,
) -> None:
    error = await send_one(UltraMsgSandboxConfig(instance_status="qr"), http)
    assert (type(error), error.code) == (CampaignFatalError, "not_authenticated")


SECRET_TOKEN = "tok-VERY-SECRET-123"


def assert_no_token(error: ProviderError) -> None:
    for text in (error.text, str(error), repr(error), repr(error.__cause__)):
        assert SECRET_TOKEN not in text


async def test_wrong_token_never_appears_in_the_error(http: aiohttp.ClientSession) -> None:
    async with ultramsg_emulator() as base_url:
        with pytest.raises(CampaignFatalError) as caught:
            await provider_for(base_url, http, token=SECRET_TOKEN).send(text_to())
    assert caught.value.code == "wrong_token"
    assert_no_token(caught.value)


async def test_timeout_leaves_the_message_in_doubt_and_its_text_has_no_token(
    http: aiohttp.ClientSession,
) -> None:
    config = UltraMsgSandboxConfig(latency_ms=1000, tokens=frozenset({SECRET_TOKEN}))
    async with ultramsg_emulator(config) as base_url:
        provider = provider_for(base_url, http, token=SECRET_TOKEN, request_timeout_s=0.1)
        with pytest.raises(UncertainOutcomeError) as caught:
            await provider.send(text_to())
    assert (caught.value.code, caught.value.text) == ("timeout", "no answer within 0.1 s")
    assert_no_token(caught.value)


async def test_refused_connection_is_transient_and_its_text_has_no_token(
    http: aiohttp.ClientSession,
) -> None:
    """aiohttp's connection errors quote the URL, where the token sits in the query."""
    provider = provider_for(f"http://127.0.0.1:{free_port()}", http, token=SECRET_TOKEN)
    with pytest.raises(TransientError) as caught:
        await provider.send(text_to())
    assert caught.value.code == "network"
    assert caught.value.text == "ClientConnectorError talking to UltraMsg"
    assert_no_token(caught.value)


def classify(status: int, body: object, retry_after: str | None = None, **fields: Any) -> Any:
    """What classify_answer makes of an answer: the receipt, or the error it raises."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    try:
        return classify_answer(status, raw, retry_after, account_for("http://x", **fields), TOKEN)
    except ProviderError as exc:
        return exc


@pytest.mark.parametrize(
    ("status", "body", "error_class", "code"),
    [
        (401, b"", CampaignFatalError, "http_401"),
        (402, {"message": "pay"}, CampaignFatalError, "http_402"),
        (404, b"Not Found", CampaignFatalError, "http_404"),
        (400, b"", PermanentError, "http_400"),
        (429, {"error": "slow down"}, ThrottledError, "http_429"),
        (503, {"error": "Wrong token"}, TransientError, "http_503"),
        (200, {"error": "Something new"}, PermanentError, "error"),
        (200, {"error": {"odd": "shape"}}, PermanentError, "error"),
        (200, {"error": [{"token": "is required"}]}, CampaignFatalError, "token"),
        (200, {"sent": "false", "message": "Invalid number"}, PermanentError, "invalid_number"),
        (
            200,
            {"sent": False, "message": "Instance not found"},
            CampaignFatalError,
            "instance_not_found",
        ),
        (200, {"sent": "true", "id": True}, UncertainOutcomeError, "http_200"),
        (200, [1, 2], UncertainOutcomeError, "http_200"),
        (202, b"", UncertainOutcomeError, "http_202"),
    ],
)
def test_answers_without_a_sandbox_knob_are_classified(
    status: int, body: object, error_class: type[ProviderError], code: str
) -> None:
    error = classify(status, body)
    assert (type(error), error.code) == (error_class, code)


def test_error_text_that_echoes_the_token_is_scrubbed() -> None:
    error = classify(200, {"error": f"Wrong token {TOKEN}"})
    assert error.text == "Wrong token [token]"


def test_keyword_lists_are_configurable() -> None:
    body = {"error": "Instance under maintenance"}
    assert type(classify(200, body)) is PermanentError
    error = classify(200, body, fatal_error_keywords=("Under Maintenance",))
    assert (type(error), error.code) == (CampaignFatalError, "under_maintenance")


def test_accepting_answer_with_a_string_id_is_a_receipt() -> None:
    receipt = classify(200, {"sent": "true", "message": "queued", "id": "58431"})
    assert receipt.provider_message_id == "58431"


def ack(ack_value: object, reference: str = "blastd:42", **extra: Any) -> bytes:
    event = {
        "event_type": "message_ack",
        "instanceId": "1150",
        "referenceId": reference,
        "data": {"id": "58431", "ack": ack_value, "to": f"{DIGITS}@c.us"},
        **extra,
    }
    return orjson.dumps(event)


@pytest.mark.parametrize(
    ("ack_value", "state"),
    [
        ("server", "sent"),
        ("device", "delivered"),
        ("read", "read"),
        ("played", "read"),
        (1, "sent"),
        (2, "delivered"),
        ("3", "read"),
        (4, "read"),
    ],
)
def test_ack_values_map_to_ledger_states(ack_value: object, state: str) -> None:
    assert parse_ack_webhook(ack(ack_value)) == [StatusUpdate(42, state, "58431")]


def test_reference_inside_data_and_the_long_event_name_are_understood() -> None:
    event = {
        "event_type": "webhook_message_ack",
        "data": {"id": "", "ack": "device", "referenceId": "blastd:7"},
    }
    assert parse_ack_webhook(orjson.dumps(event)) == [StatusUpdate(7, "delivered", None)]


@pytest.mark.parametrize(
    "raw",
    [
        ack("pending"),
        ack(0),
        ack("server", reference="cmp42-r9001"),
        ack("server", reference="blastd:x1"),
        ack("server", event_type="message_received"),
        orjson.dumps(["not", "an", "event"]),
    ],
    ids=["pending", "zero", "not-ours", "not-a-number", "other-event", "not-an-object"],
)
def test_events_that_move_nothing_give_no_update(raw: bytes) -> None:
    assert parse_ack_webhook(raw) == []


def test_body_that_is_not_json_is_refused() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        parse_ack_webhook(b"<html>")


def test_secret_comparison() -> None:
    assert is_valid_secret("s3cret", "s3cret")
    assert not is_valid_secret("s3cre", "s3cret")
    assert not is_valid_secret(None, "s3cret")


def received(body: str = "STOP", **data: Any) -> bytes:
    fields = {"from": f"{DIGITS}@c.us", "type": "chat", "body": body, "fromMe": False, **data}
    return orjson.dumps({"event_type": "message_received", "instanceId": "1150", "data": fields})


def test_a_text_a_person_sent_is_read_with_its_sender() -> None:
    assert parse_received_texts(received("Berhenti")) == [(f"+{DIGITS}", "Berhenti")]


@pytest.mark.parametrize(
    "raw",
    [
        received(fromMe=True),
        received(**{"from": "120363025@g.us"}),
        received(type="image"),
        received(**{"from": "not-a-number@c.us"}),
        ack("server"),
        orjson.dumps({"event_type": "message_create", "data": {"body": "STOP", "fromMe": True}}),
        b"<html>",
    ],
    ids=["our-own", "group", "media", "no-number", "ack", "our-echo", "not-json"],
)
def test_only_a_persons_own_chat_text_is_read(raw: bytes) -> None:
    assert parse_received_texts(raw) == []
