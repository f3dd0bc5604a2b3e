"""Emulates a status gateway on loopback: Evolution API's sendStatus and the /story API.

Both routes feed one recorder that counts, per status id, the deliveries of every contact, so a
test or a benchmark can check that a broadcast reached everyone exactly once under one id.
Knobs: failures of chosen requests (by their number since the last reset), random 5xx and 429,
a maximum list length above which a request is refused as too large, a disconnected session,
latency, and a gateway that ignores the message id of a resend. Mounted at /status beside the
Cloud API emulator; control endpoints under /_sandbox/ there.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
STATUS_TYPES = ("text", "image", "video")
JID_SUFFIX = "@s.whatsapp.net"
REQUEST_LOG_MAX = 10_000
TRANSIENT_STATUS = 503
MAX_FONT = 5  # Evolution's schema: font 0-5


class StatusSandboxConfig(BaseModel):
    """Every knob of the emulator; POST /_sandbox/config replaces any subset at runtime."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: frozenset[str] = frozenset({"sandbox-token"})
    instances: frozenset[str] = frozenset({"sandbox"})  # Evolution instances and story sessions
    latency_ms: float = Field(0.0, ge=0)
    latency_jitter_ms: float = Field(0.0, ge=0)
    max_batch_size: int | None = Field(None, ge=1)  # longer lists are refused as too large
    too_large_status: int = Field(413, ge=400, le=599)  # WAHA users report it as a 500
    fail_requests: dict[int, int] = {}  # request number (from 1) -> HTTP status it gets
    transient_p: Probability = 0.0
    throttled_p: Probability = 0.0
    retry_after_s: float | None = Field(None, ge=0)  # Retry-After on 429 answers
    session_connected: bool = True
    message_id_field: str = "messageId"  # where a resend's id is read from
    honour_message_id: bool = True  # False: every request creates a new status
    seed: int | None = None


@dataclass(slots=True)
class _Traffic:
    """What arrived since start or the last reset."""

    requests: int = 0
    accepted: int = 0
    refused_by_code: Counter[str] = field(default_factory=Counter)
    deliveries: dict[str, Counter[str]] = field(default_factory=dict)  # status id -> jid -> n
    log: deque[dict[str, object]] = field(default_factory=lambda: deque(maxlen=REQUEST_LOG_MAX))


class Refusal(Exception):
    def __init__(self, code: str, status: int, text: str, headers: dict[str, str] | None = None):
        super().__init__(code)
        self.code = code
        self.status = status
        self.text = text
        self.headers = headers or {}


@dataclass(frozen=True, slots=True)
class _Post:
    """One status request, whichever route it came by."""

    instance: str
    type: str
    jids: list[str]
    message_id: str | None


class StatusGatewaySandbox:
    """The emulator's state and its request handlers."""

    def __init__(self, config: StatusSandboxConfig) -> None:
        self._config = config
        self._rng = random.Random(config.seed)
        self._traffic = _Traffic()

    async def handle_evolution(self, request: web.Request) -> web.Response:
        document = await _read_json(request)
        instance, id_field = request.match_info["instance"], self._config.message_id_field
        return await self._answer(
            request.headers.get("apikey"),
            lambda: _evolution_post(instance, document, id_field),
            _wa_message,
        )

    async def handle_story(self, request: web.Request) -> web.Response:
        document = await _read_json(request)
        status_type, id_field = request.match_info["status_type"], self._config.message_id_field
        return await self._answer(
            _bearer_or_key(request),
            lambda: _story_post(status_type, document, id_field),
            _story_body,
        )

    async def _answer(
        self,
        token: str | None,
        read: Callable[[], _Post],
        body_of: Callable[[_Post, str], dict[str, object]],
    ) -> web.Response:
        self._traffic.requests += 1
        number = self._traffic.requests
        post: _Post | None = None
        try:
            if token not in self._config.tokens:
                raise Refusal("unauthorized", 401, "Unauthorized")
            post = read()
            self._check(post, number)
            status_id = self._record(post)
            response = _json_response(body_of(post, status_id), status=201)
        except Refusal as refusal:
            self._traffic.refused_by_code[refusal.code] += 1
            response = _json_response(
                {"status": refusal.status, "error": refusal.code, "message": refusal.text},
                status=refusal.status,
                headers=refusal.headers,
            )
        self._log(number, post, response.status)
        await self._delay()
        return response

    def _check(self, post: _Post, number: int) -> None:
        config = self._config
        if post.instance not in config.instances:
            raise Refusal(
                "instance_not_found", 404, f'The "{post.instance}" instance does not exist'
            )
        if not config.session_connected:
            raise Refusal("session", 400, "Connection Closed: the session is not connected")
        injected = config.fail_requests.get(number)
        if injected is None:
            injected = self._draw_fault()
        if injected == 429:
            headers = {}
            if config.retry_after_s is not None:
                headers["Retry-After"] = f"{config.retry_after_s:g}"
            raise Refusal("http_429", 429, "Too Many Requests", headers)
        if injected is not None:
            raise Refusal(f"http_{injected}", injected, "injected failure")
        if config.max_batch_size is not None and len(post.jids) > config.max_batch_size:
            raise Refusal("too_large", config.too_large_status, "Frame Too Large")

    def _draw_fault(self) -> int | None:
        draw = self._rng.random()
        if draw < self._config.transient_p:
            return TRANSIENT_STATUS
        if draw < self._config.transient_p + self._config.throttled_p:
            return 429
        return None

    def _record(self, post: _Post) -> str:
        status_id = post.message_id if self._config.honour_message_id else None
        status_id = status_id or "3EB0" + secrets.token_hex(9).upper()  # Baileys' id form
        self._traffic.accepted += 1
        self._traffic.deliveries.setdefault(status_id, Counter()).update(post.jids)
        return status_id

    def _log(self, number: int, post: _Post | None, status: int) -> None:
        self._traffic.log.append(
            {
                "n": number,
                "status": status,
                "size": len(post.jids) if post else None,
                "message_id": post.message_id if post else None,
            }
        )

    async def _delay(self) -> None:
        config = self._config
        if config.latency_ms or config.latency_jitter_ms:
            jitter_ms = self._rng.uniform(0.0, config.latency_jitter_ms)
            await asyncio.sleep((config.latency_ms + jitter_ms) / 1000.0)

    async def handle_stats(self, request: web.Request) -> web.Response:
        traffic = self._traffic
        per_contact = self._per_contact()
        return _json_response(
            {
                "requests": traffic.requests,
                "accepted": traffic.accepted,
                "refused_by_code": traffic.refused_by_code,
                "statuses": len(traffic.deliveries),
                "contacts": len(per_contact),
                "deliveries": sum(per_contact.values()),
                "max_deliveries_per_contact": max(per_contact.values(), default=0),
                "contacts_by_deliveries": {
                    str(n): count for n, count in Counter(per_contact.values()).items()
                },
            }
        )

    def _per_contact(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for counts in self._traffic.deliveries.values():
            total.update(counts)
        return total

    async def handle_recipients(self, request: web.Request) -> web.Response:
        """Deliveries per contact JID, over every status."""
        return _json_response(self._per_contact())

    async def handle_statuses(self, request: web.Request) -> web.Response:
        """Per status id: how many contacts it reached and how many deliveries that took."""
        return _json_response(
            {
                status_id: {"contacts": len(counts), "deliveries": sum(counts.values())}
                for status_id, counts in self._traffic.deliveries.items()
            }
        )

    async def handle_requests(self, request: web.Request) -> web.Response:
        """The last requests in order: number, HTTP status, list length, message id."""
        return _json_response(list(self._traffic.log))

    async def handle_config(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            config = StatusSandboxConfig.model_validate({**self._config.model_dump(), **changes})
        except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            return _json_response({"error": str(exc)}, status=400)
        if config.seed != self._config.seed:
            self._rng = random.Random(config.seed)
        self._config = config
        return _json_response({"updated": sorted(changes)})

    async def handle_reset(self, request: web.Request) -> web.Response:
        """Forget all traffic (request numbers start again at 1); knobs stay."""
        self._traffic = _Traffic()
        return _json_response({"reset": True})


async def _read_json(request: web.Request) -> dict[str, Any]:
    try:
        document = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return {}
    return document if isinstance(document, dict) else {}


def _bearer_or_key(request: web.Request) -> str | None:
    """The story API names no auth: accept any of the three usual headers."""
    authorization = request.headers.get("Authorization", "")
    if authorization.startswith("Bearer "):
        return authorization.removeprefix("Bearer ")
    return request.headers.get("X-Api-Key") or request.headers.get("apikey")


def _evolution_post(instance: str, document: dict[str, Any], id_field: str) -> _Post:
    """Evolution's statusMessageSchema: type enum, content, background and font for
    text, statusJidList of digit-led JIDs."""
    status_type = document.get("type")
    if status_type not in STATUS_TYPES:
        raise _bad_request("type must be one of text, image, video")
    if not isinstance(document.get("content"), str) or not document["content"]:
        raise _bad_request("content is required")
    if status_type == "text":
        _check_text_style(document)
    return _Post(instance, status_type, _jids(document), _message_id(document, id_field))


def _story_post(status_type: str, document: dict[str, Any], id_field: str) -> _Post:
    session = document.get("sessionId")
    if not isinstance(session, str):
        raise _bad_request("sessionId is required")
    field_name = "text" if status_type == "text" else "url"
    if not isinstance(document.get(field_name), str) or not document[field_name]:
        raise _bad_request(f"{field_name} is required")
    return _Post(session, status_type, _jids(document), _message_id(document, id_field))


def _check_text_style(document: dict[str, Any]) -> None:
    font = document.get("font")
    if not isinstance(document.get("backgroundColor"), str):
        raise _bad_request("backgroundColor is required for text")
    if not isinstance(font, int) or isinstance(font, bool) or not 0 <= font <= MAX_FONT:
        raise _bad_request(f"font must be an integer from 0 to {MAX_FONT}")


def _jids(document: dict[str, Any]) -> list[str]:
    jids = document.get("statusJidList")
    if not isinstance(jids, list) or not jids:
        raise _bad_request("statusJidList is required")
    for jid in jids:
        if not isinstance(jid, str) or not jid[:1].isdigit() or not jid.endswith(JID_SUFFIX):
            raise _bad_request("statusJidList items must be '<digits>@s.whatsapp.net'")
    return jids


def _message_id(document: dict[str, Any], field_name: str) -> str | None:
    value = document.get(field_name)
    return value if isinstance(value, str) and value else None


def _bad_request(text: str) -> Refusal:
    return Refusal("bad_request", 400, text)


def _wa_message(post: _Post, status_id: str) -> dict[str, object]:
    """Evolution answers with the Baileys WAMessage of the status."""
    return {
        "key": {"remoteJid": "status@broadcast", "fromMe": True, "id": status_id},
        "message": {post.type: {}},
        "messageTimestamp": int(time.time()),
        "status": "PENDING",
    }


def _story_body(post: _Post, status_id: str) -> dict[str, object]:
    return {"success": True, "messageId": status_id, "recipients": len(post.jids)}


def _json_response(
    document: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(document),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def build_status_app(config: StatusSandboxConfig) -> web.Application:
    """The emulator as an aiohttp app, to be served alone or mounted at /status."""
    sandbox = StatusGatewaySandbox(config)
    app = web.Application()
    app.router.add_post("/message/sendStatus/{instance}", sandbox.handle_evolution)
    app.router.add_post("/story/{status_type:text|image|video}", sandbox.handle_story)
    app.router.add_get("/_sandbox/stats", sandbox.handle_stats)
    app.router.add_get("/_sandbox/recipients", sandbox.handle_recipients)
    app.router.add_get("/_sandbox/statuses", sandbox.handle_statuses)
    app.router.add_get("/_sandbox/requests", sandbox.handle_requests)
    app.router.add_post("/_sandbox/config", sandbox.handle_config)
    app.router.add_post("/_sandbox/reset", sandbox.handle_reset)
    return app
