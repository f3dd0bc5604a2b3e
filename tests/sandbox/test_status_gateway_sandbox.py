"""The status gateway emulator over real loopback HTTP, mounted at /status as
`python -m blastd.sandbox` serves it: validation, faults, the per-status recorder, control."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from blastd.sandbox.__main__ import provider_apps
from tests.harness import status_emulator

HEADERS = {"apikey": "sandbox-token"}
JIDS = ["6281200000001@s.whatsapp.net", "6281200000002@s.whatsapp.net"]
TEXT = {"type": "text", "content": "Promo", "backgroundColor": "#000000", "font": 1}


async def send_status(
    http: aiohttp.ClientSession, url: str, jids: list[str], **fields: Any
) -> tuple[int, Any]:
    body = {**TEXT, "statusJidList": jids, **fields}
    async with http.post(f"{url}/message/sendStatus/sandbox", json=body, headers=HEADERS) as r:
        return r.status, await r.json()


async def get(http: aiohttp.ClientSession, url: str, path: str) -> Any:
    async with http.get(f"{url}/_sandbox/{path}") as response:
        return await response.json()


async def test_evolution_answers_201_with_a_wa_message_of_status_broadcast(
    http: aiohttp.ClientSession,
) -> None:
    async with status_emulator() as url:
        status, body = await send_status(http, url, JIDS)
    assert status == 201
    assert body["key"]["remoteJid"] == "status@broadcast"
    assert body["key"]["fromMe"] is True
    assert len(body["key"]["id"]) == 22


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"type": "sticker"}, "type"),
        ({"content": ""}, "content"),
        ({"font": 6}, "font"),
        ({"backgroundColor": None}, "backgroundColor"),
        ({"statusJidList": ["+62812@s.whatsapp.net"]}, "statusJidList"),
    ],
)
async def test_requests_against_evolution_schema_are_refused_with_400(
    http: aiohttp.ClientSession, fields: dict[str, Any], problem: str
) -> None:
    async with status_emulator() as url:
        status, body = await send_status(http, url, JIDS, **fields)
    assert status == 400
    assert problem in body["message"]


async def test_deliveries_are_counted_per_status_and_contact(
    http: aiohttp.ClientSession,
) -> None:
    async with status_emulator() as url:
        _, first = await send_status(http, url, JIDS[:1])
        message_id = first["key"]["id"]
        await send_status(http, url, JIDS, messageId=message_id)
        statuses = await get(http, url, "statuses")
        stats = await get(http, url, "stats")
        recipients = await get(http, url, "recipients")
    assert statuses == {message_id: {"contacts": 2, "deliveries": 3}}
    assert stats["max_deliveries_per_contact"] == 2
    assert stats["contacts_by_deliveries"] == {"1": 1, "2": 1}
    assert recipients == {JIDS[0]: 2, JIDS[1]: 1}


async def test_chosen_requests_fail_and_long_lists_are_refused(
    http: aiohttp.ClientSession,
) -> None:
    async with status_emulator(fail_requests={"2": 502}, max_batch_size=1) as url:
        answers = [
            (await send_status(http, url, JIDS[:1]))[0],
            (await send_status(http, url, JIDS[:1]))[0],
            (await send_status(http, url, JIDS))[0],
        ]
        log = await get(http, url, "requests")
        stats = await get(http, url, "stats")
    assert answers == [201, 502, 413]
    assert [(r["n"], r["status"], r["size"]) for r in log] == [
        (1, 201, 1),
        (2, 502, 1),
        (3, 413, 2),
    ]
    assert stats["refused_by_code"] == {"http_502": 1, "too_large": 1}


async def test_story_routes_take_the_session_in_the_body_and_a_bearer_token(
    http: aiohttp.ClientSession,
) -> None:
    headers = {"Authorization": "Bearer sandbox-token"}
    body = {"sessionId": "sandbox", "url": "https://cdn.example.com/v.mp4", "statusJidList": JIDS}
    async with (
        status_emulator() as url,
        http.post(f"{url}/story/video", json=body, headers=headers) as response,
    ):
        answer = await response.json()
    assert response.status == 201
    assert answer["success"] is True
    assert answer["messageId"].startswith("3EB0")


async def test_config_and_reset_at_runtime(http: aiohttp.ClientSession) -> None:
    async with status_emulator() as url:
        async with http.post(f"{url}/_sandbox/config", json={"session_connected": False}) as r:
            assert r.status == 200
        status, _ = await send_status(http, url, JIDS)
        async with http.post(f"{url}/_sandbox/config", json={"nonsense": 1}) as r:
            assert r.status == 400
        async with http.post(f"{url}/_sandbox/reset") as r:
            assert r.status == 200
        stats = await get(http, url, "stats")
    assert status == 400
    assert stats["requests"] == 0


def test_the_sandbox_process_mounts_the_emulator_at_status() -> None:
    assert "/status" in provider_apps()
