"""The UltraMsg emulator over real loopback HTTP, mounted at /ultramsg as `python -m blastd.sandbox`
serves it: quirks, validation, faults, control endpoints and the message_ack webhooks."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from blastd.sandbox.ultramsg import UltraMsgSandboxConfig
from tests.harness import (
    get_json,
    poll_stats,
    sandbox_json,
    sandbox_process,
    serving,
    ultramsg_emulator,
)

TOKEN = "sandbox-token"
INSTANCE = "instance1150"
NUMBER = "+6281200000001"
DIGITS = NUMBER.removeprefix("+")
VIDEO_LINK = "https://cdn.example.com/v/123.mp4"


async def post_chat(
    http: aiohttp.ClientSession,
    base_url: str,
    *,
    token: str | None = TOKEN,
    to: str = NUMBER,
    instance: str = INSTANCE,
    **extra: str,
) -> tuple[int, Any, dict[str, str]]:
    """A form POST with the token in the query, as the adapter sends by default."""
    params = {"token": token} if token is not None else {}
    form = {"to": to, "body": "Halo", **extra}
    url = f"{base_url}/{instance}/messages/chat"
    async with http.post(url, params=params, data=form) as response:
        raw = await response.read()
        return response.status, _json_or_raw(raw), dict(response.headers)


def _json_or_raw(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw


async def test_accepted_messages_get_increasing_ids_and_sent_as_the_string_true(
    http: aiohttp.ClientSession,
) -> None:
    async with ultramsg_emulator() as base_url:
        answers = [await post_chat(http, base_url) for _ in range(3)]
    assert [(status, body) for status, body, _ in answers] == [
        (200, {"sent": "true", "message": "ok", "id": n}) for n in (1, 2, 3)
    ]


async def test_json_body_with_the_token_inside_is_accepted_like_a_form(
    http: aiohttp.ClientSession,
) -> None:
    request = {"token": TOKEN, "to": DIGITS, "video": VIDEO_LINK, "caption": "Video untuk Budi"}
    async with ultramsg_emulator() as base_url:
        url = f"{base_url}/{INSTANCE}/messages/video"
        async with http.post(url, json=request) as response:
            body = await response.json()
        messages = await sandbox_json(http, base_url, "messages")
    assert body == {"sent": "true", "message": "ok", "id": 1}
    assert messages == [
        {
            "id": 1,
            "instance": INSTANCE,
            "type": "video",
            "to": DIGITS,
            "video": VIDEO_LINK,
            "caption": "Video untuk Budi",
        }
    ], "the token is never kept"


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["missing", "wrong"])
async def test_wrong_or_missing_token_is_refused_behind_http_200(
    http: aiohttp.ClientSession, token: str | None
) -> None:
    async with ultramsg_emulator() as base_url:
        status, body, _ = await post_chat(http, base_url, token=token)
        stats = await sandbox_json(http, base_url, "stats")
    assert (status, body) == (
        200,
        {"error": "Wrong token. Please provide token as a GET parameter."},
    )
    assert (stats["accepted"], stats["rejected_by_code"]) == (0, {"wrong_token": 1})


async def test_refusals_come_behind_the_configured_http_status(
    http: aiohttp.ClientSession,
) -> None:
    async with ultramsg_emulator(UltraMsgSandboxConfig(error_http_status=401)) as base_url:
        status, body, _ = await post_chat(http, base_url, token="wrong-token")
    assert status == 401
    assert body["error"].startswith("Wrong token")


async def test_unknown_instance_is_a_404_with_an_error_body(http: aiohttp.ClientSession) -> None:
    async with ultramsg_emulator() as base_url:
        status, body, _ = await post_chat(http, base_url, instance="instance999")
    assert (status, body) == (404, {"error": "Instance not found"})


@pytest.mark.parametrize(
    ("path", "form", "problems"),
    [
        ("chat", {}, [{"to": "is required"}, {"body": "is required"}]),
        ("chat", {"to": "12", "body": "Halo"}, [{"to": "is invalid"}]),
        ("video", {"to": NUMBER}, [{"video": "is required"}]),
        (
            "video",
            {"to": NUMBER, "video": "https://cdn.example.com/v.avi"},
            [{"video": "must be mp4, 3gp or mov"}],
        ),
    ],
    ids=["missing-fields", "short-number", "missing-video", "video-extension"],
)
async def test_field_errors_come_as_a_list_of_fields(
    http: aiohttp.ClientSession, path: str, form: dict[str, str], problems: list[dict[str, str]]
) -> None:
    async with ultramsg_emulator() as base_url:
        url = f"{base_url}/{INSTANCE}/messages/{path}"
        async with http.post(url, params={"token": TOKEN}, data=form) as response:
            answer = (response.status, await response.json())
    assert answer == (200, {"error": problems})


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("queued", {"sent": "true", "message": "queued", "id": "1"}),
        ("bool", {"sent": True, "message": "ok", "id": 1}),
    ],
)
async def test_success_body_variants(
    http: aiohttp.ClientSession, style: str, expected: dict[str, object]
) -> None:
    async with ultramsg_emulator(
        UltraMsgSandboxConfig.model_validate({"success_style": style})
    ) as url:
        _, body, _ = await post_chat(http, url)
    assert body == expected


async def test_injected_faults_answer_each_class_for_the_configured_number(
    http: aiohttp.ClientSession,
) -> None:
    numbers = {f"+62812000001{n:02d}": kind for n, kind in enumerate(FAULT_ANSWERS)}
    config = UltraMsgSandboxConfig.model_validate({"fail_numbers": numbers, "retry_after_s": 7})
    async with ultramsg_emulator(config) as base_url:
        answers = {kind: await post_chat(http, base_url, to=to) for to, kind in numbers.items()}
        stats = await sandbox_json(http, base_url, "stats")
    for kind, (status, body) in FAULT_ANSWERS.items():
        assert answers[kind][:2] == (status, body), kind
    assert answers["throttled"][2]["Retry-After"] == "7"
    assert stats["accepted"] == 1, "only the garbled answer was accepted"
    assert stats["rejected_by_code"] == {
        "http_500": 1,
        "http_429": 1,
        "wrong_token": 1,
        "instance_not_found": 1,
        "payment": 1,
        "not_authenticated": 1,
        "invalid_number": 1,
        "field_error": 1,
    }


FAULT_ANSWERS: dict[str, tuple[int, object]] = {
    "transient": (500, b"<html><body>500 injected fault</body></html>"),
    "throttled": (429, {"error": "Too many requests"}),
    "wrong_token": (200, {"error": "Wrong token. Please provide token as a GET parameter."}),
    "instance_not_found": (200, {"error": "Instance not found"}),
    "payment": (200, {"error": "Instance stopped due to non-payment"}),
    "not_authenticated": (200, {"error": "Instance not authenticated, scan the QR code"}),
    "invalid_number": (200, {"error": "Invalid number: not registered on WhatsApp"}),
    "field_error": (200, {"error": [{"to": "is invalid"}]}),
    "malformed": (200, b'{"sent":"true","message":"ok","id":'),
}


async def test_transient_statuses_and_malformed_bodies_rotate(http: aiohttp.ClientSession) -> None:
    async with ultramsg_emulator(UltraMsgSandboxConfig(transient_p=1.0)) as base_url:
        statuses = [(await post_chat(http, base_url))[0] for _ in range(4)]
    assert statuses == [500, 502, 503, 500]
    async with ultramsg_emulator(UltraMsgSandboxConfig(malformed_body_p=1.0)) as base_url:
        bodies = [(await post_chat(http, base_url))[1] for _ in range(2)]
    assert bodies == [b'{"sent":"true","message":"ok","id":', {"sent": "true", "message": "ok"}]


async def test_instance_that_lost_its_link_refuses_sends_and_reports_its_state(
    http: aiohttp.ClientSession,
) -> None:
    async with ultramsg_emulator(UltraMsgSandboxConfig(instance_status="qr")) as base_url:
        _, body, _ = await post_chat(http, base_url)
        status = await get_json(http, f"{base_url}/{INSTANCE}/instance/status?token={TOKEN}")
    assert body == {"error": "Instance not authenticated, scan the QR code"}
    assert status == {"status": {"accountStatus": {"status": "qr", "substatus": "connected"}}}


async def test_control_endpoints_count_change_knobs_and_reset(
    http: aiohttp.ClientSession,
) -> None:
    async with ultramsg_emulator() as base_url:
        await post_chat(http, base_url)
        await post_chat(http, base_url)
        stats = await sandbox_json(http, base_url, "stats")
        recipients = await sandbox_json(http, base_url, "recipients")
        arrivals = await sandbox_json(http, base_url, "arrivals")
        async with http.post(base_url + "/_sandbox/config", json={"transient_p": 2}) as bad:
            bad_status = bad.status
        async with http.post(base_url + "/_sandbox/config", json={"fatal_p": 1}) as good:
            assert good.status == 200
        refused = await post_chat(http, base_url)
        async with http.post(base_url + "/_sandbox/reset") as response:
            assert response.status == 200
        after_reset = await sandbox_json(http, base_url, "stats")
    assert (stats["requests"], stats["accepted"], stats["duplicates"]) == (2, 2, {DIGITS: 2})
    assert recipients == {DIGITS: 2}
    assert len(arrivals) == 2
    assert bad_status == 400
    assert refused[1]["error"].startswith("Wrong token")
    assert (after_reset["requests"], after_reset["accepted"]) == (0, 0)


class Receiver:
    """A webhook endpoint that records every event and answers the statuses it is told to."""

    def __init__(self, expected_events: int, answers: tuple[int, ...] = ()) -> None:
        self.events: list[dict[str, Any]] = []
        self.posts = 0
        self.expected_events = expected_events
        self.answers = list(answers)
        self.done = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.posts += 1
        status = self.answers.pop(0) if self.answers else 200
        if status == 200:
            self.events.append(orjson.loads(await request.read()))
            if len(self.events) >= self.expected_events:
                self.done.set()
        return web.Response(status=status)


@contextlib.asynccontextmanager
async def running_receiver(receiver: Receiver) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/webhook", receiver.handle)
    async with serving(app) as base_url:
        yield base_url + "/webhook?secret=s3cret"


async def send_and_collect(
    http: aiohttp.ClientSession, receiver: Receiver, **knobs: Any
) -> list[dict[str, Any]]:
    async with running_receiver(receiver) as url:
        config = UltraMsgSandboxConfig.model_validate({"webhook_url": url, **knobs})
        async with ultramsg_emulator(config) as base_url:
            await post_chat(http, base_url, referenceId="blastd:7")
            async with asyncio.timeout(10):
                await receiver.done.wait()
    return receiver.events


async def test_acks_follow_server_device_read_and_echo_the_reference_id(
    http: aiohttp.ClientSession,
) -> None:
    events = await send_and_collect(http, Receiver(expected_events=3), webhook_delay_ms=5)
    assert [e["event_type"] for e in events] == ["message_ack"] * 3
    assert [e["data"]["ack"] for e in events] == ["server", "device", "read"]
    assert {e["referenceId"] for e in events} == {"blastd:7"}
    assert {e["instanceId"] for e in events} == {"1150"}
    assert {e["data"]["to"] for e in events} == {f"{DIGITS}@c.us"}


async def test_acks_can_be_numeric_repeated_and_preceded_by_message_create(
    http: aiohttp.ClientSession,
) -> None:
    knobs = {
        "webhook_acks": ["server", "played"],
        "webhook_numeric_acks": True,
        "webhook_repeats": 2,
        "webhook_message_create": True,
    }
    events = await send_and_collect(http, Receiver(expected_events=6), **knobs)
    assert [(e["event_type"], e["data"]["ack"]) for e in events] == [
        ("message_create", "pending"),
        ("message_create", "pending"),
        ("message_ack", 1),
        ("message_ack", 1),
        ("message_ack", 4),
        ("message_ack", 4),
    ]


async def test_webhook_is_retried_until_2xx_and_then_counted(http: aiohttp.ClientSession) -> None:
    receiver = Receiver(expected_events=1, answers=(500, 503))
    async with running_receiver(receiver) as url:
        config = UltraMsgSandboxConfig(
            webhook_url=url, webhook_acks=("server",), webhook_retry_initial_ms=1
        )
        async with ultramsg_emulator(config) as base_url:
            await post_chat(http, base_url)
            async with asyncio.timeout(10):
                await receiver.done.wait()
            stats = await poll_stats(http, base_url, lambda s: s["webhook_events_delivered"] > 0)
    assert receiver.posts == 3
    assert stats["webhook_events_dropped"] == 0


def test_module_entry_point_serves_ultramsg_under_its_prefix() -> None:
    with sandbox_process() as base_url:
        request = urllib.request.Request(
            f"{base_url}/ultramsg/{INSTANCE}/messages/chat?token={TOKEN}",
            data=b"to=%2B6281200000001&body=Halo",
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = orjson.loads(response.read())
        with urllib.request.urlopen(f"{base_url}/_sandbox/stats", timeout=10) as response:
            cloud_stats = orjson.loads(response.read())
    assert body == {"sent": "true", "message": "ok", "id": 1}
    assert cloud_stats["requests"] == 0, "the Cloud API emulator saw nothing"
