"""What both video emulators do alike around their render jobs: create and find them, refuse
requests, serve the rendered files, post the terminal webhooks and show the control views.

Routes every video emulator gets (beside the base's /_sandbox/stats|recipients|arrivals|config|
reset):
- GET /_files/{job_id}.mp4?Expires=<unix s>: the video (a tiny valid mp4, video/mp4) once the
  job is done; 404 (S3's NoSuchKey XML) before; 403 (S3's AccessDenied XML) once Expires is
  past or the job's fault is `expired_link`. No authentication, like a pre-signed S3 link.
- GET /_sandbox/jobs: every job, oldest first: [{id, reference, status, created_at, done_at,
  polls, fault}]; status is created|started|done|error|rejected, created_at and done_at are
  wall-clock (time.time()) seconds, done_at null until the job ended, polls counts the GETs of
  that job, fault the per-job fault kind or null.
- /_sandbox/recipients counts the jobs created per reference, /_sandbox/arrivals lists their
  creation times (on the emulator's clock).
- /_sandbox/stats adds `created` (jobs created), `polls` (GETs of single jobs, unknown ids
  included) and `webhook_events_withheld` (webhooks not sent by `webhook_drop_p`); its
  `duplicates` is {reference: jobs created} for references created more than once.
- POST /_sandbox/reset also forgets every job (GETs of them answer not found) and the webhooks
  of jobs not ended yet.

A webhook is queued when its job ends (an event-loop timer, not a poll), `webhook_delay_ms`
later, `webhook_repeats` times unless `webhook_drop_p` withholds it; its body is the job as
the provider shows it at the moment of posting. Failed POSTs are retried like every
emulator's (`webhook_attempts`, `webhook_retry_initial_ms`).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import orjson
from aiohttp import web
from yarl import URL

from blastd.sandbox.emulator import Emulator, Traffic, json_response
from blastd.sandbox.renders import (
    EXPIRED_LINK,
    RESULT_MP4,
    NewJob,
    RenderConfig,
    RenderJob,
    RequestFault,
    draw_render_s,
    render_status,
)
from blastd.sandbox.webhooks import WebhookPost, WebhookTarget

TRANSIENT_STATUSES = (500, 502, 503)  # rotated, so one knob covers them all
FILE_ROUTE = "render_file"
JSON_HEADERS = {"Content-Type": "application/json"}
S3_ERROR = (
    "<?xml version='1.0' encoding='UTF-8'?><Error><Code>{}</Code><Message>{}</Message></Error>"
)

ConfigT = TypeVar("ConfigT", bound=RenderConfig)


class Refusal(Exception):
    """An answer other than the one asked for; counted as http_<status> in the stats."""

    def __init__(
        self, status: int, body: bytes, headers: dict[str, str] | None = None, *, is_json: bool
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.is_json = is_json

    def response(self) -> web.Response:
        content_type = "application/json" if self.is_json else "text/html"
        return web.Response(
            status=self.status, body=self.body, headers=self.headers, content_type=content_type
        )


@dataclass(slots=True)
class RenderTraffic(Traffic):
    """The base counters (`accepted` = jobs created, by reference), and the reads."""

    polls: int = 0
    webhooks_withheld: int = 0


@dataclass(frozen=True, slots=True)
class JobPost:
    """Each ended job in a JSON POST of its own, to the webhook URL it named at creation."""

    render: Callable[[RenderJob], dict[str, object]]

    @property
    def batch_max(self) -> int:
        return 1

    def encode(self, batch: Sequence[RenderJob]) -> WebhookPost:
        """The POST of the batch's one job, as the provider shows it now."""
        (job,) = batch
        assert job.new.webhook_url is not None, "only jobs naming a webhook URL are queued"
        return WebhookPost(job.new.webhook_url, orjson.dumps(self.render(job)), JSON_HEADERS)


class RenderSandbox(Emulator[ConfigT, RenderTraffic, RenderJob]):
    """A video emulator's jobs, their timers and webhooks, and the shared request handling."""

    webhook_noun = "events"

    def __init__(self, config: ConfigT, now: Callable[[], float]) -> None:
        super().__init__(config, now, RenderTraffic)
        self._jobs: dict[str, RenderJob] = {}
        self._end_timers: dict[str, asyncio.TimerHandle] = {}

    @abstractmethod
    def _authenticate(self, request: web.Request) -> None:
        """Raise the provider's 401 unless the request carries a valid credential."""

    @abstractmethod
    def _refusal(self, status: int, kind: str, text: str) -> Refusal:
        """The provider's error answer; `kind` is D-ID's error kind for it."""

    @abstractmethod
    def _admit(self, request: web.Request, raw_body: bytes) -> NewJob:
        """The job a create request asks for; raise the 400 (or 402) it gets instead."""

    @abstractmethod
    def _created(self, job: RenderJob) -> web.Response:
        """The answer to a create that made `job`."""

    @abstractmethod
    def _webhook_document(self, job: RenderJob) -> dict[str, object]:
        """The body of the job's terminal webhook."""

    def _on_end(self, job: RenderJob) -> None:
        """What else the provider does when a job ends (D-ID refunds failed renders)."""

    def _webhook_format(self, url: str) -> JobPost:
        """The base calls this only from `_webhook_target`, overridden below: jobs post to
        URLs of their own, so the webhook_url knob names none."""
        return JobPost(self._webhook_document)

    def _webhook_target(self) -> WebhookTarget[RenderJob]:
        config = self._config
        return WebhookTarget(
            format=JobPost(self._webhook_document),
            attempts=config.webhook_attempts,
            retry_initial_s=config.webhook_retry_initial_ms / 1000.0,
        )

    def add_render_routes(self, app: web.Application) -> None:
        """The file links, /_sandbox/jobs, the base's control routes and the timers' lifetime."""
        app.router.add_get("/_files/{job_id}.mp4", self.handle_file, name=FILE_ROUTE)
        app.router.add_get("/_sandbox/jobs", self.handle_jobs)
        self.add_control_routes(app)
        app.cleanup_ctx.append(self._cancel_timers_at_exit)

    async def serve(self, answer: Awaitable[web.Response]) -> web.Response:
        """Count an API request, turn a Refusal into its answer, then add the latency knobs."""
        self._traffic.requests += 1
        try:
            response = await answer
        except Refusal as refusal:
            self._traffic.rejected_by_code[f"http_{refusal.status}"] += 1
            response = refusal.response()
        if self._config.latency_ms or self._config.latency_jitter_ms:
            await asyncio.sleep(self._latency_s())
        return response

    async def create(self, request: web.Request) -> web.Response:
        """Authenticate, draw a fault, admit the body, create the job and answer for it."""
        self._authenticate(request)
        fault = self._draw_fault(self._config.fault_slices())
        self._refuse_drawn(fault)
        if self._config.forbidden:
            raise self._refusal(403, "PermissionDeniedError", "permission denied")
        job = self._add_job(request, self._admit(request, await request.read()))
        if fault == "after_create":
            raise self._transient_refusal()
        response = self._created(job)
        if fault == "malformed" and isinstance(response.body, bytes):
            response.body = response.body[: len(response.body) // 2]
        return response

    def guard_read(self, request: web.Request) -> None:
        """Authenticate a read and give it the request faults reads get."""
        self._authenticate(request)
        self._refuse_drawn(self._draw_fault(self._config.fault_slices()[:2]))

    def poll(self, job_id: str) -> RenderJob | None:
        """The job a GET names, counted as a poll of it."""
        self._traffic.polls += 1
        job = self._jobs.get(job_id)
        if job is not None:
            job.polls += 1
        return job

    def link(self, job: RenderJob) -> str:
        """The job's video link as given now: it expires `link_ttl_s` from now."""
        expires = int(time.time() + self._config.link_ttl_s)
        return str(URL(job.file_url).with_query(Expires=str(expires)))

    def _refuse_drawn(self, fault: RequestFault | None) -> None:
        if fault == "transient":
            raise self._transient_refusal()
        if fault == "throttled":
            refusal = self._refusal(429, "TooManyRequestsError", "Too Many Requests")
            if self._config.retry_after_s is not None:
                refusal.headers["Retry-After"] = f"{self._config.retry_after_s:g}"
            raise refusal

    def _transient_refusal(self) -> Refusal:
        status = TRANSIENT_STATUSES[self._turn("transient") % len(TRANSIENT_STATUSES)]
        page = f"<html><body>{status} injected fault</body></html>".encode()
        return Refusal(status, page, is_json=False)

    def _add_job(self, request: web.Request, new: NewJob) -> RenderJob:
        config = self._config
        if new.reference is not None and new.reference in config.fail_by_reference:
            fault: str | None = config.fail_by_reference[new.reference]
        else:
            fault = self._draw_fault(config.render_fault_slices())
        job_id = self._new_job_id(new.id_prefix)
        file_path = request.app.router[FILE_ROUTE].url_for(job_id=job_id)
        job = RenderJob(
            job_id=job_id,
            new=new,
            fault=fault,
            finishes=fault not in config.unfinished_faults,
            render_s=draw_render_s(config, self._rng),
            created_s=self._now(),
            created_at=time.time(),
            file_url=str(request.url.origin().join(file_path)),
        )
        self._record(job)
        return job

    def _new_job_id(self, prefix: str) -> str:
        while (job_id := prefix + secrets.token_urlsafe(16)) in self._jobs:
            pass
        return job_id

    def _record(self, job: RenderJob) -> None:
        self._jobs[job.job_id] = job
        traffic = self._traffic
        traffic.accepted += 1
        traffic.arrivals.append(job.created_s)
        if job.new.reference is not None:
            traffic.accepted_by_recipient[job.new.reference] += 1
        if job.finishes:
            loop = asyncio.get_running_loop()
            self._end_timers[job.job_id] = loop.call_later(job.render_s, self._end, job)

    def _end(self, job: RenderJob) -> None:
        del self._end_timers[job.job_id]
        self._on_end(job)
        config = self._config
        if job.new.webhook_url is None:
            return
        if config.webhook_drop_p and self._rng.random() < config.webhook_drop_p:
            self._traffic.webhooks_withheld += 1
            return
        for _ in range(config.webhook_repeats):
            self.outbox.put(job, config.webhook_delay_ms / 1000.0)

    async def handle_file(self, request: web.Request) -> web.Response:
        job = self._jobs.get(request.match_info["job_id"])
        if job is None or render_status(self._config, job, job.phase(self._now())) != "done":
            return _s3_error(404, "NoSuchKey", "The specified key does not exist.")
        try:
            expires = int(request.query["Expires"])
        except (KeyError, ValueError):
            return _s3_error(403, "AccessDenied", "Query-string authentication requires Expires")
        if job.fault == EXPIRED_LINK or expires <= time.time():
            return _s3_error(403, "AccessDenied", "Request has expired")
        return web.Response(body=RESULT_MP4, content_type="video/mp4")

    async def handle_jobs(self, request: web.Request) -> web.Response:
        now_s = self._now()
        return json_response([self._job_row(job, now_s) for job in self._jobs.values()])

    def _job_row(self, job: RenderJob, now_s: float) -> dict[str, object]:
        phase = job.phase(now_s)
        return {
            "id": job.job_id,
            "reference": job.new.reference,
            "status": render_status(self._config, job, phase),
            "created_at": job.created_at,
            "done_at": job.done_at if phase == "ended" else None,
            "polls": job.polls,
            "fault": job.fault,
        }

    def stats(self) -> dict[str, object]:
        traffic = self._traffic
        return {
            **super().stats(),
            "created": traffic.accepted,
            "polls": traffic.polls,
            "webhook_events_withheld": traffic.webhooks_withheld,
        }

    def reset(self) -> None:
        """Forget all traffic and every job; webhooks already queued still go."""
        super().reset()
        self._cancel_timers()
        self._jobs.clear()

    def _cancel_timers(self) -> None:
        for timer in self._end_timers.values():
            timer.cancel()
        self._end_timers.clear()

    async def _cancel_timers_at_exit(self, app: web.Application) -> AsyncIterator[None]:
        yield
        self._cancel_timers()


def _s3_error(status: int, code: str, message: str) -> web.Response:
    body = S3_ERROR.format(code, message).encode()
    return web.Response(status=status, body=body, content_type="application/xml")
