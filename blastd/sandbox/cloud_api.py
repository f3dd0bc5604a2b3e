"""Emulates the WhatsApp Cloud API messages endpoint on loopback, with knobs for its failures.

Faithful to docs/providers.md and docs/errors.md (error envelope, codes, limits, webhooks) and to
Meta's OpenAPI spec for POST /{Version}/{Phone-Number-ID}/messages. Control endpoints under
/_sandbox/ expose what arrived so tests and benchmarks can check it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import orjson
from aiohttp import web
from pydantic import Field, field_validator

from blastd.sandbox.cloud_api_marketing import check_marketing_request
from blastd.sandbox.cloud_api_requests import (
    GRAPH_ERRORS,
    UNKNOWN_ERROR,
    Rejection,
    SendRequest,
    check_phone_number_id,
    check_version,
    read_message,
)
from blastd.sandbox.cloud_api_webhooks import (
    SignedStatuses,
    Status,
    post_inbound,
    status_event,
)
from blastd.sandbox.emulator import (
    ByNumber,
    Emulator,
    EmulatorConfig,
    NumberSet,
    Probability,
    Traffic,
)

DEFAULT_TEMPLATES = {("promo_nov", "id"): 2, ("hello_world", "en_US"): 0}
DEFAULT_API_VERSIONS = ("v21.0", "v22.0", "v23.0", "v24.0")
DEFAULT_PHONE_NUMBER_IDS = frozenset({"100000000000001"})
RATE_WINDOW_S = 1.0


FaultKind = Literal["transient", "throttled", "pair_limit", "quality", "permanent", "fatal"]
FAULT_CODES: dict[FaultKind, tuple[int, ...]] = {
    "transient": (131000, 131016, 2),  # rotated, so one knob covers 500 and both 503s
    "throttled": (130429,),
    "pair_limit": (131056,),
    "quality": (131048,),
    "permanent": (131026,),
    "fatal": (190,),
}
MALFORMED_BODIES = (  # rotated: a cut-off body, then valid JSON without a message id
    b'{"messaging_product":"whatsapp","contacts":[',
    b'{"messaging_product":"whatsapp","contacts":[],"messages":[]}',
)


HOLD_POLL_S = 0.05  # how often a withheld answer looks whether its client is still there


class SandboxConfig(EmulatorConfig):
    """Every knob of the Cloud API emulator; POST /_sandbox/config replaces any subset."""

    templates: dict[tuple[str, str], int] = Field(default_factory=lambda: dict(DEFAULT_TEMPLATES))
    api_versions: tuple[str, ...] = DEFAULT_API_VERSIONS  # others: Graph's version errors
    phone_number_ids: frozenset[str] = DEFAULT_PHONE_NUMBER_IDS  # the numbers this sandbox hosts
    rate_per_s: float = Field(0.0, ge=0)  # accepted sends per phone_number_id; 0 means no limit
    pair_limit: bool = False
    pair_interval_s: float = Field(6.0, gt=0)  # one token per interval for each recipient
    pair_burst: int = Field(45, ge=1)
    pair_limit_p: Probability = 0.0
    quality_p: Probability = 0.0
    permanent_p: Probability = 0.0
    fatal_p: Probability = 0.0
    # recipient digits -> Graph code answered synchronously
    fail_numbers: ByNumber[int] = Field(default_factory=dict)
    # recipient digits -> bare HTTP status, no Graph body
    fail_numbers_http: ByNumber[int] = Field(default_factory=dict)
    # recipient digits -> code in a failed webhook
    async_fail_numbers: ByNumber[int] = Field(default_factory=dict)
    # recipient digits -> Graph code answered to video messages only (e.g. 131053, media
    # download failed), so a fallback to text can be shown
    fail_video_numbers: ByNumber[int] = Field(default_factory=dict)
    app_secret: str = "sandbox-app-secret"
    webhook_statuses: tuple[Literal["sent", "delivered", "read"], ...] = (
        "sent",
        "delivered",
        "read",
    )
    webhook_batch_max: int = Field(100, ge=1)  # statuses per POST: Meta batches too
    # Answers lost on the way back: the message is accepted and counted (and its statuses
    # queued), then its answer waits withhold_answer_ms, longer than any client's timeout by
    # default (never seen); a shorter one makes a late answer.
    withhold_answer_p: Probability = 0.0
    withhold_numbers: NumberSet = frozenset()  # recipient digits whose answers are withheld
    withhold_answer_ms: float = Field(3_600_000.0, ge=0)
    # How a withheld answer is lost: held back (delay), the connection closed without an
    # answer (disconnect), or the answer's body cut short and the connection closed (truncate).
    withhold_mode: Literal["delay", "disconnect", "truncate"] = "delay"
    webhook_duplicate_p: Probability = 0.0  # a status posted twice, as Meta's retries do
    webhook_reorder: bool = False  # a message's statuses queued newest first (read, ..., sent)
    webhook_omit_callback_data: bool = False  # statuses without biz_opaque_callback_data

    @field_validator("templates", mode="before")
    @classmethod
    def _read_template_list(cls, value: object) -> object:
        """JSON has no tuple keys: accept [{"name", "language", "param_count"}, ...] too."""
        if not isinstance(value, list):
            return value
        return {(item["name"], item["language"]): item["param_count"] for item in value}

    def fault_slices(self) -> list[tuple[float, FaultKind]]:
        """Each fault class with its probability; one draw picks at most one of them."""
        return [
            (self.transient_p, "transient"),
            (self.throttled_p, "throttled"),
            (self.pair_limit_p, "pair_limit"),
            (self.quality_p, "quality"),
            (self.permanent_p, "permanent"),
            (self.fatal_p, "fatal"),
        ]


def _active_faults(config: SandboxConfig) -> list[tuple[float, FaultKind]]:
    return [(probability, kind) for probability, kind in config.fault_slices() if probability]


@dataclass(slots=True)
class _CloudTraffic(Traffic):
    """The counters, and the limiters' state."""

    rate_windows: dict[str, deque[float]] = field(default_factory=dict)
    pair_buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # tokens, at_s


class CloudApiSandbox(Emulator[SandboxConfig, _CloudTraffic, Status]):
    """The emulator's state and its request handlers."""

    def __init__(self, config: SandboxConfig, now: Callable[[], float]) -> None:
        super().__init__(config, now, _CloudTraffic)
        self._faults = _active_faults(config)

    def apply(self, config: SandboxConfig) -> None:
        """Switch to new knobs; counters and limiter state carry on."""
        super().apply(config)
        self._faults = _active_faults(config)

    async def handle_send(self, request: web.Request) -> web.StreamResponse:
        arrived_s = self._now()
        self._traffic.requests += 1
        raw_body = await request.read()
        phone_number_id = request.match_info["phone_number_id"]
        withheld = False
        try:
            authorization = request.headers.get("Authorization")
            self._check_path(request.match_info["version"], phone_number_id, authorization)
            response, withheld = self._accept(phone_number_id, authorization, raw_body, arrived_s)
        except Rejection as rejection:
            response = self._reject(rejection)
        if withheld:
            self._traffic.turns["withheld"] += 1  # shown as answers_withheld
            if self._config.withhold_mode != "delay":
                return await _lose_answer(request, response, self._config.withhold_mode)
            await _hold_answer(request, self._config.withhold_answer_ms / 1000.0)
        if self._config.latency_ms or self._config.latency_jitter_ms:
            await asyncio.sleep(self._latency_s())
        return response

    def _check_path(self, version: str, phone_number_id: str, authorization: str | None) -> None:
        """Graph reads the path before the token, and looks the object up after it."""
        check_version(version, phone_number_id, self._config.api_versions)
        if not self._is_authorized(authorization):
            raise Rejection(190, "the access token is not valid")
        check_phone_number_id(phone_number_id, self._config.phone_number_ids)

    def _accept(
        self, phone_number_id: str, authorization: str | None, raw_body: bytes, now_s: float
    ) -> tuple[web.Response, bool]:
        """The answer to an accepted message, and whether to withhold it."""
        message = read_message(raw_body, self._config.templates)
        self._inject_faults(message.wa_id)
        video_code = self._config.fail_video_numbers.get(message.wa_id)
        if message.type == "video" and video_code is not None:
            raise Rejection(video_code, "failure configured for videos to this recipient")
        self._admit(phone_number_id, message.wa_id, now_s)
        message_id = "wamid." + base64.urlsafe_b64encode(self._rng.randbytes(18)).decode()
        self._record_accepted(phone_number_id, message, message_id, now_s)
        withheld = self._is_withheld(message.wa_id)
        if self._config.malformed_body_p and self._rng.random() < self._config.malformed_body_p:
            body = MALFORMED_BODIES[self._turn("malformed") % len(MALFORMED_BODIES)]
            return web.Response(body=body, content_type="application/json"), withheld
        body = _success_body(message, message_id)
        return web.Response(body=body, content_type="application/json"), withheld

    def _is_withheld(self, wa_id: str) -> bool:
        config = self._config
        if wa_id in config.withhold_numbers:
            return True
        return bool(config.withhold_answer_p) and self._rng.random() < config.withhold_answer_p

    async def handle_phone_number(self, request: web.Request) -> web.Response:
        """GET /{version}/{phone_number_id}: the number's profile, as `blastd check` reads it
        to prove the token works without sending anything."""
        number_id = request.match_info["phone_number_id"]
        try:
            self._check_path(
                request.match_info["version"], number_id, request.headers.get("Authorization")
            )
        except Rejection as rejection:
            return self._reject(rejection)
        profile = {
            "id": number_id,
            "display_phone_number": "+1 555 0100",
            "verified_name": "Sandbox",
        }
        return web.json_response({**profile, "quality_rating": "GREEN"})

    def _is_authorized(self, authorization: str | None) -> bool:
        if authorization is None or not authorization.startswith("Bearer "):
            return False
        return authorization.removeprefix("Bearer ") in self._config.tokens

    def _inject_faults(self, wa_id: str) -> None:
        code = self._config.fail_numbers.get(wa_id)
        if code is not None:
            raise Rejection(code, "failure configured for this recipient")
        http_status = self._config.fail_numbers_http.get(wa_id)
        if http_status is not None:
            raise Rejection(None, http_status=http_status)
        kind = self._draw_fault(self._faults)
        if kind is not None:
            codes = FAULT_CODES[kind]
            raise Rejection(codes[self._turn(kind) % len(codes)], "injected fault")

    def _admit(self, phone_number_id: str, wa_id: str, now_s: float) -> None:
        if not self._has_rate_room(phone_number_id, now_s):
            raise Rejection(130429, "throughput for this phone number exceeded")
        if self._config.pair_limit and not self._take_pair_token(wa_id, now_s):
            raise Rejection(131056, "too many messages to this recipient recently")

    def _has_rate_room(self, phone_number_id: str, now_s: float) -> bool:
        if not self._config.rate_per_s:
            return True
        window = self._traffic.rate_windows.setdefault(phone_number_id, deque())
        while window and now_s - window[0] >= RATE_WINDOW_S:
            window.popleft()
        return len(window) < self._config.rate_per_s

    def _take_pair_token(self, wa_id: str, now_s: float) -> bool:
        burst = float(self._config.pair_burst)
        tokens, updated_s = self._traffic.pair_buckets.get(wa_id, (burst, now_s))
        tokens = min(burst, tokens + (now_s - updated_s) / self._config.pair_interval_s)
        has_token = tokens >= 1.0
        self._traffic.pair_buckets[wa_id] = (tokens - 1.0 if has_token else tokens, now_s)
        return has_token

    def _record_accepted(
        self, phone_number_id: str, message: SendRequest, message_id: str, now_s: float
    ) -> None:
        traffic = self._traffic
        traffic.accepted += 1
        traffic.accepted_by_recipient[message.wa_id] += 1
        traffic.arrivals.append(now_s)
        if self._config.rate_per_s:
            traffic.rate_windows[phone_number_id].append(now_s)
        if self._config.webhook_url is not None:
            self._queue_statuses(phone_number_id, message, message_id)

    def _queue_statuses(self, phone_number_id: str, message: SendRequest, message_id: str) -> None:
        delay_s = self._config.webhook_delay_ms / 1000.0
        failure_code = self._config.async_fail_numbers.get(message.wa_id)
        if failure_code is not None:
            failure = (failure_code, GRAPH_ERRORS.get(failure_code, UNKNOWN_ERROR)[1])
            event = status_event(
                message_id, "failed", message.wa_id, message.callback_data, failure
            )
            self.outbox.put((phone_number_id, event), delay_s)
            return
        config = self._config
        callback_data = None if config.webhook_omit_callback_data else message.callback_data
        states = config.webhook_statuses
        for state in reversed(states) if config.webhook_reorder else states:
            event = status_event(message_id, state, message.wa_id, callback_data)
            self.outbox.put((phone_number_id, event), delay_s)
            if config.webhook_duplicate_p and self._rng.random() < config.webhook_duplicate_p:
                self.outbox.put((phone_number_id, event), delay_s)

    def _reject(self, rejection: Rejection) -> web.Response:
        if rejection.code is None:
            self._traffic.rejected_by_code[f"http_{rejection.http_status}"] += 1
            page = f"<html><body>HTTP {rejection.http_status}</body></html>"
            return web.Response(status=rejection.http_status, text=page, content_type="text/html")
        code = rejection.code
        self._traffic.rejected_by_code[str(code)] += 1
        http_status, title = GRAPH_ERRORS.get(code, UNKNOWN_ERROR)
        headers = {}
        if code == 130429 and self._config.retry_after_s is not None:
            headers["Retry-After"] = f"{self._config.retry_after_s:g}"
        error: dict[str, object] = {
            "message": rejection.message or f"(#{code}) {title}",
            "type": "GraphMethodException" if rejection.subcode else "OAuthException",
            "code": code,
            "error_data": {"messaging_product": "whatsapp", "details": rejection.details},
            "fbtrace_id": f"A{self._rng.getrandbits(64):016x}",
        }
        if rejection.subcode is not None:
            error["error_subcode"] = rejection.subcode
        body = orjson.dumps({"error": error})
        return web.Response(
            status=http_status, body=body, headers=headers, content_type="application/json"
        )

    async def handle_marketing_send(self, request: web.Request) -> web.StreamResponse:
        """POST /marketing_messages: /messages' emulation, for what this endpoint takes."""
        try:
            check_marketing_request(await request.read())
        except Rejection as rejection:
            self._traffic.requests += 1
            return self._reject(rejection)
        self._traffic.turns["marketing_messages"] += 1
        return await self.handle_send(request)

    def stats(self) -> dict[str, object]:
        marketing = self._traffic.turns["marketing_messages"]
        return {**super().stats(), "marketing_messages": marketing}

    async def handle_inbound(self, request: web.Request) -> web.Response:
        return await post_inbound(request, self._config.webhook_url, self._config.app_secret)

    def _webhook_format(self, url: str) -> SignedStatuses:
        return SignedStatuses(url, self._config.app_secret, self._config.webhook_batch_max)


async def _hold_answer(request: web.Request, hold_s: float) -> None:
    """Wait `hold_s`, or until the client gave up and closed the connection: a handler left
    sleeping would hold up the sandbox's shutdown."""
    deadline = asyncio.get_running_loop().time() + hold_s
    while (left_s := deadline - asyncio.get_running_loop().time()) > 0:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(min(left_s, HOLD_POLL_S))


async def _lose_answer(
    request: web.Request, response: web.Response, mode: str
) -> web.StreamResponse:
    """Close the connection without the answer, or after a part of its body."""
    transport = request.transport
    if mode == "disconnect" or transport is None:
        if transport is not None:
            transport.close()
        return response
    body = response.body if isinstance(response.body, bytes) else b""
    cut = web.StreamResponse(headers={"Content-Type": "application/json"})
    cut.content_length = len(body) + 100  # promises more than ever comes
    await cut.prepare(request)
    await cut.write(body[: len(body) // 2])
    transport.close()
    return cut


def _success_body(message: SendRequest, message_id: str) -> bytes:
    sent: dict[str, str] = {"id": message_id}
    if message.type == "template":
        sent["message_status"] = "accepted"
    contact = {"input": message.to, "wa_id": message.wa_id}
    return orjson.dumps(
        {"messaging_product": "whatsapp", "contacts": [contact], "messages": [sent]}
    )


def build_app(config: SandboxConfig, now: Callable[[], float] = time.monotonic) -> web.Application:
    """The emulator as an aiohttp app; `now` drives the rate and pair limiters."""
    sandbox = CloudApiSandbox(config, now)
    app = web.Application()
    app.router.add_post("/{version}/{phone_number_id}/messages", sandbox.handle_send)
    app.router.add_post(
        "/{version}/{phone_number_id}/marketing_messages", sandbox.handle_marketing_send
    )
    app.router.add_get("/{version}/{phone_number_id}", sandbox.handle_phone_number)
    sandbox.add_control_routes(app)
    app.router.add_post("/_sandbox/inbound", sandbox.handle_inbound)
    return app


@contextlib.asynccontextmanager
async def listening(app: web.Application, host: str, port: int) -> AsyncIterator[str]:
    """Serve `app` until the block exits; yields its base URL (port 0 picks a free port)."""
    runner = web.AppRunner(app, access_log=None)  # no per-request logging: benchmarks
    await runner.setup()
    try:
        # a deep backlog: benchmarks open hundreds of connections at once
        await web.TCPSite(runner, host, port, backlog=1024).start()
        bound_port = runner.addresses[0][1]
        yield f"http://{host}:{bound_port}"
    finally:
        await runner.cleanup()


async def serve(
    config: SandboxConfig,
    host: str,
    port: int,
    on_listening: Callable[[str], None] | None = None,
    mounts: Mapping[str, web.Application] | None = None,
) -> None:
    """Run the emulator until cancelled; `on_listening` hears the base URL once bound.

    `mounts` serves other providers' emulators on the same port, each under its prefix."""
    app = build_app(config)
    for prefix, provider_app in (mounts or {}).items():
        app.add_subapp(prefix, provider_app)
    async with listening(app, host, port) as base_url:
        if on_listening is not None:
            on_listening(base_url)
        await asyncio.Event().wait()
