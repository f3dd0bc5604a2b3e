"""The Wablas emulator over real loopback HTTP, mounted at /wablas: answer shapes, quirks,
faults, control endpoints and the tracking webhook."""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.harness import SandboxHandle, sandbox_process, serving, wait_until

TOKEN = "sandbox-token"
PHONES = ("6281200000001", "6281200000002")
LINK = "https://cdn.example.com/v/123.mp4"


def bulk(*phones: str, **top_level: object) -> dict[str, object]:
    return {"data": [{"phone": p, "message": "Halo", "retry": True} for p in phones], **top_level}


async def post(
    wablas: SandboxHandle,
    path: str,
    *,
    authorization: str | None = TOKEN,
    **kwargs: Any,
) -> tuple[int, Any, dict[str, str]]:
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with wablas.http.post(f"{wablas.url}{path}", headers=headers, **kwargs) as response:
        raw = await response.read()
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError:
            document = raw
        return response.status, document, dict(response.headers)


async def test_bulk_answer_lists_pending_items_and_takes_quota(wablas: SandboxHandle) -> None:
    status, body, _ = await post(wablas, "/api/v2/send-message", json=bulk(*PHONES))
    assert (status, body["status"]) == (200, True)
    items = body["data"]["messages"]
    assert [(i["phone"], i["status"]) for i in items] == [(p, "pending") for p in PHONES]
    assert len({i["id"] for i in items}) == 2
    assert body["data"]["device_id"]
    stats = await wablas.stats()
    assert stats["quota"] == body["data"]["quota"] == 1_000_000_000 - 2
    assert stats["batch_sizes"] == {"2": 1}


async def test_top_level_retry_and_priority_are_accepted(wablas: SandboxHandle) -> None:
    document = bulk(PHONES[0], retry=True, priority=False)
    status, body, _ = await post(wablas, "/api/v2/send-message", json=document)
    assert (status, body["status"]) == (200, True)


async def test_a_batch_over_the_limit_is_refused_behind_http_200(wablas: SandboxHandle) -> None:
    await wablas.configure(max_batch=1)
    status, body, _ = await post(wablas, "/api/v2/send-message", json=bulk(*PHONES))
    assert (status, body["status"]) == (200, False)
    assert "maximum 1" in body["message"]
    assert (await wablas.stats())["accepted"] == 0


async def test_singular_item_array_and_per_item_failures(wablas: SandboxHandle) -> None:
    await wablas.configure(item_array="message", fail_numbers={PHONES[1]: "rejected"})
    _, body, _ = await post(wablas, "/api/v2/send-message", json=bulk(*PHONES))
    assert [i["status"] for i in body["data"]["message"]] == ["pending", "rejected"]
    stats = await wablas.stats()
    assert (stats["accepted"], stats["failed_items_by_status"]) == (1, {"rejected": 1})


async def test_single_send_takes_json_form_and_get_with_the_token(wablas: SandboxHandle) -> None:
    fields = {"phone": PHONES[0], "message": "Halo"}
    for kwargs in ({"json": fields}, {"data": fields}):
        status, body, _ = await post(wablas, "/api/send-message", **kwargs)
        assert (status, body["status"]) == (200, True)
    query = {**fields, "token": TOKEN}
    async with wablas.http.get(f"{wablas.url}/api/send-message", params=query) as response:
        assert (await response.json())["status"] is True
    assert await wablas.recipients() == {PHONES[0]: 3}


@pytest.mark.parametrize(
    ("auth", "authorization", "is_accepted"),
    [
        ("either", TOKEN, True),
        ("either", f"{TOKEN}.sandbox-secret", True),
        ("token", f"{TOKEN}.sandbox-secret", False),
        ("token_secret", TOKEN, False),
        ("token_secret", f"{TOKEN}.sandbox-secret", True),
        ("either", "Bearer " + TOKEN, False),
        ("either", None, False),
    ],
)
async def test_authorization_forms(
    wablas: SandboxHandle, auth: str, authorization: str | None, is_accepted: bool
) -> None:
    await wablas.configure(auth=auth)
    path = "/api/v2/send-message"
    status, body, _ = await post(wablas, path, authorization=authorization, json=bulk(PHONES[0]))
    assert (status, body["status"]) == (200, is_accepted)


async def test_refused_authorization_can_be_http_401(wablas: SandboxHandle) -> None:
    await wablas.configure(auth_failure="http_401")
    status, body, _ = await post(wablas, "/api/v2/send-message", authorization="x", json=bulk())
    assert (status, body["status"]) == (401, False)


@pytest.mark.parametrize(
    ("knobs", "fragment"),
    [
        ({"device_connected": False}, "disconnected"),
        ({"device_error_p": 1.0}, "scan the qr"),
        ({"quota": 1}, "quota"),
        ({"quota_error_p": 1.0}, "quota"),
        ({"token_error_p": 1.0}, "token"),
        ({"unreachable_media": [LINK]}, "download"),
        ({"media_bytes": {LINK: 2 * 1024 * 1024 + 1}}, "too large"),
    ],
)
async def test_refusals_come_as_status_false_with_a_reason(
    wablas: SandboxHandle, knobs: dict[str, Any], fragment: str
) -> None:
    await wablas.configure(**knobs)
    items = [{"phone": p, "video": LINK, "caption": "V"} for p in PHONES]
    status, body, _ = await post(wablas, "/api/v2/send-video", json={"data": items})
    assert (status, body["status"]) == (200, False)
    assert fragment in body["message"].lower()


async def test_transient_faults_rotate_5xx_pages_and_throttling_sends_retry_after(
    wablas: SandboxHandle,
) -> None:
    await wablas.configure(transient_p=1.0)
    statuses = [(await post(wablas, "/api/v2/send-message", json=bulk(PHONES[0])))[0]]
    statuses += [(await post(wablas, "/api/v2/send-message", json=bulk(PHONES[0])))[0]]
    assert statuses == [500, 502]
    await wablas.configure(transient_p=0.0, throttled_p=1.0, retry_after_s=3)
    status, _, headers = await post(wablas, "/api/v2/send-message", json=bulk(PHONES[0]))
    assert (status, headers["Retry-After"]) == (429, "3")
    stats = await wablas.stats()
    assert stats["refused_by_reason"] == {"http_500": 1, "http_502": 1, "http_429": 1}
    assert stats["accepted"] == 0


async def test_malformed_body_still_counts_the_send(wablas: SandboxHandle) -> None:
    await wablas.configure(malformed_body_p=1.0)
    status, body, _ = await post(wablas, "/api/v2/send-message", json=bulk(PHONES[0]))
    assert (status, body) == (200, b'{"status":true,"data":{"messages":[')
    assert (await wablas.stats())["accepted"] == 1


async def test_resend_by_id_and_device_info(wablas: SandboxHandle) -> None:
    _, body, _ = await post(wablas, "/api/v2/send-message", json=bulk(PHONES[0]))
    message_id = body["data"]["messages"][0]["id"]
    headers = {"Authorization": TOKEN}
    url = f"{wablas.url}/api/resend-message"
    async with wablas.http.get(url, params={"id": message_id}, headers=headers) as response:
        assert (await response.json())["status"] is True
    assert (await wablas.stats())["duplicates"] == {PHONES[0]: 2}
    url = f"{wablas.url}/api/device/info"
    async with wablas.http.get(url, params={"token": TOKEN}) as response:
        device = (await response.json())["data"]
    assert (device["status"], device["quota"]) == ("connected", 1_000_000_000 - 1)


async def test_control_endpoints_reject_bad_knobs_and_reset(wablas: SandboxHandle) -> None:
    async with wablas.http.post(f"{wablas.url}/_sandbox/config", json={"nope": 1}) as response:
        assert response.status == 400
    await post(wablas, "/api/v2/send-message", json=bulk(*PHONES))
    async with wablas.http.get(f"{wablas.url}/_sandbox/arrivals") as response:
        assert len(await response.json()) == 1
    async with wablas.http.post(f"{wablas.url}/_sandbox/reset") as response:
        assert response.status == 200
    stats = await wablas.stats()
    assert (stats["requests"], stats["accepted"], stats["quota"]) == (0, 0, 1_000_000_000)


@contextlib.asynccontextmanager
async def tracking_receiver(answer_status: int = 200) -> AsyncIterator[tuple[str, list[Any]]]:
    """A tracking URL that records (query, content type, body) of every POST."""
    received: list[Any] = []

    async def receive(request: web.Request) -> web.Response:
        received.append((dict(request.query), request.content_type, await request.read()))
        return web.Response(status=answer_status)

    app = web.Application()
    app.router.add_post("/track", receive)
    async with serving(app) as url:
        yield f"{url}/track", received


async def test_tracking_posts_each_status_with_the_secret_in_the_query(
    wablas: SandboxHandle,
) -> None:
    async with tracking_receiver() as (url, received):
        await wablas.configure(webhook_url=url, webhook_secret="s3cret")
        _, body, _ = await post(wablas, "/api/v2/send-message", json=bulk(PHONES[0]))
        await wait_until(lambda: len(received) == 3)
    message_id = body["data"]["messages"][0]["id"]
    events = [orjson.loads(raw) for _, _, raw in received]
    assert [(e["id"], e["phone"], e["status"]) for e in events] == [
        (message_id, PHONES[0], s) for s in ("sent", "delivered", "read")
    ]
    assert {(q["secret"], ctype) for q, ctype, _ in received} == {("s3cret", "application/json")}
    assert set(events[0]["date"]) == {"created_at", "updated_at"}


async def test_tracking_can_batch_arrays_send_forms_and_fail_a_number(
    wablas: SandboxHandle,
) -> None:
    async with tracking_receiver() as (url, received):
        await wablas.configure(
            webhook_url=url,
            webhook_batch_max=10,
            webhook_statuses=["sent"],
            async_fail_numbers={PHONES[1]: "failed"},
        )
        await post(wablas, "/api/v2/send-message", json=bulk(*PHONES))
        await wait_until(lambda: received and len(orjson.loads(received[0][2])) == 2)
        [(_, _, raw)] = received
        assert [e["status"] for e in orjson.loads(raw)] == ["sent", "failed"]
        await wablas.configure(webhook_form=True)
        await post(wablas, "/api/v2/send-message", json=bulk(PHONES[0]))
        await wait_until(lambda: len(received) == 2)
    _, content_type, raw = received[1]
    assert content_type == "application/x-www-form-urlencoded"
    assert b"status=sent" in raw
    assert b"created_at=" in raw


async def test_tracking_is_retried_then_dropped(wablas: SandboxHandle) -> None:
    async with tracking_receiver(answer_status=401) as (url, received):
        await wablas.configure(
            webhook_url=url,
            webhook_statuses=["read"],
            webhook_attempts=3,
            webhook_retry_initial_ms=1,
        )
        await post(wablas, "/api/v2/send-message", json=bulk(PHONES[0]))
        await wait_until(lambda: _dropped(wablas))
    assert len(received) == 3


async def _dropped(wablas: SandboxHandle) -> bool:
    return bool((await wablas.stats())["webhook_statuses_dropped"] == 1)


def test_module_entry_point_serves_wablas_under_its_prefix() -> None:
    with sandbox_process() as base_url:
        request = urllib.request.Request(
            f"{base_url}/wablas/api/v2/send-message",
            data=orjson.dumps(bulk(PHONES[0])),
            headers={"Authorization": TOKEN, "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = orjson.loads(response.read())
    assert body["data"]["messages"][0]["status"] == "pending"
