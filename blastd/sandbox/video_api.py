"""Emulates the generic async video-job API (docs/providers.md, generic video-job API) on
loopback, every path and field name a knob, mounted at /video by `python -m blastd.sandbox`:
an account's base_url is `{sandbox}/video`. Defaults follow the API as the systems blastd
replaces used it.

Endpoints (both need the header `auth_header` with the value `auth_template`, "{api_key}"
replaced by one of the `tokens`; otherwise 401 {error_field: "unauthorized"}). Paths and
fields are read at every request, so POST /_sandbox/config switches dialects at once:
- POST `submit_path` (default /job), a JSON object with every `required_fields` field (default
  script) non-empty, else 400 {error_field: "<field> is required"}. The body's
  `reference_field` (default reference) is the job's reference; `callback_field` (default
  callbackUrl), an http(s) URL, is where the job is posted when it ends. Answers
  `submit_http_status` (default 200) with the job id at the dotted path `job_id_field`
  (default jobId): {"jobId": "job_..."}.
- GET `status_path` (default /job/{job_id}): {status_field: `status_processing`} while the job
  renders (`status_unknown` instead when that is set); {status_field: `status_completed`,
  url_field: <loopback link, ?Expires=<unix s>, fresh on every read>} when done;
  {status_field: `status_failed`, error_field: "render crashed"} when failed. Field names are
  dotted paths (default status, videoUrl, error). For an unknown job: {status_field:
  `status_not_found`}, or with `http_404_for_not_found` HTTP 404 {error_field: "job not found"}.

Per-job faults (`render_fault_p`, `fail_by_reference` by reference): `failed`, `not_found`
(not found for ever), `not_found_at_first` (not found for its first `not_found_first_polls`
polls, then as usual: an eventually consistent job store), `never_finish`, `expired_link`.
Account faults: 5xx before creating (`transient_p`, an HTML page, 500/502/503 in turn) and 429
(`throttled_p`, {error_field: ...}, Retry-After when `retry_after_s` is set) on both
endpoints; on submits 403 (`forbidden`), 5xx after creating (`create_5xx_after_create_p`: the
duplicate risk) and a cut-off 2xx body (`malformed_body_p`). `latency_ms` slows every answer.

Callbacks: when a job ends (completed or failed) and its submit named a callback URL, the
status document plus the job id at `job_id_field` and (unless `webhook_user_data` is false)
the reference at `reference_field` is POSTed there as JSON. Render times, file links and the
/_sandbox/jobs view: see renders.py and render_sandbox.py.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Self

import orjson
from aiohttp import web
from pydantic import Field, model_validator

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

NOT_FOUND = "not_found"
NOT_FOUND_AT_FIRST = "not_found_at_first"
FAILED_TEXT = "render crashed"  # the example error of that API
JOB_ID_PREFIX = "job_"


class VideoApiSandboxConfig(RenderConfig):
    """Every knob of the generic video-job emulator; POST /_sandbox/config replaces any subset."""

    fault_kinds: ClassVar[frozenset[str]] = frozenset(
        {"failed", NOT_FOUND, NOT_FOUND_AT_FIRST, NEVER_FINISH, EXPIRED_LINK}
    )
    ended_status: ClassVar[dict[str, RenderStatus]] = {"failed": "error"}
    unfinished_faults: ClassVar[frozenset[str]] = frozenset({NEVER_FINISH, NOT_FOUND})

    auth_header: str = "X-API-Key"
    auth_template: str = "{api_key}"  # e.g. "Bearer {api_key}"
    submit_path: str = "/job"
    submit_http_status: Literal[200, 201, 202] = 200
    status_path: str = "/job/{job_id}"
    required_fields: tuple[str, ...] = ("script",)
    reference_field: str = "reference"
    callback_field: str = "callbackUrl"
    job_id_field: str = "jobId"  # dotted paths into the JSON documents
    status_field: str = "status"
    url_field: str = "videoUrl"
    error_field: str = "error"
    status_processing: str = "processing"
    status_completed: str = "completed"
    status_failed: str = "failed"
    status_not_found: str = "not_found"
    status_unknown: str | None = None  # answered instead of status_processing when set
    http_404_for_not_found: bool = False
    not_found_first_polls: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _check_paths(self) -> Self:
        if "{api_key}" not in self.auth_template:
            raise ValueError("auth_template must contain {api_key}")
        if not self.submit_path.startswith("/"):
            raise ValueError("submit_path must start with /")
        if not self.status_path.startswith("/") or self.status_path.count("{job_id}") != 1:
            raise ValueError("status_path must start with / and contain {job_id} once")
        return self


class VideoApiSandbox(RenderSandbox[VideoApiSandboxConfig]):
    """The emulator's jobs and request handlers, routed by the dialect knobs."""

    def _authenticate(self, request: web.Request) -> None:
        config = self._config
        given = request.headers.get(config.auth_header)
        accepted = {config.auth_template.replace("{api_key}", token) for token in config.tokens}
        if given not in accepted:
            raise self._refusal(401, "AuthorizationError", "unauthorized")

    def _refusal(self, status: int, kind: str, text: str) -> Refusal:
        return Refusal(status, orjson.dumps(self._at(self._config.error_field, text)), is_json=True)

    def _admit(self, request: web.Request, raw_body: bytes) -> NewJob:
        config = self._config
        document = _json_object(raw_body)
        if document is None:
            raise self._refusal(400, "BadRequestError", "the body must be a JSON object")
        for name in config.required_fields:
            if document.get(name) in (None, ""):
                raise self._refusal(400, "BadRequestError", f"{name} is required")
        callback = document.get(config.callback_field) or None
        if callback is not None and not _is_http_url(callback):
            raise self._refusal(400, "BadRequestError", f"{config.callback_field} must be a URL")
        reference = document.get(config.reference_field)
        return NewJob(
            id_prefix=JOB_ID_PREFIX,
            reference=reference if isinstance(reference, str) and reference else None,
            webhook_url=callback,
            fields={},
        )

    def _created(self, job: RenderJob) -> web.Response:
        document = self._at(self._config.job_id_field, job.job_id)
        return json_response(document, status=self._config.submit_http_status)

    def _status_document(self, job: RenderJob) -> dict[str, object]:
        config = self._config
        status = render_status(config, job, job.phase(self._now()))
        if status == "done":
            document = self._at(config.status_field, config.status_completed)
            _put_at(document, config.url_field, self.link(job))
        elif status == "error":
            document = self._at(config.status_field, config.status_failed)
            _put_at(document, config.error_field, FAILED_TEXT)
        else:
            document = self._at(
                config.status_field, config.status_unknown or config.status_processing
            )
        return document

    def _webhook_document(self, job: RenderJob) -> dict[str, object]:
        config = self._config
        document = self._status_document(job)
        _put_at(document, config.job_id_field, job.job_id)
        if config.webhook_user_data and job.new.reference is not None:
            _put_at(document, config.reference_field, job.new.reference)
        return document

    def _at(self, path: str, value: object) -> dict[str, object]:
        document: dict[str, object] = {}
        _put_at(document, path, value)
        return document

    async def handle_post(self, request: web.Request) -> web.Response:
        if "/" + request.match_info["tail"] != self._config.submit_path:
            return _no_such_endpoint()
        return await self.serve(self.create(request))

    async def handle_get(self, request: web.Request) -> web.Response:
        match = _status_pattern(self._config.status_path).fullmatch(
            "/" + request.match_info["tail"]
        )
        if match is None:
            return _no_such_endpoint()
        return await self.serve(self._status(request, match["job_id"]))

    async def _status(self, request: web.Request, job_id: str) -> web.Response:
        self.guard_read(request)
        job = self.poll(job_id)
        if job is None or self._is_hidden(job):
            return self._not_found()
        return json_response(self._status_document(job))

    def _is_hidden(self, job: RenderJob) -> bool:
        if job.fault == NOT_FOUND_AT_FIRST:
            return job.polls <= self._config.not_found_first_polls
        return job.fault == NOT_FOUND

    def _not_found(self) -> web.Response:
        config = self._config
        if config.http_404_for_not_found:
            document = self._at(config.error_field, "job not found")
            return json_response(document, status=404)
        return json_response(self._at(config.status_field, config.status_not_found))


@functools.lru_cache(maxsize=16)
def _status_pattern(status_path: str) -> re.Pattern[str]:
    before, after = status_path.split("{job_id}")
    return re.compile(re.escape(before) + "(?P<job_id>[^/]+)" + re.escape(after))


def _put_at(document: dict[str, object], path: str, value: object) -> None:
    """Set `value` at the dotted `path`, making the objects on the way."""
    *parents, leaf = path.split(".")
    for name in parents:
        child = document.setdefault(name, {})
        assert isinstance(child, dict), f"{path} crosses a value"
        document = child
    document[leaf] = value


def _json_object(raw_body: bytes) -> dict[str, Any] | None:
    try:
        document = orjson.loads(raw_body)
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


def _is_http_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("https://", "http://"))


def _no_such_endpoint() -> web.Response:
    return json_response({"error": "no such endpoint"}, status=404)


def build_video_api_app(
    config: VideoApiSandboxConfig, now: Callable[[], float] = time.monotonic
) -> web.Application:
    """The emulator as an aiohttp app, to be served alone or mounted at /video."""
    sandbox = VideoApiSandbox(config, now)
    app = web.Application()
    sandbox.add_render_routes(app)  # before the catch-all routes: theirs match first
    app.router.add_post("/{tail:.*}", sandbox.handle_post)
    app.router.add_get("/{tail:.*}", sandbox.handle_get)
    return app
