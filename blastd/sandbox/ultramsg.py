"""Emulates UltraMsg's send endpoints on loopback, quirks included, with knobs for its failures.

Faithful to docs/providers.md (UltraMsg): refusals as `{"error": ...}` behind HTTP 200 (the
status is a knob: the docs are unsure), `sent` as the string "true", the token in the query
or the body, form or JSON bodies, `message_ack` webhooks echoing our referenceId, and
`message_received` events for texts people send (POST /_sandbox/inbound). Mounted at
/ultramsg beside the Cloud API emulator; control endpoints under /_sandbox/ there.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

import orjson
from aiohttp import web
from pydantic import Field

from blastd.sandbox.emulator import (
    ByNumber,
    Emulator,
    EmulatorConfig,
    Probability,
    Traffic,
    digits,
    json_response,
)
from blastd.sandbox.ultramsg_webhooks import (
    AcceptedMessage,
    Event,
    EventPerPost,
    ack_event,
    create_event,
    received_event,
)
from blastd.sandbox.webhooks import post_now, read_inbound_request

FaultKind = Literal[
    "transient",
    "throttled",
    "wrong_token",
    "instance_not_found",
    "payment",
    "not_authenticated",
    "invalid_number",
    "field_error",
    "malformed",
]
# The texts UltraMsg answers; the payment and QR ones are paraphrased, not confirmed.
ERROR_TEXTS: dict[str, str] = {
    "wrong_token": "Wrong token. Please provide token as a GET parameter.",
    "instance_not_found": "Instance not found",
    "payment": "Instance stopped due to non-payment",
    "not_authenticated": "Instance not authenticated, scan the QR code",
    "invalid_number": "Invalid number: not registered on WhatsApp",
}
TRANSIENT_STATUSES = (500, 502, 503)  # rotated, so one knob covers them all
MALFORMED_BODIES = (  # rotated: a cut-off body, then valid JSON without an id
    b'{"sent":"true","message":"ok","id":',
    b'{"sent":"true","message":"ok"}',
)
REQUIRED_FIELDS = {"chat": ("to", "body"), "video": ("to", "video")}
VIDEO_EXTENSIONS = (".mp4", ".3gp", ".mov")  # what /messages/video takes
MIN_NUMBER_DIGITS = 8
Ack = Literal["server", "device", "read", "played"]


class UltraMsgSandboxConfig(EmulatorConfig):
    """Every knob of the UltraMsg emulator; POST /_sandbox/config replaces any subset."""

    instances: frozenset[str] = frozenset({"instance1150"})
    instance_status: Literal["authenticated", "qr", "standby"] = "authenticated"
    error_http_status: int = Field(200, ge=200, le=499)  # refusals behind 200 or a 4xx
    success_style: Literal["ok", "queued", "bool"] = "ok"  # variants of the accepting body
    fatal_p: Probability = 0.0  # the wrong-token refusal
    permanent_p: Probability = 0.0  # the invalid-number refusal
    # recipient digits -> the fault it always gets
    fail_numbers: ByNumber[FaultKind] = Field(default_factory=dict)
    message_log_max: int = Field(1000, ge=0)  # accepted messages kept for /_sandbox/messages
    webhook_acks: tuple[Ack, ...] = ("server", "device", "read")
    # webhook_delay_ms passes between acceptance and each next ack
    webhook_numeric_acks: bool = False  # ack 1/2/3/4 instead of server/device/read/played
    webhook_repeats: int = Field(1, ge=1)  # every event posted this often: duplicates
    webhook_message_create: bool = False  # a message_create event before the acks

    def fault_slices(self) -> list[tuple[float, FaultKind]]:
        """Each drawn fault with its probability; one draw picks at most one of them."""
        return [
            (self.transient_p, "transient"),
            (self.throttled_p, "throttled"),
            (self.fatal_p, "wrong_token"),
            (self.permanent_p, "invalid_number"),
            (self.malformed_body_p, "malformed"),
        ]


class Refusal(Exception):
    """An answer other than acceptance; `code` names it in the stats."""

    def __init__(
        self, code: str, status: int, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(code)
        self.code = code
        self.status = status
        self.body = body
        self.headers = headers or {}


@dataclass(slots=True)
class _UltraMsgTraffic(Traffic):
    """The counters, and the last accepted messages."""

    messages: deque[dict[str, object]] = field(default_factory=deque)


class UltraMsgSandbox(Emulator[UltraMsgSandboxConfig, _UltraMsgTraffic, Event]):
    """The emulator's state and its request handlers."""

    webhook_noun = "events"

    def __init__(self, config: UltraMsgSandboxConfig, now: Callable[[], float]) -> None:
        super().__init__(config, now, _UltraMsgTraffic)
        self._next_id = 1  # UltraMsg's ids increase; they survive a reset like the real queue's

    async def handle_send(self, request: web.Request) -> web.Response:
        arrived_s = self._now()
        self._traffic.requests += 1
        raw_body = await request.read()
        try:
            response = self._accept(request, raw_body, arrived_s)
        except Refusal as refusal:
            self._traffic.rejected_by_code[refusal.code] += 1
            response = web.Response(
                status=refusal.status,
                body=refusal.body,
                headers=refusal.headers,
                content_type="text/html" if refusal.status >= 500 else "application/json",
            )
        if self._config.latency_ms or self._config.latency_jitter_ms:
            await asyncio.sleep(self._latency_s())
        return response

    def _accept(self, request: web.Request, raw_body: bytes, now_s: float) -> web.Response:
        instance_id = request.match_info["instance_id"]
        message_type = request.match_info["message_type"]
        if instance_id not in self._config.instances:
            raise self._error("instance_not_found", status=404)
        fields = _read_fields(request.content_type, raw_body)
        token = request.query.get("token") or fields.get("token")
        if token not in self._config.tokens:
            raise self._error("wrong_token")
        problems = field_problems(message_type, fields)
        if problems:
            body = orjson.dumps({"error": problems})
            raise Refusal("field_error", self._config.error_http_status, body)
        is_malformed = self._inject_faults(digits(fields["to"]))
        if self._config.instance_status != "authenticated":
            raise self._error("not_authenticated")
        message = self._record_accepted(instance_id, message_type, fields, now_s)
        if is_malformed:
            return web.Response(body=self._malformed_body(), content_type="application/json")
        return web.Response(body=self._success_body(message), content_type="application/json")

    def _error(self, code: str, status: int | None = None) -> Refusal:
        body = orjson.dumps({"error": ERROR_TEXTS[code]})
        return Refusal(code, status or self._config.error_http_status, body)

    def _inject_faults(self, to_digits: str) -> bool:
        """Raise the refusal of the fault this request gets; True when its body is garbled."""
        slices = self._config.fault_slices()
        kind = self._config.fail_numbers.get(to_digits) or self._draw_fault(slices)
        if kind is None or kind == "malformed":
            return kind == "malformed"
        if kind == "transient":
            status = TRANSIENT_STATUSES[self._turn(kind) % len(TRANSIENT_STATUSES)]
            page = f"<html><body>{status} injected fault</body></html>".encode()
            raise Refusal(f"http_{status}", status, page)
        if kind == "throttled":
            headers = {}
            if self._config.retry_after_s is not None:
                headers["Retry-After"] = f"{self._config.retry_after_s:g}"
            body = orjson.dumps({"error": "Too many requests"})
            raise Refusal("http_429", 429, body, headers)
        if kind == "field_error":
            body = orjson.dumps({"error": [{"to": "is invalid"}]})
            raise Refusal("field_error", self._config.error_http_status, body)
        raise self._error(kind)

    def _malformed_body(self) -> bytes:
        return MALFORMED_BODIES[self._turn("malformed") % len(MALFORMED_BODIES)]

    def _success_body(self, message: AcceptedMessage) -> bytes:
        style = self._config.success_style
        if style == "queued":
            document: dict[str, object] = {
                "sent": "true",
                "message": "queued",
                "id": str(message.message_id),
            }
        else:
            sent: object = True if style == "bool" else "true"
            document = {"sent": sent, "message": "ok", "id": message.message_id}
        return orjson.dumps(document)

    def _record_accepted(
        self, instance_id: str, message_type: str, fields: dict[str, str], now_s: float
    ) -> AcceptedMessage:
        message = AcceptedMessage(
            instance_id=instance_id,
            message_id=self._next_id,
            to_digits=digits(fields["to"]),
            type=message_type,
            body=fields.get("body") or fields.get("caption") or "",
            reference_id=fields.get("referenceId", ""),
        )
        self._next_id += 1
        traffic = self._traffic
        traffic.accepted += 1
        traffic.accepted_by_recipient[message.to_digits] += 1
        traffic.arrivals.append(now_s)
        self._log_message(message.message_id, instance_id, message_type, fields)
        if self._config.webhook_url is not None:
            self._queue_events(message)
        return message

    def _log_message(
        self, message_id: int, instance_id: str, message_type: str, fields: dict[str, str]
    ) -> None:
        messages = self._traffic.messages
        if self._config.message_log_max == 0:
            return
        while len(messages) >= self._config.message_log_max:
            messages.popleft()
        visible = {k: v for k, v in fields.items() if k != "token"}
        messages.append(
            {"id": message_id, "instance": instance_id, "type": message_type, **visible}
        )

    def _queue_events(self, message: AcceptedMessage) -> None:
        config = self._config
        delay_s = config.webhook_delay_ms / 1000.0
        events = [create_event(message)] if config.webhook_message_create else []
        numeric = config.webhook_numeric_acks
        events += [ack_event(message, ack, numeric=numeric) for ack in config.webhook_acks]
        for step, event in enumerate(events, start=1):
            for _ in range(config.webhook_repeats):
                self.outbox.put(event, delay_s * step)

    async def handle_instance_status(self, request: web.Request) -> web.Response:
        if request.match_info["instance_id"] not in self._config.instances:
            return json_response({"error": ERROR_TEXTS["instance_not_found"]}, status=404)
        if request.query.get("token") not in self._config.tokens:
            return json_response({"error": ERROR_TEXTS["wrong_token"]})
        account_status = {"status": self._config.instance_status, "substatus": "connected"}
        return json_response({"status": {"accountStatus": account_status}})

    async def handle_messages(self, request: web.Request) -> web.Response:
        return json_response(list(self._traffic.messages))

    async def handle_inbound(self, request: web.Request) -> web.Response:
        """POST /_sandbox/inbound {"from": digits, "text": ...}: a person writes to the
        instance; its `message_received` event is posted to webhook_url before this answers,
        and the answer carries the status the webhook endpoint gave."""
        sender, text = await read_inbound_request(request)
        instance_id = min(self._config.instances, default="instance1150")
        event = received_event(instance_id, sender, text)
        url = self._config.webhook_url
        return await post_now(url, self._webhook_format(url or "").encode([event]))

    def _webhook_format(self, url: str) -> EventPerPost:
        return EventPerPost(url)


def _read_fields(content_type: str, raw_body: bytes) -> dict[str, str]:
    """A form or JSON body as strings; anything unreadable is an empty request."""
    if content_type == "application/json":
        with contextlib.suppress(orjson.JSONDecodeError):
            document = orjson.loads(raw_body)
            if isinstance(document, dict):
                return {str(k): v if isinstance(v, str) else str(v) for k, v in document.items()}
        return {}
    return dict(parse_qsl(raw_body.decode(errors="replace"), keep_blank_values=True))


def field_problems(message_type: str, fields: dict[str, str]) -> list[dict[str, str]]:
    """Field errors in UltraMsg's list form: `[{"to": "is required"}, ...]`."""
    problems = [
        {name: "is required"} for name in REQUIRED_FIELDS[message_type] if not fields.get(name)
    ]
    to = fields.get("to")
    if to and len(digits(to)) < MIN_NUMBER_DIGITS:
        problems.append({"to": "is invalid"})
    video = fields.get("video")
    # By the link's path: a signed link (D-ID's S3 results) carries a query after the name.
    path = urlsplit(video).path if video else ""
    if message_type == "video" and video and not path.lower().endswith(VIDEO_EXTENSIONS):
        problems.append({"video": "must be mp4, 3gp or mov"})
    return problems


def build_ultramsg_app(
    config: UltraMsgSandboxConfig, now: Callable[[], float] = time.monotonic
) -> web.Application:
    """The emulator as an aiohttp app, to be served alone or mounted at /ultramsg."""
    sandbox = UltraMsgSandbox(config, now)
    app = web.Application()
    path = "/{instance_id}/messages/{message_type:chat|video}"
    app.router.add_post(path, sandbox.handle_send)
    app.router.add_get("/{instance_id}/instance/status", sandbox.handle_instance_status)
    app.router.add_get("/_sandbox/messages", sandbox.handle_messages)
    app.router.add_post("/_sandbox/inbound", sandbox.handle_inbound)
    sandbox.add_control_routes(app)
    return app
