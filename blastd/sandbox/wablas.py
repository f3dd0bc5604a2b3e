"""Emulates a Wablas device's HTTP API on loopback, with knobs for its failures and quirks.

Faithful to docs/providers.md (Wablas): v2 bulk and single sends, refusals as HTTP 200 with
{"status": false}, "pending" item statuses, per-item failures inside a bulk answer, a batch
limit, both Authorization forms, the tracking webhook, and messages people send the device
(POST /_sandbox/inbound). Mounted at /wablas by
`python -m blastd.sandbox`; control endpoints under /_sandbox/ expose what arrived.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from blastd.sandbox.emulator import Emulator, Traffic, json_response
from blastd.sandbox.wablas_config import WablasSandboxConfig
from blastd.sandbox.wablas_requests import (
    DEVICE_REFUSAL,
    QUOTA_REFUSAL,
    TOKEN_REFUSAL,
    Item,
    Refusal,
    is_authorized,
    read_bulk_items,
    read_fields,
    read_item,
)
from blastd.sandbox.wablas_tracking import Event, TrackingPosts, incoming_event, tracking_event
from blastd.sandbox.webhooks import post_now, read_inbound_request

TRANSIENT_STATUSES = (500, 502, 503)  # rotated
MALFORMED_BODIES = (b'{"status":true,"data":{"messages":[', b'{"status":true,"message":"ok"}')
DEVICE_ID = "SANDBOX-DEVICE"
MEDIA_MAX_BYTES = 2 * 1024 * 1024  # 2 MB for video, audio, image, document


@dataclass(slots=True)
class _WablasTraffic(Traffic):
    """The counters; `accepted` counts items, `arrivals` accepted requests."""

    accepted_requests: int = 0
    failed_items_by_status: Counter[str] = field(default_factory=Counter)
    batch_sizes: Counter[int] = field(default_factory=Counter)  # items per accepted request
    sent_ids: dict[str, str] = field(default_factory=dict)  # message id -> phone, for resends


class WablasSandbox(Emulator[WablasSandboxConfig, _WablasTraffic, Event]):
    """The emulator's state and its request handlers."""

    rejections_key = "refused_by_reason"

    def __init__(self, config: WablasSandboxConfig, now: Callable[[], float]) -> None:
        super().__init__(config, now, _WablasTraffic)
        self._quota = config.quota

    def apply(self, config: WablasSandboxConfig) -> None:
        """Switch to new knobs; counters carry on, the quota restarts when it changed."""
        if config.quota != self._config.quota:
            self._quota = config.quota
        super().apply(config)

    def reset(self) -> None:
        """Forget all traffic and restore the quota; knobs and queued webhooks stay."""
        super().reset()
        self._quota = self._config.quota

    async def handle_bulk(self, request: web.Request) -> web.Response:
        """POST /api/v2/send-message and /api/v2/send-video: {"data": [...]}."""
        is_video = request.path.endswith("video")
        raw_body = await request.read()
        return await self._answer(request, lambda: read_bulk_items(raw_body, is_video))

    async def handle_single(self, request: web.Request) -> web.Response:
        """POST /api/send-message and /api/send-video (JSON or form), GET with ?token=."""
        is_video = request.path.endswith("video")
        if request.method == "GET":
            query: dict[str, object] = dict(request.query)
            return await self._answer(request, lambda: [read_item(query, is_video)])
        raw_body, content_type = await request.read(), request.content_type
        return await self._answer(
            request, lambda: [read_item(read_fields(raw_body, content_type), is_video)]
        )

    async def _answer(self, request: web.Request, read: Callable[[], list[Item]]) -> web.Response:
        arrived_s = self._now()
        self._traffic.requests += 1
        authorization = request.headers.get("Authorization") or request.query.get("token")
        try:
            self._check_auth(authorization)
            items = read()
            self._check_request(items)
            response = self._accept(items, arrived_s)
        except Refusal as refusal:
            response = self._refuse(refusal)
        if self._config.latency_ms or self._config.latency_jitter_ms:
            await asyncio.sleep(self._latency_s())
        return response

    def _check_auth(self, authorization: str | None) -> None:
        config = self._config
        if not is_authorized(authorization, config.tokens, config.secret_key, config.auth):
            status = 401 if config.auth_failure == "http_401" else 200
            raise Refusal("auth", TOKEN_REFUSAL, status)

    def _check_request(self, items: Sequence[Item]) -> None:
        config = self._config
        for item in items:
            http_status = config.fail_numbers_http.get(item.phone)
            if http_status is not None:
                raise Refusal(f"http_{http_status}", f"HTTP {http_status}", http_status)
        self._inject_fault()
        if len(items) > config.max_batch:
            raise Refusal("batch_too_large", f"maximum {config.max_batch} messages per request")
        if not config.device_connected:
            raise Refusal("device", DEVICE_REFUSAL)
        if self._quota < len(items):
            raise Refusal("quota", QUOTA_REFUSAL)
        for item in items:
            self._check_media(item)

    def _inject_fault(self) -> None:
        kind = self._draw_fault(self._config.fault_slices())
        if kind == "transient":
            status = TRANSIENT_STATUSES[self._turn("transient") % len(TRANSIENT_STATUSES)]
            raise Refusal(f"http_{status}", f"HTTP {status}", status)
        if kind == "throttled":
            raise Refusal("http_429", "too many requests", 429)
        if kind is not None:
            texts = {"token": TOKEN_REFUSAL, "device": DEVICE_REFUSAL, "quota": QUOTA_REFUSAL}
            raise Refusal(kind, texts[kind])

    def _check_media(self, item: Item) -> None:
        if not item.is_video:
            return
        if item.content in self._config.unreachable_media:
            raise Refusal("media", "failed to download media from url")
        if self._config.media_bytes.get(item.content, 0) > MEDIA_MAX_BYTES:
            raise Refusal("media", "file too large, maximum file size is 2 MB")

    def _accept(self, items: Sequence[Item], arrived_s: float) -> web.Response:
        traffic, config = self._traffic, self._config
        traffic.accepted_requests += 1
        traffic.batch_sizes[len(items)] += 1
        traffic.arrivals.append(arrived_s)
        answered = [self._answer_item(item) for item in items]
        if config.malformed_body_p and self._rng.random() < config.malformed_body_p:
            body = MALFORMED_BODIES[self._turn("malformed") % len(MALFORMED_BODIES)]
            return web.Response(body=body, content_type="application/json")
        shown = [
            a
            for a, item in zip(answered, items, strict=True)
            if item.phone not in config.omit_numbers
        ]
        if config.reverse_items:
            shown.reverse()
        data = {"device_id": DEVICE_ID, "quota": self._quota, config.item_array: shown}
        document = {
            "status": True,
            "message": "Message is pending and waiting to be processed",
            "data": data,
        }
        return web.Response(body=orjson.dumps(document), content_type="application/json")

    def _answer_item(self, item: Item) -> dict[str, object]:
        message_id = f"{self._rng.getrandbits(128):032x}"
        failure = self._config.fail_numbers.get(item.phone)
        answer: dict[str, object] = {"id": message_id, "phone": item.phone, "status": "pending"}
        answer["message"] = item.content if not item.is_video else (item.caption or "")
        if failure is not None:
            self._traffic.failed_items_by_status[failure] += 1
            answer.update(status=failure, note="failure configured for this recipient")
            return answer
        traffic = self._traffic
        traffic.accepted += 1
        traffic.accepted_by_recipient[item.phone] += 1
        traffic.sent_ids[message_id] = item.phone
        self._quota -= 1
        self._queue_tracking(message_id, item.phone)
        return answer

    def _queue_tracking(self, message_id: str, phone: str) -> None:
        config = self._config
        if config.webhook_url is None:
            return
        delay_s = config.webhook_delay_ms / 1000.0
        final = config.async_fail_numbers.get(phone)
        statuses: Sequence[str] = (final,) if final is not None else config.webhook_statuses
        for status in statuses:
            self.outbox.put(tracking_event(message_id, phone, status), delay_s)

    def _refuse(self, refusal: Refusal) -> web.Response:
        self._traffic.rejected_by_code[refusal.reason] += 1
        headers = {}
        if refusal.http_status == 429 and self._config.retry_after_s is not None:
            headers["Retry-After"] = f"{self._config.retry_after_s:g}"
        if refusal.http_status >= 500:
            page = f"<html><body>{refusal.text}</body></html>"
            return web.Response(status=refusal.http_status, text=page, content_type="text/html")
        document = {"status": False, "message": refusal.text}
        return web.Response(
            status=refusal.http_status,
            body=orjson.dumps(document),
            headers=headers,
            content_type="application/json",
        )

    async def handle_resend(self, request: web.Request) -> web.Response:
        """GET /api/resend-message?id=: sends an accepted message again (counted again)."""
        try:
            self._check_auth(request.headers.get("Authorization") or request.query.get("token"))
        except Refusal as refusal:
            return self._refuse(refusal)
        phone = self._traffic.sent_ids.get(request.query.get("id", ""))
        if phone is None:
            return json_response({"status": False, "message": "message not found"})
        self._traffic.accepted += 1
        self._traffic.accepted_by_recipient[phone] += 1
        return json_response({"status": True, "message": "message resent"})

    async def handle_device_info(self, request: web.Request) -> web.Response:
        """GET /api/device/info?token=: works with the bare token only, per one integration."""
        if request.query.get("token") not in self._config.tokens:
            return json_response({"status": False, "message": TOKEN_REFUSAL})
        connected = self._config.device_connected
        device = {
            "status": "connected" if connected else "disconnected",
            "quota": self._quota,
            "expired_date": "2099-12-31",
            "name": "sandbox",
            "sender": "6280000000000",
            "package": "sandbox",
            "active": connected,
            "serial": DEVICE_ID,
        }
        return json_response({"status": True, "data": device})

    def stats(self) -> dict[str, object]:
        """The common counters, and what Wablas' batches and quota add."""
        traffic = self._traffic
        return {
            **super().stats(),
            "accepted_requests": traffic.accepted_requests,
            "failed_items_by_status": traffic.failed_items_by_status,
            "batch_sizes": {str(size): n for size, n in traffic.batch_sizes.items()},
            "quota": self._quota,
        }

    async def handle_inbound(self, request: web.Request) -> web.Response:
        """POST /_sandbox/inbound {"from": digits, "text": ...}: a person writes to the device;
        the message is posted to its incoming-message URL (with ?secret=, JSON or form as the
        tracking knobs say) before this answers, with the status the endpoint gave."""
        sender, text = await read_inbound_request(request)
        url = self._config.incoming_webhook_url or self._config.webhook_url
        return await post_now(
            url, self._webhook_format(url or "").encode([incoming_event(sender, text)])
        )

    def _webhook_format(self, url: str) -> TrackingPosts:
        config = self._config
        return TrackingPosts(
            url, config.webhook_secret, config.webhook_form, config.webhook_batch_max
        )


def build_wablas_app(
    config: WablasSandboxConfig, now: Callable[[], float] = time.monotonic
) -> web.Application:
    """The emulator as an aiohttp app; mount it under a prefix or serve it alone."""
    sandbox = WablasSandbox(config, now)
    app = web.Application()
    app.router.add_post("/api/v2/send-message", sandbox.handle_bulk)
    app.router.add_post("/api/v2/send-video", sandbox.handle_bulk)
    app.router.add_post("/api/send-message", sandbox.handle_single)
    app.router.add_get("/api/send-message", sandbox.handle_single)
    app.router.add_post("/api/send-video", sandbox.handle_single)
    app.router.add_get("/api/resend-message", sandbox.handle_resend)
    app.router.add_get("/api/device/info", sandbox.handle_device_info)
    app.router.add_post("/_sandbox/inbound", sandbox.handle_inbound)
    sandbox.add_control_routes(app)
    return app
