"""D-ID: talking-avatar renders as clips (a stock presenter) or talks (a photo), one job each.

`submit` POSTs the job with our reference as both `user_data` and `name`, so `find` can list
the account's jobs and match it again after a crash or a 5xx; `status` reads
GET /{endpoint}/{id}. Refusals are classified by HTTP status, with D-ID's `kind` as the code.
Shapes: docs/providers.md (D-ID).

A request's options override the account's defaults under these names: `presenter_id` and
`driver_id` (clips), `source_url` (talks), `voice_id` and `voice_provider`. An empty value
counts as unset. Other names are ignored: a campaign's options may be meant for another kind
of video account.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from blastd.config import DidAccount
from blastd.errors import (
    CampaignFatalError,
    ConfigError,
    ProviderError,
    TransientError,
    UncertainOutcomeError,
)
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
from blastd.providers.video.base import VideoRequest, VideoStatus

RUNNING_STATUSES = frozenset({"created", "started"})
KNOWN_STATUSES = RUNNING_STATUSES | {"done", "error", "rejected"}
# D-ID's own failure: credits are refunded and the same input may render next time.
RETRYABLE_ERROR_KIND = "UnknownError"
REJECTED_TEXT = "D-ID rejected the job (moderation)"


class DidProvider:
    """Renders videos with one D-ID API key."""

    def __init__(self, name: str, account: DidAccount, http: aiohttp.ClientSession) -> None:
        if account.token is None:
            raise ConfigError(f"BLASTD_ACCOUNTS__{name}__token: a D-ID account needs its key")
        key = account.token.get_secret_value()
        encoded_key = base64.b64encode(key.encode()).decode("ascii")
        # Either form may come back quoted in an answer: both are kept out of error texts.
        self._secrets = (key, encoded_key)
        credential = key if account.auth_form == "raw" else encoded_key
        self._headers = {
            "Authorization": f"Basic {credential}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        self._jobs_url = f"{account.base_url.rstrip('/')}/{account.endpoint}"
        self._timeout = client_timeout(account)
        self._unknown_statuses: set[str] = set()
        self._name = name
        self._account = account
        self._http = http

    @property
    def can_find(self) -> bool:
        """D-ID lists an account's jobs with their `user_data`."""
        return True

    async def submit(self, request: VideoRequest) -> str:
        """Create the clip or talk; return D-ID's job id."""
        payload = orjson.dumps(build_job_body(request, self._account))
        answer = await post_for_answer(
            self._http, self._jobs_url, payload, self._headers, self._timeout, self._describe
        )
        if not 200 <= answer.status < 300:
            raise self._refusal(answer)
        document = json_object(answer.raw_body)
        job_id = document.get("id") if document is not None else None
        if not isinstance(job_id, str) or not job_id:
            raise UncertainOutcomeError(f"http_{answer.status}", "2xx without a job id")
        return job_id

    async def status(self, job_id: str) -> VideoStatus:
        """The job's state from GET /{endpoint}/{id}; HTTP 404 is `not_found`."""
        url = URL(f"{self._jobs_url}/{quote(job_id, safe='')}", encoded=True)
        answer = await get_for_answer(self._http, url, self._headers, self._timeout, self._describe)
        if answer.status == 404:
            return VideoStatus(job_id, "not_found")
        document = self._read_document(answer)
        return self._read_job(job_id, document)

    async def find(self, reference: str) -> str | None:
        """The id of the first listed job whose `user_data` (or `name`) is `reference`, among
        the `find_list_limit` jobs of one list page (the newest, in the sandbox)."""
        url = URL(self._jobs_url).with_query(limit=self._account.find_list_limit)
        answer = await get_for_answer(self._http, url, self._headers, self._timeout, self._describe)
        jobs = self._read_document(answer).get(self._account.endpoint)
        if not isinstance(jobs, list):
            raise TransientError(f"http_{answer.status}", f"no {self._account.endpoint} list")
        for job in jobs:
            if isinstance(job, dict) and reference in (job.get("user_data"), job.get("name")):
                job_id = job.get("id")
                if isinstance(job_id, str) and job_id:
                    return job_id
        return None

    def webhook_job_id(self, payload: Mapping[str, Any]) -> str | None:
        """The `id` of the job object D-ID posts."""
        job_id = payload.get("id")
        return job_id if isinstance(job_id, str) and job_id else None

    def _read_document(self, answer: Answer) -> dict[str, object]:
        """A 2xx answer's JSON object; a read is repeated freely, so garbage is transient."""
        if not 200 <= answer.status < 300:
            raise self._refusal(answer)
        document = json_object(answer.raw_body)
        if document is None:
            raise TransientError(f"http_{answer.status}", "2xx body is not a JSON object")
        return document

    def _read_job(self, job_id: str, job: Mapping[str, object]) -> VideoStatus:
        status = job.get("status")
        if isinstance(status, str) and status not in KNOWN_STATUSES:
            # A status D-ID added since this was written: running, so the pipeline's timeout
            # ends the job if it never changes.
            log_unknown_status_once(self._unknown_statuses, self._name, status)
        return read_job(job_id, job, self._secrets)

    def _refusal(self, answer: Answer) -> ProviderError:
        return refusal_error(answer, self._secrets)

    def _describe(self, exc: Exception) -> str:
        # aiohttp's own texts may quote request details: we write our own.
        if isinstance(exc, TimeoutError):
            return f"no answer from D-ID within {self._account.request_timeout_s:g} s"
        return f"{type(exc).__name__} talking to D-ID"


def read_job(job_id: str, job: Mapping[str, object], secrets: Sequence[str]) -> VideoStatus:
    """What a job object says; a status other than done, error or rejected is running."""
    status = job.get("status")
    if not isinstance(status, str):
        raise TransientError("no_status", "job object without a status")
    if status == "done":
        result_url = job.get("result_url")
        if isinstance(result_url, str) and result_url:
            return VideoStatus(job_id, "succeeded", video_url=result_url)
        return VideoStatus(
            job_id, "failed", error_code="missing_result_url", error_text="done without result_url"
        )
    if status in ("error", "rejected"):
        return _failed(job_id, status, job.get("error"), secrets)
    return VideoStatus(job_id, "running")


def _failed(job_id: str, status: str, error: object, secrets: Sequence[str]) -> VideoStatus:
    """`error` {kind, description}; `rejected` is moderation."""
    details = error if isinstance(error, dict) else {}
    kind, description = details.get("kind"), details.get("description")
    text = clean_secrets(description, secrets) if isinstance(description, str) else ""
    if status == "rejected":
        return VideoStatus(
            job_id, "failed", error_code="rejected", error_text=text or REJECTED_TEXT
        )
    code = kind if isinstance(kind, str) and kind else "error"
    return VideoStatus(
        job_id,
        "failed",
        error_code=code,
        error_text=text or f"D-ID render failed ({code})",
        retryable=code == RETRYABLE_ERROR_KIND,
    )


def refusal_error(answer: Answer, secrets: Sequence[str]) -> ProviderError:
    """The error a non-2xx answer means: `{"kind", "description"}`, or the `{"message"}`
    of the gateway in front; the class by HTTP status, the code D-ID's kind."""
    document = json_object(answer.raw_body) or {}
    kind = document.get("kind")
    code = kind if isinstance(kind, str) and kind else f"http_{answer.status}"
    text = f"HTTP {answer.status}"
    for key in ("description", "message"):
        value = document.get(key)
        if isinstance(value, str) and value:
            text = clean_secrets(value, secrets)
            break
    return error_for_status(answer.status, code, text, answer.retry_after)


def clean_secrets(text: str, secrets: Sequence[str]) -> str:
    """`text` without any of the key's forms, cut to ledger size."""
    for secret in secrets:
        text = clean_error_text(text, secret)
    return text


def build_job_body(request: VideoRequest, account: DidAccount) -> dict[str, object]:
    """The POST /clips or /talks body: the account's defaults under the request's options."""
    script: dict[str, object] = {"type": "text", "input": request.script}
    voice_id = _option(request, "voice_id", account.voice_id)
    if voice_id is not None:  # none: D-ID picks its default voice
        voice_provider = _option(request, "voice_provider", account.voice_provider)
        script["provider"] = {"type": voice_provider, "voice_id": voice_id}
    body: dict[str, object] = {
        "script": script,
        "config": {"result_format": account.result_format},
        "user_data": request.reference,
        "name": request.reference,
    }
    if account.endpoint == "clips":
        body["presenter_id"] = _required_option(request, "presenter_id", account.presenter_id)
        driver_id = _option(request, "driver_id", account.driver_id)
        if driver_id is not None:
            body["driver_id"] = driver_id
    else:
        body["source_url"] = _required_option(request, "source_url", account.source_url)
    if request.webhook_url:
        body["webhook"] = request.webhook_url
    return body


def _option(request: VideoRequest, name: str, default: str | None) -> str | None:
    return request.options.get(name) or default or None


def _required_option(request: VideoRequest, name: str, default: str | None) -> str:
    """Without it every job of the campaign is refused alike: an operator must set one."""
    value = _option(request, name, default)
    if value is None:
        raise CampaignFatalError(
            f"no_{name}", f"set {name} on the account or in the campaign's video options"
        )
    return value
