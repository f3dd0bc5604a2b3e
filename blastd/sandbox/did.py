"""Emulates D-ID's clips and talks API on loopback (docs/providers.md, D-ID), mounted at
/did by `python -m blastd.sandbox`: an account's base_url is `{sandbox}/did`.

Endpoints (all need `Authorization: Basic <key>`, the key one of the `tokens` knob, as issued
or base64-encoded, per `auth_forms`; otherwise 401 {"kind":"AuthorizationError",...}):
- POST /clips (needs presenter_id; in `presenter_ids` when that is set) and POST /talks (needs
  an http(s) source_url); both need script {type:"text", input} or {type:"audio", audio_url}.
  201 {id:"clp_..."|"tlk_...", object:"clip"|"talk", created_at, created_by, status:"created"}.
  `user_data` (at most 1000 chars) is the job's reference; `webhook` is where it is posted
  when it ends. 400 {"kind":"BadRequestError","description"} for a body D-ID would refuse.
- GET /clips/{id}, GET /talks/{id}: the job object: id, object, status, created_at,
  created_by, user_data, name, presenter_id/driver_id or source_url, config, duration (video
  seconds); started_at once started; pending_url while created|started; when done result_url
  (a loopback link, `?Expires=<unix s>`, fresh on every read), completed_at, metadata
  {num_frames, processing_fps, resolution, size_kib}; when error, error {kind, description}
  with kind FaceError|SourceError|LogoError|DriverError|UnknownError; `rejected` adds nothing.
  404 {"kind":"NotFoundError",...} for an id this endpoint never created.
- GET /clips, GET /talks: {"clips": [job, ...]} / {"talks": [...]}, newest first, at most
  `?limit=` (default `list_limit`) job objects.
- GET /credits: {"credits":[{owner_id, remaining, total, expire_at}], "remaining", "total"}.

Account faults, in the order a create meets them: 401; 5xx before creating (`transient_p`:
500, 502, 503 in turn, an HTML page) or 429 (`throttled_p`, {"kind":"TooManyRequestsError"},
Retry-After when `retry_after_s` is set), both on reads too; 403 {"kind":
"PermissionDeniedError"} (`forbidden`); 400; 402 {"kind":"InsufficientCreditsError"} once
`credits` are used up (each create takes one; a job ending in `error` gives it back;
POST /_sandbox/reset gives all back);
then the job is created, and `create_5xx_after_create_p` answers 5xx anyway,
`malformed_body_p` a cut-off 201 body. The 402, 403 and 429 kinds are not confirmed.

Per-job faults (`render_fault_p`, `fail_by_reference` by user_data): the five error kinds,
`rejected`, `never_finish`, `expired_link`. Render times, webhooks, file links and the
/_sandbox/jobs view: see renders.py and render_sandbox.py. A webhook is the job object as GET
shows it, POSTed as JSON to the job's `webhook` on done, error and rejected (whether D-ID
calls on `rejected` is not confirmed); `webhook_user_data` false leaves user_data out.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from itertools import islice
from typing import ClassVar, Literal

import orjson
from aiohttp import web
from pydantic import Field

from blastd.sandbox.did_requests import (
    CREATED_BY,
    ERROR_DESCRIPTIONS,
    PREFIX_OF_KIND,
    BadRequest,
    created_document,
    echoed_fields,
    iso_time,
    job_document,
    read_job_fields,
)
from blastd.sandbox.emulator import json_response
from blastd.sandbox.render_sandbox import Refusal, RenderSandbox
from blastd.sandbox.renders import (
    EXPIRED_LINK,
    NEVER_FINISH,
    NewJob,
    RenderConfig,
    RenderJob,
    RenderStatus,
    render_status,
)

CREDITS_SHOWN_WHEN_UNLIMITED = 1_000_000
CREDITS_VALID_S = 30 * 86_400
KINDS = "{kind:clips|talks}"


class DidSandboxConfig(RenderConfig):
    """Every knob of the D-ID emulator; POST /_sandbox/config replaces any subset."""

    fault_kinds: ClassVar[frozenset[str]] = frozenset(
        {*ERROR_DESCRIPTIONS, "rejected", NEVER_FINISH, EXPIRED_LINK}
    )
    ended_status: ClassVar[dict[str, RenderStatus]] = {
        **{kind: "error" for kind in ERROR_DESCRIPTIONS},
        "rejected": "rejected",
    }

    auth_forms: frozenset[Literal["raw", "base64"]] = frozenset({"raw", "base64"})
    credits: int | None = Field(None, ge=0)  # None: unlimited
    presenter_ids: frozenset[str] | None = None  # presenters /clips knows; None: any
    list_limit: int = Field(100, ge=1)  # jobs a list answers without ?limit=


class DidSandbox(RenderSandbox[DidSandboxConfig]):
    """The emulator's jobs, credits and request handlers."""

    def __init__(self, config: DidSandboxConfig, now: Callable[[], float]) -> None:
        super().__init__(config, now)
        self._credits_used = 0

    def _authenticate(self, request: web.Request) -> None:
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic" or not self._is_known_key(credential.strip()):
            raise self._refusal(401, "AuthorizationError", "user unauthenticated")

    def _is_known_key(self, credential: str) -> bool:
        forms, tokens = self._config.auth_forms, self._config.tokens
        if "raw" in forms and credential in tokens:
            return True
        if "base64" not in forms:
            return False
        try:
            return base64.b64decode(credential, validate=True).decode() in tokens
        except (binascii.Error, UnicodeDecodeError):
            return False

    def _refusal(self, status: int, kind: str, text: str) -> Refusal:
        return Refusal(status, orjson.dumps({"kind": kind, "description": text}), is_json=True)

    def _admit(self, request: web.Request, raw_body: bytes) -> NewJob:
        kind = request.match_info["kind"]
        try:
            document = read_job_fields(kind, raw_body, self._config.presenter_ids)
        except BadRequest as exc:
            raise self._refusal(400, "BadRequestError", str(exc)) from exc
        if self._credits_left() <= 0:
            raise self._refusal(402, "InsufficientCreditsError", "not enough credits")
        self._credits_used += 1
        return NewJob(
            id_prefix=PREFIX_OF_KIND[kind],
            reference=document.get("user_data"),
            webhook_url=document.get("webhook"),
            fields=echoed_fields(kind, document),
        )

    def _credits_total(self) -> int:
        credits = self._config.credits
        return CREDITS_SHOWN_WHEN_UNLIMITED if credits is None else credits

    def _credits_left(self) -> int:
        return self._credits_total() - self._credits_used

    def _on_end(self, job: RenderJob) -> None:
        if render_status(self._config, job, "ended") == "error":
            self._credits_used -= 1  # D-ID does not bill failed renders

    def _created(self, job: RenderJob) -> web.Response:
        return json_response(created_document(job), status=201)

    def _document(self, job: RenderJob, *, with_user_data: bool = True) -> dict[str, object]:
        status = render_status(self._config, job, job.phase(self._now()))
        return job_document(job, status, self.link(job), with_user_data=with_user_data)

    def _webhook_document(self, job: RenderJob) -> dict[str, object]:
        return self._document(job, with_user_data=self._config.webhook_user_data)

    def reset(self) -> None:
        """Forget traffic and jobs; every credit is unused again."""
        super().reset()
        self._credits_used = 0

    async def handle_create(self, request: web.Request) -> web.Response:
        return await self.serve(self.create(request))

    async def handle_get(self, request: web.Request) -> web.Response:
        return await self.serve(self._get(request))

    async def _get(self, request: web.Request) -> web.Response:
        self.guard_read(request)
        job = self.poll(request.match_info["job_id"])
        if job is None or job.new.id_prefix != PREFIX_OF_KIND[request.match_info["kind"]]:
            raise self._refusal(404, "NotFoundError", "not found")
        return json_response(self._document(job))

    async def handle_list(self, request: web.Request) -> web.Response:
        return await self.serve(self._list(request))

    async def _list(self, request: web.Request) -> web.Response:
        self.guard_read(request)
        kind = request.match_info["kind"]
        try:
            limit = int(request.query.get("limit", self._config.list_limit))
        except ValueError:
            limit = 0
        if limit < 1:
            raise self._refusal(400, "BadRequestError", "limit must be a positive integer")
        prefix = PREFIX_OF_KIND[kind]
        newest_first = (job for job in reversed(self._jobs.values()) if job.new.id_prefix == prefix)
        return json_response({kind: [self._document(job) for job in islice(newest_first, limit)]})

    async def handle_credits(self, request: web.Request) -> web.Response:
        return await self.serve(self._credits(request))

    async def _credits(self, request: web.Request) -> web.Response:
        self.guard_read(request)
        left, total = self._credits_left(), self._credits_total()
        expire_at = iso_time(time.time() + CREDITS_VALID_S)
        grant = {"owner_id": CREATED_BY, "remaining": left, "total": total, "expire_at": expire_at}
        return json_response({"credits": [grant], "remaining": left, "total": total})


def build_did_app(
    config: DidSandboxConfig, now: Callable[[], float] = time.monotonic
) -> web.Application:
    """The emulator as an aiohttp app, to be served alone or mounted at /did."""
    sandbox = DidSandbox(config, now)
    app = web.Application()
    app.router.add_post(f"/{KINDS}", sandbox.handle_create)
    app.router.add_get(f"/{KINDS}", sandbox.handle_list)
    app.router.add_get(f"/{KINDS}/{{job_id}}", sandbox.handle_get)
    app.router.add_get("/credits", sandbox.handle_credits)
    sandbox.add_render_routes(app)
    return app
