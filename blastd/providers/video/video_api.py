"""A generic async video-job API, every path, field name and status string from the account.

No public documentation exists (docs/providers.md), so the account says
where things are: the submit body's templates, the dotted paths of the job id, status, video
URL and error text (a leading "$." is accepted), and how status strings map to our states.

Templates are rendered over `script`, `reference` and `callback_url` and the request's options
under their own names (an option cannot replace those three). A name without a value renders as
"", and a submit field rendering to "" is left out, so an unset callback or avatar disappears.

The API cannot list jobs: `can_find` is False and `find` answers None (the pipeline asks
`can_find` before it calls `find`). A job this adapter submitted that the API reports missing
within `not_found_grace_s` is read as running: some job stores learn of a job late. The
submit times live in memory, so after a restart a missing job is `not_found` at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from string import Formatter
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from blastd.config import VideoApiAccount
from blastd.errors import ConfigError, ProviderError, TransientError, UncertainOutcomeError
from blastd.providers.answers import (
    Answer,
    clean_error_text,
    client_timeout,
    error_for_status,
    get_for_answer,
    json_object,
    log_unknown_status_once,
    post_for_answer,
)
from blastd.providers.video.base import VideoRequest, VideoState, VideoStatus

MAX_REMEMBERED_SUBMITS = 10_000  # submit times kept for the not-found grace; oldest go first
MAX_ERROR_CODE_CHARS = 64  # a failed job's code is the provider's status string
WEBHOOK_FALLBACK_ID_FIELD = "id"


class VideoApiProvider:
    """Renders videos through one account of a configurable job API."""

    def __init__(
        self,
        name: str,
        account: VideoApiAccount,
        http: aiohttp.ClientSession,
        *,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        if account.token is None:
            raise ConfigError(f"BLASTD_ACCOUNTS__{name}__token: a video_api account needs its key")
        check_templates(name, account)
        self._api_key = account.token.get_secret_value()
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            account.auth_header: render(account.auth_template, {"api_key": self._api_key}),
        }
        base_url = account.base_url.rstrip("/")
        self._submit_url = base_url + account.submit_path
        self._status_url_prefix = base_url
        self._job_id_path = path_parts(account.job_id_path)
        self._status_field_path = path_parts(account.status_field_path)
        self._video_url_path = path_parts(account.video_url_path)
        self._error_path = path_parts(account.error_path)
        self._status_map = {key.strip().lower(): state for key, state in account.status_map.items()}
        self._submitted_at: OrderedDict[str, float] = OrderedDict()
        self._unknown_statuses: set[str] = set()
        self._timeout = client_timeout(account)
        self._now = now
        self._name = name
        self._account = account
        self._http = http

    @property
    def can_find(self) -> bool:
        """The API has no job list to search."""
        return False

    async def submit(self, request: VideoRequest) -> str:
        """POST the rendered submit body; return the job id at `job_id_path`."""
        payload = orjson.dumps(render_submit_body(self._account.submit_body, request))
        answer = await post_for_answer(
            self._http, self._submit_url, payload, self._headers, self._timeout, self._describe
        )
        if not 200 <= answer.status < 300:
            raise self._refusal(answer)
        document = json_object(answer.raw_body)
        job_id = job_id_text(value_at(document, self._job_id_path))
        if job_id is None:
            raise UncertainOutcomeError(f"http_{answer.status}", "2xx without a job id")
        self._remember_submit(job_id)
        return job_id

    async def status(self, job_id: str) -> VideoStatus:
        """The job's state from GET status_path, mapped through `status_map`."""
        path = render(self._account.status_path, {"job_id": quote(job_id, safe="")})
        url = URL(self._status_url_prefix + path, encoded=True)
        answer = await get_for_answer(self._http, url, self._headers, self._timeout, self._describe)
        if answer.status == 404 and self._account.http_404_means_not_found:
            return self._missing(job_id)
        if not 200 <= answer.status < 300:
            raise self._refusal(answer)
        document = json_object(answer.raw_body)
        if document is None:  # a read is repeated freely, so garbage is transient
            raise TransientError(f"http_{answer.status}", "2xx body is not a JSON object")
        return self._read_job(job_id, document)

    async def find(self, reference: str) -> str | None:
        """Always None: the API cannot list jobs, and the pipeline asks `can_find` first."""
        return None

    def webhook_job_id(self, payload: Mapping[str, Any]) -> str | None:
        """The job id at `job_id_path` in the callback body, else its `id`."""
        job_id = job_id_text(value_at(payload, self._job_id_path))
        return job_id or job_id_text(payload.get(WEBHOOK_FALLBACK_ID_FIELD))

    def _read_job(self, job_id: str, document: Mapping[str, object]) -> VideoStatus:
        raw_status = value_at(document, self._status_field_path)
        if not isinstance(raw_status, str | int) or isinstance(raw_status, bool):
            raise TransientError("no_status", "status answer without a status")
        provider_status = str(raw_status).strip().lower()
        state = self._state_of(provider_status)
        if state == "succeeded":
            return self._succeeded(job_id, document)
        if state == "failed":
            error_text = self._error_text(document) or f"job {provider_status}"
            code = provider_status[:MAX_ERROR_CODE_CHARS] or "failed"
            return VideoStatus(job_id, "failed", error_code=code, error_text=error_text)
        if state == "not_found":
            return self._missing(job_id)
        return VideoStatus(job_id, "running")

    def _state_of(self, provider_status: str) -> VideoState:
        state = self._status_map.get(provider_status)
        if state is not None:
            return state
        log_unknown_status_once(self._unknown_statuses, self._name, provider_status)
        return self._account.unknown_status

    def _succeeded(self, job_id: str, document: Mapping[str, object]) -> VideoStatus:
        video_url = value_at(document, self._video_url_path)
        if isinstance(video_url, str) and video_url:
            return VideoStatus(job_id, "succeeded", video_url=video_url)
        return VideoStatus(
            job_id,
            "failed",
            error_code="missing_result_url",
            error_text=f"succeeded without {self._account.video_url_path}",
        )

    def _missing(self, job_id: str) -> VideoStatus:
        submitted_at = self._submitted_at.get(job_id)
        if submitted_at is not None:
            if self._now() - submitted_at < self._account.not_found_grace_s:
                return VideoStatus(job_id, "running")
            del self._submitted_at[job_id]
        return VideoStatus(job_id, "not_found")

    def _remember_submit(self, job_id: str) -> None:
        """Keep the submit time while its grace lasts, for at most MAX_REMEMBERED_SUBMITS jobs."""
        now = self._now()
        self._submitted_at[job_id] = now
        self._submitted_at.move_to_end(job_id)
        while self._submitted_at:
            oldest_id, submitted_at = next(iter(self._submitted_at.items()))
            is_over_cap = len(self._submitted_at) > MAX_REMEMBERED_SUBMITS
            if not is_over_cap and now - submitted_at < self._account.not_found_grace_s:
                return  # in submit order: every later one is younger
            del self._submitted_at[oldest_id]

    def _error_text(self, document: Mapping[str, object] | None) -> str | None:
        return error_text_at(document, self._error_path, self._api_key)

    def _refusal(self, answer: Answer) -> ProviderError:
        text = self._error_text(json_object(answer.raw_body)) or f"HTTP {answer.status}"
        return error_for_status(answer.status, f"http_{answer.status}", text, answer.retry_after)

    def _describe(self, exc: Exception) -> str:
        # aiohttp's own texts may quote request details: we write our own.
        if isinstance(exc, TimeoutError):
            return f"no answer within {self._account.request_timeout_s:g} s"
        return f"{type(exc).__name__} talking to the video API"


def path_parts(path: str) -> tuple[str, ...]:
    """The keys of a dotted path: "data.jobId" and "$.data.jobId" give ("data", "jobId")."""
    path = path.strip()
    if path in ("", "$"):
        return ()
    return tuple(path.removeprefix("$.").split("."))


def value_at(document: object, parts: Sequence[str]) -> object:
    """The value at a path's keys (a digit indexes a list); None where it leads nowhere."""
    value = document
    for part in parts:
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def error_text_at(document: object, parts: Sequence[str], api_key: str) -> str | None:
    """The error at `parts` as ledger text, JSON when it is not a string; None when absent."""
    value = value_at(document, parts)
    if value is None or value == "":
        return None
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return clean_error_text(text, api_key)


def job_id_text(value: object) -> str | None:
    """A job id as text: a non-empty string or an integer."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    return value if isinstance(value, str) and value else None


def render_submit_body(templates: Mapping[str, str], request: VideoRequest) -> dict[str, str]:
    """The submit body's fields rendered for `request`; empty ones are left out."""
    values = {
        **request.options,
        "script": request.script,
        "reference": request.reference,
        "callback_url": request.webhook_url or "",
    }
    rendered = {field: render(template, values) for field, template in templates.items()}
    return {field: value for field, value in rendered.items() if value}


def render(template: str, values: Mapping[str, str]) -> str:
    """`template` with each {name} replaced by its value, "" when it has none."""
    return "".join(
        literal + (values.get(name, "") if name is not None else "")
        for literal, name, _spec, _conversion in Formatter().parse(template)
    )


def check_templates(name: str, account: VideoApiAccount) -> None:
    """Refuse at start-up a template that would render wrong on every job."""
    setting = f"BLASTD_ACCOUNTS__{name}__"
    if template_names(account.auth_template, setting + "auth_template") != {"api_key"}:
        raise ConfigError(f"{setting}auth_template: must contain {{api_key}} and nothing else")
    if template_names(account.status_path, setting + "status_path") != {"job_id"}:
        raise ConfigError(f"{setting}status_path: must contain {{job_id}} and nothing else")
    for field, template in account.submit_body.items():
        template_names(template, f"{setting}submit_body__{field}")


def template_names(template: str, setting: str) -> set[str]:
    """The names a template uses; ConfigError unless each is a plain {name}."""
    try:
        parsed = list(Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{setting}: {exc}") from exc
    names = {name for _literal, name, _spec, _conversion in parsed if name is not None}
    for _literal, name, spec, conversion in parsed:
        if name is not None and (not name.isidentifier() or spec or conversion):
            raise ConfigError(f"{setting}: {{{name}}} must be a plain name such as {{script}}")
    return names
