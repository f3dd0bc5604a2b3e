"""The Cloud API emulator over real loopback HTTP: validation, limits, faults, webhooks, control."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from blastd.sandbox.__main__ import main as sandbox_main
from blastd.sandbox.cloud_api import SandboxConfig
from tests.harness import (
    Clock,
    cloud_api_emulator,
    poll_stats,
    sandbox_json,
    sandbox_process,
    serving,
)

TOKEN = "sandbox-token"
PHONE_NUMBER_ID = "100000000000001"
SEND_PATH = f"/v23.0/{PHONE_NUMBER_ID}/messages"


def text_message(to: str = "+6281200000001", **extra: object) -> dict[str, object]:
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "text",
        "text": {"body": "Halo"},
        **extra,
    }


def template_message(name: str, language: str, params: list[str]) -> dict[str, object]:
    body = {"type": "body", "parameters": [{"type": "text", "text": p} for p in params]}
    template = {"name": name, "language": {"code": language}, "components": [body]}
    return {**text_message(), "type": "template", "template": template}


async def post_send(
    http: aiohttp.ClientSession,
    base_url: str,
    document: object,
    authorization: str | None = f"Bearer {TOKEN}",
) -> tuple[int, Any, Mapping[str, str]]:
    raw = document if isinstance(document, bytes) else orjson.dumps(document)
    headers = {"Authorization": authorization} if authorization else {}
    async with http.post(base_url + SEND_PATH, data=raw, headers=headers) as response:
        return response.status, orjson.loads(await response.read()), response.headers.copy()


async def post_json(
    http: aiohttp.ClientSession, base_url: str, path: str, document: object
) -> tuple[int, Any]:
    async with http.post(base_url + path, data=orjson.dumps(document)) as response:
        return response.status, orjson.loads(await response.read())


async def test_text_send_answers_like_meta_without_message_status(
    http: aiohttp.ClientSession,
) -> None:
    async with cloud_api_emulator() as base_url:
        status, body, _ = await post_send(http, base_url, text_message("+6281200000001"))
    assert status == 200
    assert body["messaging_product"] == "whatsapp"
    assert body["contacts"] == [{"input": "+6281200000001", "wa_id": "6281200000001"}]
    assert body["messages"][0]["id"].startswith("wamid.")
    assert "message_status" not in body["messages"][0]


async def test_template_send_is_accepted_with_message_status(http: aiohttp.ClientSession) -> None:
    async with cloud_api_emulator() as base_url:
        status, body, _ = await post_send(
            http, base_url, template_message("promo_nov", "id", ["Budi", "X1"])
        )
    assert status == 200
    assert body["messages"][0]["message_status"] == "accepted"


async def test_error_answer_uses_graph_envelope(http: aiohttp.ClientSession) -> None:
    async with cloud_api_emulator() as base_url:
        status, body, _ = await post_send(http, base_url, text_message(), "Bearer wrong-token")
    assert status == 401
    error = body["error"]
    assert set(error) == {"message", "type", "code", "error_data", "fbtrace_id"}
    assert error["code"] == 190
    assert error["message"].startswith("(#190) ")
    assert error["type"] == "OAuthException"
    assert error["error_data"]["messaging_product"] == "whatsapp"
    assert error["error_data"]["details"]


async def test_missing_authorization_is_refused_with_190(http: aiohttp.ClientSession) -> None:
    async with cloud_api_emulator() as base_url:
        status, body, _ = await post_send(http, base_url, text_message(), authorization=None)
    assert (status, body["error"]["code"]) == (401, 190)


LONG_CALLBACK = "x" * 513


@pytest.mark.parametrize(
    ("document", "code"),
    [
        (b"not json", 100),
        (b"[1, 2]", 100),
        (text_message(messaging_product="sms"), 100),
        ({k: v for k, v in text_message().items() if k != "to"}, 131008),
        ({k: v for k, v in text_message().items() if k != "type"}, 131008),
        (text_message(to="+--"), 131009),
        (text_message(type="sticker", sticker={"id": "1"}), 131051),
        ({k: v for k, v in text_message().items() if k != "text"}, 131008),
        (text_message(text={"body": ""}), 131008),
        (text_message(type="video", video={"caption": "no link"}), 131008),
        (text_message(type="template", template={"name": "promo_nov"}), 131008),
        (template_message("no_such_template", "id", []), 132001),
        (template_message("promo_nov", "en_US", ["Budi", "X1"]), 132001),
        (template_message("promo_nov", "id", ["only one"]), 132000),
        (text_message(biz_opaque_callback_data=LONG_CALLBACK), 100),
    ],
    ids=[
        "not-json",
        "not-an-object",
        "wrong-product",
        "no-to",
        "no-type",
        "to-without-digits",
        "unsupported-type",
        "no-text-object",
        "empty-text-body",
        "video-without-link",
        "template-without-language",
        "unknown-template",
        "template-in-unknown-language",
        "wrong-param-count",
        "callback-data-too-long",
    ],
)
async def test_invalid_request_is_refused_with_metas_code(
    http: aiohttp.ClientSession, document: object, code: int
) -> None:
    async with cloud_api_emulator() as base_url:
        status, body, _ = await post_send(http, base_url, document)
        stats = await sandbox_json(http, base_url, "stats")
    assert status == 400
    assert body["error"]["code"] == code
    assert stats["rejected_by_code"] == {str(code): 1}
    assert stats["accepted"] == 0


async def test_rate_limit_refuses_sends_beyond_rate_within_one_second(
    http: aiohttp.ClientSession,
) -> None:
    clock = Clock()
    async with cloud_api_emulator(SandboxConfig(rate_per_s=3), clock) as base_url:
        first = [await post_send(http, base_url, text_message(f"+62812{i}")) for i in range(5)]
        clock.now_s += 1.0
        after_window = await post_send(http, base_url, text_message("+6281299"))
    assert [status for status, _, _ in first] == [200, 200, 200, 429, 429]
    assert first[3][1]["error"]["code"] == 130429
    assert after_window[0] == 200


async def test_rate_limit_is_counted_per_phone_number_id(http: aiohttp.ClientSession) -> None:
    config = SandboxConfig(rate_per_s=1, phone_number_ids=frozenset({PHONE_NUMBER_ID, "999"}))
    async with cloud_api_emulator(config, Clock()) as base_url:
        await post_send(http, base_url, text_message())
        async with http.post(
            base_url + "/v23.0/999/messages",
            data=orjson.dumps(text_message()),
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as response:
            status = response.status
    assert status == 200


async def test_retry_after_knob_adds_the_header_to_130429(http: aiohttp.ClientSession) -> None:
    config = SandboxConfig(rate_per_s=1, retry_after_s=2.5)
    async with cloud_api_emulator(config, Clock()) as base_url:
        await post_send(http, base_url, text_message())
        status, _, headers = await post_send(http, base_url, text_message())
    assert status == 429
    assert headers["Retry-After"] == "2.5"


async def test_pair_limit_refuses_a_recipient_beyond_its_burst_until_refilled(
    http: aiohttp.ClientSession,
) -> None:
    clock = Clock()
    config = SandboxConfig(pair_limit=True, pair_burst=2, pair_interval_s=6.0)
    async with cloud_api_emulator(config, clock) as base_url:
        same = [await post_send(http, base_url, text_message("+628111")) for _ in range(3)]
        other = await post_send(http, base_url, text_message("+628222"))
        clock.now_s += 6.0
        refilled = await post_send(http, base_url, text_message("+628111"))
    assert [status for status, _, _ in same] == [200, 200, 429]
    assert same[2][1]["error"]["code"] == 131056
    assert other[0] == 200
    assert refilled[0] == 200


async def test_stats_show_duplicates_and_distinct_recipients(http: aiohttp.ClientSession) -> None:
    async with cloud_api_emulator() as base_url:
        for to in ("+628111", "+628111", "+628222"):
            await post_send(http, base_url, text_message(to))
        await post_send(http, base_url, text_message(), "Bearer nope")
        stats = await sandbox_json(http, base_url, "stats")
        recipients = await sandbox_json(http, base_url, "recipients")
    assert stats["requests"] == 4
    assert stats["accepted"] == 3
    assert stats["duplicates"] == {"628111": 2}
    assert stats["accepted_per_recipient_total"] == 2
    assert stats["rejected_by_code"] == {"190": 1}
    assert recipients == {"628111": 2, "628222": 1}


async def test_arrivals_list_only_accepted_requests(http: aiohttp.ClientSession) -> None:
    clock = Clock()
    async with cloud_api_emulator(SandboxConfig(), clock) as base_url:
        await post_send(http, base_url, text_message())
        clock.now_s += 0.25
        await post_send(http, base_url, text_message(), "Bearer nope")
        clock.now_s += 0.25
        await post_send(http, base_url, text_message())
        arrivals = await sandbox_json(http, base_url, "arrivals")
    assert arrivals == [1000.0, 1000.5]


async def test_reset_clears_counters_and_limiters(http: aiohttp.ClientSession) -> None:
    async with cloud_api_emulator(SandboxConfig(rate_per_s=1), Clock()) as base_url:
        await post_send(http, base_url, text_message())
        status, _ = await post_json(http, base_url, "/_sandbox/reset", {})
        stats = await sandbox_json(http, base_url, "stats")
        arrivals = await sandbox_json(http, base_url, "arrivals")
        again, _, _ = await post_send(http, base_url, text_message())
    assert status == 200
    assert (stats["requests"], stats["accepted"], stats["duplicates"]) == (0, 0, {})
    assert arrivals == []
    assert again == 200


async def test_config_endpoint_changes_knobs_at_runtime(http: aiohttp.ClientSession) -> None:
    async with cloud_api_emulator() as base_url:
        changes = {
            "fail_numbers": {"+62 811-1": 131026},  # keys keep only their digits
            "templates": [{"name": "welcome", "language": "en", "param_count": 1}],
        }
        status, answer = await post_json(http, base_url, "/_sandbox/config", changes)
        failed, failure, _ = await post_send(http, base_url, text_message("+628111"))
        sent, _, _ = await post_send(http, base_url, template_message("welcome", "en", ["Ann"]))
        default_kept, _, _ = await post_send(
            http, base_url, template_message("promo_nov", "id", ["Budi", "X1"])
        )
    assert (status, answer) == (200, {"updated": ["fail_numbers", "templates"]})
    assert (failed, failure["error"]["code"]) == (400, 131026)
    assert sent == 200
    assert default_kept == 400  # the registry was replaced, not merged


async def test_config_endpoint_refuses_invalid_knobs_and_keeps_the_old_ones(
    http: aiohttp.ClientSession,
) -> None:
    async with cloud_api_emulator() as base_url:
        typo, _ = await post_json(http, base_url, "/_sandbox/config", {"transient": 1.0})
        too_likely, _ = await post_json(
            http, base_url, "/_sandbox/config", {"transient_p": 0.7, "fatal_p": 0.7}
        )
        status, _, _ = await post_send(http, base_url, text_message())
    assert (typo, too_likely) == (400, 400)
    assert status == 200


async def test_injected_transient_faults_rotate_500_and_503_codes(
    http: aiohttp.ClientSession,
) -> None:
    async with cloud_api_emulator(SandboxConfig(transient_p=1.0)) as base_url:
        answers = [await post_send(http, base_url, text_message()) for _ in range(3)]
    assert [(status, body["error"]["code"]) for status, body, _ in answers] == [
        (500, 131000),
        (503, 131016),
        (503, 2),
    ]


async def test_fail_numbers_http_answers_a_bare_status_without_graph_body(
    http: aiohttp.ClientSession,
) -> None:
    config = SandboxConfig(fail_numbers_http={"628111": 502})
    async with (
        cloud_api_emulator(config) as base_url,
        http.post(
            base_url + SEND_PATH,
            data=orjson.dumps(text_message("+628111")),
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as response,
    ):
        status, content_type = response.status, response.content_type
    assert (status, content_type) == (502, "text/html")


async def test_same_seed_gives_the_same_faults_and_message_ids(
    http: aiohttp.ClientSession,
) -> None:
    config = SandboxConfig(seed=11, transient_p=0.3, permanent_p=0.3)
    runs = []
    for _ in range(2):
        async with cloud_api_emulator(config) as base_url:
            runs.append([await post_send(http, base_url, text_message()) for _ in range(20)])
    outcomes = [[(status, body) for status, body, _ in run] for run in runs]
    strip_trace = [
        [(s, b.get("messages") or b["error"]["code"]) for s, b in run] for run in outcomes
    ]
    assert strip_trace[0] == strip_trace[1]
    assert {s for s, _ in strip_trace[0]} >= {200, 400}


class Receiver:
    """A webhook endpoint that records every POST and answers the statuses it is told to."""

    def __init__(self, expected_statuses: int, answers: tuple[int, ...] = ()) -> None:
        self.posts: list[tuple[bytes, str | None]] = []
        self.expected_statuses = expected_statuses
        self.answers = list(answers)
        self.received_statuses = 0
        self.done = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.posts.append((raw, request.headers.get("X-Hub-Signature-256")))
        status = self.answers.pop(0) if self.answers else 200
        if status == 200:
            self.received_statuses += len(statuses_of(raw))
            if self.received_statuses >= self.expected_statuses:
                self.done.set()
        return web.Response(status=status)


def statuses_of(raw: bytes) -> list[dict[str, Any]]:
    document = orjson.loads(raw)
    return [
        status
        for entry in document["entry"]
        for change in entry["changes"]
        for status in change["value"]["statuses"]
    ]


@contextlib.asynccontextmanager
async def running_receiver(receiver: Receiver) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/webhook", receiver.handle)
    async with serving(app) as base_url:
        yield base_url + "/webhook"


async def test_webhook_statuses_are_batched_up_to_the_maximum(http: aiohttp.ClientSession) -> None:
    receiver = Receiver(expected_statuses=3)
    async with running_receiver(receiver) as url:
        config = SandboxConfig(webhook_url=url, webhook_batch_max=2)
        async with cloud_api_emulator(config) as base_url:
            await post_send(http, base_url, text_message(biz_opaque_callback_data="blastd:7"))
            async with asyncio.timeout(10):
                await receiver.done.wait()
    batches = [statuses_of(raw) for raw, _ in receiver.posts]
    assert [len(batch) for batch in batches] == [2, 1]
    statuses = [status for batch in batches for status in batch]
    assert [s["status"] for s in statuses] == ["sent", "delivered", "read"]
    assert {s["biz_opaque_callback_data"] for s in statuses} == {"blastd:7"}
    assert {s["recipient_id"] for s in statuses} == {"6281200000001"}


async def test_webhook_is_retried_with_the_same_signed_bytes_until_2xx(
    http: aiohttp.ClientSession,
) -> None:
    receiver = Receiver(expected_statuses=1, answers=(500, 503))
    async with running_receiver(receiver) as url:
        config = SandboxConfig(
            webhook_url=url, webhook_statuses=("sent",), webhook_retry_initial_ms=1
        )
        async with cloud_api_emulator(config) as base_url:
            await post_send(http, base_url, text_message())
            async with asyncio.timeout(10):
                await receiver.done.wait()
            stats = await sandbox_json(http, base_url, "stats")
    assert len(receiver.posts) == 3
    assert len(set(receiver.posts)) == 1
    assert stats["webhook_statuses_delivered"] == 1


async def test_webhook_is_dropped_after_the_last_attempt(http: aiohttp.ClientSession) -> None:
    receiver = Receiver(expected_statuses=1, answers=(500, 500))
    async with running_receiver(receiver) as url:
        config = SandboxConfig(
            webhook_url=url,
            webhook_statuses=("sent",),
            webhook_attempts=2,
            webhook_retry_initial_ms=1,
        )
        async with cloud_api_emulator(config) as base_url:
            await post_send(http, base_url, text_message())
            stats = await poll_stats(http, base_url, lambda s: s["webhook_statuses_dropped"] > 0)
    assert len(receiver.posts) == 2
    assert stats["webhook_statuses_delivered"] == 0


def test_module_entry_point_announces_its_port_and_serves() -> None:
    """sandbox_process checks the announcement: "sandbox listening on http://127.0.0.1:..."."""
    with (
        sandbox_process("--rate-per-s", "5") as base_url,
        urllib.request.urlopen(base_url + "/_sandbox/stats", timeout=10) as response,
    ):
        stats = orjson.loads(response.read())
    assert stats["requests"] == 0


def test_module_entry_point_refuses_an_impossible_probability() -> None:
    with pytest.raises(SystemExit, match="invalid sandbox flags"):
        sandbox_main(["--transient-p", "2"])


@pytest.mark.parametrize(
    ("knobs", "expected"),
    [
        ({"webhook_reorder": True}, ["read", "delivered", "sent"]),
        ({"webhook_duplicate_p": 1.0}, ["sent", "sent", "delivered", "delivered", "read", "read"]),
    ],
    ids=["reordered", "duplicated"],
)
async def test_status_webhooks_can_come_reordered_or_twice(
    http: aiohttp.ClientSession, knobs: dict[str, Any], expected: list[str]
) -> None:
    receiver = Receiver(expected_statuses=len(expected))
    async with running_receiver(receiver) as url:
        config = SandboxConfig(webhook_url=url, **knobs)
        async with cloud_api_emulator(config) as base_url:
            await post_send(http, base_url, text_message(biz_opaque_callback_data="blastd:7"))
            async with asyncio.timeout(10):
                await receiver.done.wait()
    statuses = [status for raw, _ in receiver.posts for status in statuses_of(raw)]
    assert [s["status"] for s in statuses] == expected
    assert {s["biz_opaque_callback_data"] for s in statuses} == {"blastd:7"}


async def test_status_webhooks_can_omit_our_opaque_field(http: aiohttp.ClientSession) -> None:
    receiver = Receiver(expected_statuses=3)
    async with running_receiver(receiver) as url:
        config = SandboxConfig(webhook_url=url, webhook_omit_callback_data=True)
        async with cloud_api_emulator(config) as base_url:
            await post_send(http, base_url, text_message(biz_opaque_callback_data="blastd:7"))
            async with asyncio.timeout(10):
                await receiver.done.wait()
    statuses = [status for raw, _ in receiver.posts for status in statuses_of(raw)]
    assert len(statuses) == 3
    assert all("biz_opaque_callback_data" not in s for s in statuses)
    assert len({s["id"] for s in statuses}) == 1


async def test_a_withheld_answer_is_still_accepted_and_counted(
    http: aiohttp.ClientSession,
) -> None:
    config = SandboxConfig(withhold_answer_p=1.0, withhold_answer_ms=3_600_000)
    async with cloud_api_emulator(config) as base_url:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await post_send(http, base_url, text_message())
        stats = await sandbox_json(http, base_url, "stats")
    assert (stats["requests"], stats["accepted"], stats["answers_withheld"]) == (1, 1, 1)


def test_module_entry_point_documents_the_fate_knobs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        sandbox_main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--withhold-answer-p", "--withhold-answer-ms", "--webhook-duplicate-p"):
        assert flag in text
    assert "--webhook-reorder" in text
    assert "--webhook-omit-callback-data" in text


async def post_to_path(
    http: aiohttp.ClientSession, base_url: str, path: str, token: str = TOKEN
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with http.post(base_url + path, data=orjson.dumps(text_message()), headers=headers) as r:
        return r.status, orjson.loads(await r.read())


@pytest.mark.parametrize(
    ("path", "code", "subcode", "words"),
    [
        (f"/v17.0/{PHONE_NUMBER_ID}/messages", 2635, None, "deprecated version"),
        (f"/v99.0/{PHONE_NUMBER_ID}/messages", 2500, None, "Unknown path components"),
        (f"/latest/{PHONE_NUMBER_ID}/messages", 2500, None, "Unknown path components"),
        ("/v23.0/123456/messages", 100, 33, "Object with ID '123456' does not exist"),
    ],
)
async def test_a_version_or_phone_number_id_graph_does_not_serve_is_refused_like_meta(
    http: aiohttp.ClientSession, path: str, code: int, subcode: int | None, words: str
) -> None:
    async with cloud_api_emulator() as base_url:
        status, body = await post_to_path(http, base_url, path)
        accepted = await sandbox_json(http, base_url, "stats")
    assert status == 400
    error = body["error"]
    assert (error["code"], error.get("error_subcode")) == (code, subcode)
    assert words in error["message"]
    assert accepted["accepted"] == 0


async def test_the_versions_and_phone_number_ids_served_are_configurable(
    http: aiohttp.ClientSession,
) -> None:
    config = SandboxConfig(api_versions=("v19.0",), phone_number_ids=frozenset({"42"}))
    async with cloud_api_emulator(config) as base_url:
        old, _ = await post_to_path(http, base_url, "/v19.0/42/messages")
        default, body = await post_to_path(http, base_url, SEND_PATH)
    assert old == 200
    assert (default, body["error"]["code"]) == (400, 2500)


async def test_a_wrong_version_is_refused_before_the_token_and_a_wrong_id_after_it(
    http: aiohttp.ClientSession,
) -> None:
    async with cloud_api_emulator() as base_url:
        _, version = await post_to_path(http, base_url, "/v99.0/1/messages", token="bad")
        _, number = await post_to_path(http, base_url, "/v23.0/1/messages", token="bad")
    assert version["error"]["code"] == 2500
    assert number["error"]["code"] == 190


@pytest.mark.parametrize(
    ("document", "code", "details"),
    [
        (text_message(priority="high"), 100, "unknown parameter 'priority'"),
        ({**text_message(), "text": {"body": "x" * 4097}}, 100, "longer than 4096"),
        ({**text_message(), "text": {"body": " \n "}}, 100, "must not be blank"),
        (
            {
                **text_message(),
                "type": "video",
                "video": {"link": "https://cdn.example.com/v.mp4", "caption": "c" * 1025},
            },
            100,
            "longer than 1024",
        ),
    ],
    ids=["unknown-key", "long-text", "blank-text", "long-caption"],
)
async def test_a_body_meta_would_refuse_is_refused_with_its_code(
    http: aiohttp.ClientSession, document: dict[str, object], code: int, details: str
) -> None:
    async with cloud_api_emulator() as base_url:
        status, body, _ = await post_send(http, base_url, document)
    assert status == 400
    assert body["error"]["code"] == code
    assert details in body["error"]["error_data"]["details"]


async def test_a_text_of_exactly_4096_characters_and_a_caption_of_1024_are_accepted(
    http: aiohttp.ClientSession,
) -> None:
    video = {"link": "https://cdn.example.com/v.mp4", "caption": "c" * 1024}
    async with cloud_api_emulator() as base_url:
        text, _, _ = await post_send(
            http, base_url, {**text_message(), "text": {"body": "x" * 4096}}
        )
        caption, _, _ = await post_send(
            http, base_url, {**text_message(), "type": "video", "video": video}
        )
    assert (text, caption) == (200, 200)
