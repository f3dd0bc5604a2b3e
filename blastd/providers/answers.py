"""What every adapter does alike with a provider's answer: read it whole, tell a request that
never left from an answer that was lost, keep secrets out of error texts, and honour
Retry-After.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp
import orjson
import structlog
from yarl import URL

from blastd.config import AccountSettings
from blastd.errors import (
    CampaignFatalError,
    PermanentError,
    ProviderError,
    ThrottledError,
    TransientError,
    UncertainOutcomeError,
)

MAX_RETRY_AFTER_S = 300.0  # a Retry-After of hours would stall the account; our limiter decides
MAX_ERROR_TEXT_CHARS = 300
MAX_UNKNOWN_STATUSES_LOGGED = 100  # per adapter: a provider inventing values cannot flood logs

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class Answer:
    """What a provider answered to one request."""

    status: int
    raw_body: bytes
    retry_after: str | None  # the Retry-After header as sent


def client_timeout(account: AccountSettings) -> aiohttp.ClientTimeout:
    """The account's request and connect timeouts, for every request it sends."""
    return aiohttp.ClientTimeout(total=account.request_timeout_s, connect=account.connect_timeout_s)


async def post_for_answer(
    http: aiohttp.ClientSession,
    url: str | URL,
    payload: bytes | str,
    headers: Mapping[str, str],
    time_limits: aiohttp.ClientTimeout,
    describe: Callable[[Exception], str],
) -> Answer:
    """POST and read the whole answer. A request that never left raises TransientError (safe
    to send again); one whose answer was lost raises UncertainOutcomeError (the provider may
    have acted on it). Their texts are `describe(exc)`, the adapter's, free of secrets."""
    started = time.monotonic()
    try:
        async with http.post(url, data=payload, headers=headers, timeout=time_limits) as response:
            raw_body = await response.read()
            _log_request("POST", url, response.status, started)
            return Answer(response.status, raw_body, response.headers.get("Retry-After"))
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise exchange_error(exc, describe) from exc


def _log_request(method: str, url: str | URL, status: int, started: float) -> None:
    """Per-request detail at debug level; the query is left out (tokens, numbers travel there
    for some providers), and the log pipeline masks what the path may hold."""
    duration_ms = round((time.monotonic() - started) * 1000, 1)
    path = str(url).partition("?")[0]  # not a parsed URL: this runs for every request
    log.debug("provider_request", method=method, url=path, status=status, duration_ms=duration_ms)


async def get_for_answer(
    http: aiohttp.ClientSession,
    url: str | URL,
    headers: Mapping[str, str],
    time_limits: aiohttp.ClientTimeout,
    describe: Callable[[Exception], str],
) -> Answer:
    """GET and read the whole answer; any failure is a TransientError: a read changes nothing
    at the provider, so asking again is always safe."""
    started = time.monotonic()
    try:
        async with http.get(url, headers=headers, timeout=time_limits) as response:
            raw_body = await response.read()
            _log_request("GET", url, response.status, started)
            return Answer(response.status, raw_body, response.headers.get("Retry-After"))
    except TimeoutError as exc:
        raise TransientError("timeout", describe(exc)) from exc
    except aiohttp.ClientError as exc:
        raise TransientError("network", describe(exc)) from exc


# Failures before a byte of the request reached the provider: no connection was made (refused,
# DNS, TLS, proxy), or making one timed out (aiohttp's ConnectionTimeoutError, raised for the
# connect and sock_connect limits), or the URL was never usable.
NEVER_LEFT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.InvalidURL)


def exchange_error(exc: Exception, describe: Callable[[Exception], str]) -> ProviderError:
    """What a failed POST means. TransientError when the request never left. Anything after
    the connection was made may come after the provider read the request: a read timeout
    (SocketTimeoutError, or the total limit's plain TimeoutError), a disconnect
    (ServerDisconnectedError, a reset), a truncated answer (ClientPayloadError) or an answer
    that cannot be parsed as HTTP. Those are UncertainOutcomeError: the answer was lost, and
    only evidence, not a blind retry, may resolve them."""
    text = describe(exc)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return TransientError("connect_timeout", text)
    if isinstance(exc, NEVER_LEFT):
        return TransientError("network", text)
    if isinstance(exc, TimeoutError):
        return UncertainOutcomeError("timeout", text)
    return UncertainOutcomeError("answer_lost", text)


def error_for_status(status: int, code: str, text: str, retry_after: str | None) -> ProviderError:
    """The error a job API's non-2xx answer means by its status alone (the video adapters).

    429 throttles; 5xx, 408 and 409 (a conflict with a job still processing) pass with time;
    401/402/403 are the account's credentials, credits or plan; any other 4xx is this request.
    """
    if status == 429:
        return throttled_error(code, text, retry_after)
    if status >= 500 or status in (408, 409):
        return TransientError(code, text)
    if status in (401, 402, 403):
        return CampaignFatalError(code, text)
    return PermanentError(code, text)


def json_object(raw_body: bytes) -> dict[str, object] | None:
    """The body as a JSON object; None when it is not JSON or not an object."""
    try:
        document: object = orjson.loads(raw_body)
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


def log_unknown_status_once(seen: set[str], account: str, value: str) -> None:
    """Log `video_status_unknown` the first time an account's provider answers `value`."""
    if value in seen or len(seen) >= MAX_UNKNOWN_STATUSES_LOGGED:
        return
    seen.add(value)
    log.warning("video_status_unknown", account=account, status=value[:100])


def clean_error_text(text: str, token: str) -> str:
    """Text fit for the ledger: the token removed first, then cut to MAX_ERROR_TEXT_CHARS."""
    if token:
        text = text.replace(token, "[token]")
    return text[:MAX_ERROR_TEXT_CHARS]


def throttled_error(code: str, text: str, retry_after: str | None) -> ThrottledError:
    """A ThrottledError that waits as long as the Retry-After header asks, capped."""
    return ThrottledError(code, text, parse_retry_after_s(retry_after, datetime.now(UTC)))


def parse_retry_after_s(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), capped."""
    if value is None:
        return None
    delay_s: float | None
    try:
        delay_s = float(value)
    except ValueError:
        delay_s = _seconds_until_http_date(value, now)
    if delay_s is None or not math.isfinite(delay_s):
        return None
    return min(max(delay_s, 0.0), MAX_RETRY_AFTER_S)


def _seconds_until_http_date(value: str, now: datetime) -> float | None:
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:  # RFC 9110 dates are GMT; parsedate returns "-0000" as naive
        moment = moment.replace(tzinfo=UTC)
    return (moment - now).total_seconds()
