"""Wablas: v2 bulk requests of up to `batch_size` messages, answers classified by keywords.

Wablas drives a linked WhatsApp device, not Meta's API: no templates, and most refusals come
back as HTTP 200 with {"status": false, "message": "..."} whose texts are not documented.
Also parses the device's tracking webhook and the messages people send the device (for the
opt-out keywords). Shapes: docs/providers.md (Wablas).
"""

from __future__ import annotations

import hmac
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl

import aiohttp
import orjson

from blastd.config import WablasAccount
from blastd.errors import (
    CampaignFatalError,
    ConfigError,
    PermanentError,
    ProviderError,
    QualityError,
    TransientError,
    UncertainOutcomeError,
)
from blastd.providers.answers import (
    clean_error_text,
    client_timeout,
    post_for_answer,
    throttled_error,
)
from blastd.providers.base import OutboundMessage, SendReceipt, SendResult, TemplateBody, VideoBody

# Right after sending, items are "pending" (or process, sent, ...: any other state with an id
# counts as taken); these end the message, per community enums and webhook mappers.
REFUSED_ITEM_STATES = frozenset(
    {"cancel", "canceled", "cancelled", "reject", "rejected", "failed", "fail", "error"}
)
ITEM_ARRAYS = ("messages", "message")  # community DTOs name the array either way
ID_FIELDS = ("id", "message_id", "messageId")  # tracking-webhook aliases seen in integrations
ITEM_REASON_FIELDS = ("reason", "note", "error", "description")


@dataclass(frozen=True, slots=True)
class TrackingUpdate:
    """One status from the tracking webhook, matched to the ledger by the item id."""

    provider_message_id: str
    state: str  # sent | delivered | read | failed
    error_code: str | None = None
    error_text: str | None = None


class WablasProvider:
    """Sends text and video messages through one Wablas device."""

    def __init__(self, name: str, account: WablasAccount, http: aiohttp.ClientSession) -> None:
        if account.token is None:
            raise ConfigError(f"account {name!r}: wablas needs a token")
        token = account.token.get_secret_value()
        secret = account.secret_key.get_secret_value() if account.secret_key else None
        self._secrets = tuple(s for s in (token, secret) if s)
        self._name = name
        self._account = account
        self._base_url = account.base_url.rstrip("/")
        # Newer accounts join token and secret key with a dot; the raw token otherwise, no
        # "Bearer" (docs/providers.md).
        self._headers = {
            "Authorization": token if secret is None else f"{token}.{secret}",
            "Content-Type": "application/json",
        }
        self._timeout = client_timeout(account)
        self._http = http

    async def send_batch(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        """Send one request for the batch; one receipt or error per message, in order.

        Template messages are refused without a request: Wablas has no templates, and sending
        their parameters as text would send something the campaign did not ask for.
        """
        sendable = [m for m in messages if not isinstance(m.body, TemplateBody)]
        answers = iter(await self._send(sendable) if sendable else [])
        return [
            _template_refusal() if isinstance(m.body, TemplateBody) else next(answers)
            for m in messages
        ]

    async def _send(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        # A batch is one campaign's, so its messages are all text or all video.
        is_video = isinstance(messages[0].body, VideoBody)
        if self._account.batch_limit == 1:
            path = "/api/send-video" if is_video else "/api/send-message"
            request: dict[str, object] = build_item(messages[0], self._account.request_flags)
        else:
            path = "/api/v2/send-video" if is_video else "/api/v2/send-message"
            request = build_bulk_request(messages, self._account)
        # A lost answer may hide an accepted batch, and without item ids there is nothing to
        # check it by: every message of it is in doubt (post_for_answer), never sent blindly.
        answer = await post_for_answer(
            self._http,
            self._base_url + path,
            orjson.dumps(request),
            self._headers,
            self._timeout,
            self._describe,
        )
        if not 200 <= answer.status < 300:
            text = _read_refusal_text(answer.raw_body)
            raise self._refusal(answer.status, text, answer.retry_after, len(messages))
        items = self._read_answer(answer.status, answer.raw_body, len(messages))
        return [self._result_of(item) for item in match_items(messages, items)]

    def _describe(self, exc: Exception) -> str:
        return self._clean(repr(exc))

    def _read_answer(self, status: int, raw_body: bytes, count: int) -> list[dict[str, object]]:
        """The items of a 2xx answer; raises the request's error for a status:false one."""
        try:
            document = orjson.loads(raw_body)
        except orjson.JSONDecodeError as exc:
            raise UncertainOutcomeError(f"http_{status}", "2xx body is not JSON") from exc
        if not isinstance(document, dict):
            raise UncertainOutcomeError(f"http_{status}", "2xx body is not a JSON object")
        if _is_false(document.get("status")):
            raise self._refusal(status, _text_of(document.get("message")), None, count)
        items = read_items(document.get("data"))
        if items is None:
            raise UncertainOutcomeError(f"http_{status}", "2xx answer without message items")
        return items

    def _result_of(self, item: dict[str, object] | None) -> SendResult:
        if item is None:
            return UncertainOutcomeError("item_missing", "the answer does not list this message")
        state = _text_of(item.get("status")).lower()
        message_id = _id_of(item)
        if state in REFUSED_ITEM_STATES:
            reason = _reason_of(item) or f"Wablas answered {state!r} for this message"
            return PermanentError(f"item_{state}", self._clean(reason))
        if message_id is None:
            return UncertainOutcomeError("item_without_id", f"item status {state!r} without id")
        # pending, process, sent or a state we do not know: with an id, Wablas took it, and
        # the tracking webhook tells the rest.
        return SendReceipt(provider_message_id=message_id)

    def _refusal(
        self, status: int, text: str, retry_after: str | None, count: int
    ) -> ProviderError:
        """The error a whole refused request means: by HTTP status, then by its wording."""
        text = self._clean(text or f"HTTP {status}")
        if status == 429:
            return throttled_error("http_429", text, retry_after)
        if status >= 500 or status == 408:
            return TransientError(f"http_{status}", text)
        error = classify_refusal(text, self._account, f"http_{status}" if status >= 300 else None)
        if error.code == "batch_too_large":
            return CampaignFatalError(
                "batch_too_large",
                self._clean(
                    f"lower BLASTD_ACCOUNTS__{self._name}__batch_size (now "
                    f"{self._account.batch_size}, this request carried {count}): {text}"
                ),
            )
        return error

    def _clean(self, text: str) -> str:
        for secret in self._secrets:
            text = clean_error_text(text, secret)
        return text


def _template_refusal() -> PermanentError:
    return PermanentError("template_unsupported", "template messages need a cloud_api account")


def build_item(message: OutboundMessage, flags: Mapping[str, bool]) -> dict[str, object]:
    """One v2 item (or the whole single-send body) for a text or video message."""
    item: dict[str, object] = {"phone": message.to.removeprefix("+")}
    body = message.body
    if isinstance(body, VideoBody):
        item["video"] = body.link
        if body.caption is not None:
            item["caption"] = body.caption
    elif isinstance(body, TemplateBody):  # send_batch refuses these before building
        raise TypeError("Wablas has no template messages")
    else:
        item["message"] = body.text
    item.update(flags)
    return item


def build_bulk_request(
    messages: Sequence[OutboundMessage], account: WablasAccount
) -> dict[str, object]:
    """The v2 body {"data": [...]}, with the account's flags per item or beside "data"."""
    if account.flags_at_top_level:
        return {"data": [build_item(m, {}) for m in messages], **account.request_flags}
    return {"data": [build_item(m, account.request_flags) for m in messages]}


def read_items(data: object) -> list[dict[str, object]] | None:
    """The message items under data.messages or data.message; a lone item object counts."""
    if not isinstance(data, dict):
        return None
    for key in ITEM_ARRAYS:
        value = data.get(key)
        if isinstance(value, list):
            return [item for item in value if isinstance(item, dict)]
        if isinstance(value, dict):
            return [value]
    return [data] if _id_of(data) is not None else None


def match_items(
    messages: Sequence[OutboundMessage], items: Sequence[dict[str, object]]
) -> list[dict[str, object] | None]:
    """Each message's item: by phone when the items carry one (their order is not promised),
    else by position when the counts agree; None for a message the answer leaves out."""
    if not any(_digits(item.get("phone")) for item in items):
        if len(items) == len(messages):
            return list(items)
        return [None] * len(messages)
    by_phone: dict[str, deque[dict[str, object]]] = {}
    for item in items:
        by_phone.setdefault(_digits(item.get("phone")), deque()).append(item)
    matched: list[dict[str, object] | None] = []
    for message in messages:
        queue = by_phone.get(_digits(message.to))
        matched.append(queue.popleft() if queue else None)
    return matched


def classify_refusal(text: str, account: WablasAccount, code: str | None) -> ProviderError:
    """The error class a refusal's wording means (credentials and billing stop the campaign;
    a disconnected device pauses it, since an operator can re-link it and resume)."""
    lowered = text.lower()
    for keywords, error_class, keyword_code in (
        (account.credential_keywords, CampaignFatalError, "credentials"),
        (account.billing_keywords, CampaignFatalError, "billing"),
        (account.device_keywords, QualityError, "device_disconnected"),
        # media before batch: "file too large, maximum 2 MB" names a maximum too
        (account.media_keywords, PermanentError, "media_refused"),
        (account.batch_limit_keywords, CampaignFatalError, "batch_too_large"),
        (account.number_keywords, PermanentError, "invalid_number"),
    ):
        if any(keyword in lowered for keyword in keywords):
            return error_class(keyword_code, text)
    if code in ("http_401", "http_403"):
        return CampaignFatalError(code, text)
    # An unknown refusal of a whole request would most likely repeat for every batch: pause
    # the campaign with the text for an operator rather than fail every recipient in turn.
    return QualityError(code or "status_false", text)


def _read_refusal_text(raw_body: bytes) -> str:
    try:
        document = orjson.loads(raw_body)
    except orjson.JSONDecodeError:
        return ""
    return _text_of(document.get("message")) if isinstance(document, dict) else ""


def _is_false(value: object) -> bool:
    """Wablas' status is a boolean, sometimes a string ("false") in community answers."""
    if isinstance(value, str):
        return value.strip().lower() in ("false", "0", "error", "failed")
    return value is False or value == 0


def _text_of(value: object) -> str:
    return value if isinstance(value, str) else ""


def _id_of(item: Mapping[str, object]) -> str | None:
    for field in ID_FIELDS:
        value = item.get(field)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    return None


def _digits(value: object) -> str:
    return "".join(c for c in value if c.isdigit()) if isinstance(value, str) else ""


def parse_tracking_webhook(raw_body: bytes, states: Mapping[str, str]) -> list[TrackingUpdate]:
    """Updates from a tracking call: a JSON object, a JSON array, or a form post.

    `states` maps Wablas statuses to ledger states; unmapped ones (pending, process) and
    entries without an id are skipped. Raises ValueError when the body is neither.
    """
    updates = (_tracking_update(entry, states) for entry in _tracking_entries(raw_body))
    return [update for update in updates if update is not None]


def _tracking_update(
    entry: Mapping[str, object], states: Mapping[str, str]
) -> TrackingUpdate | None:
    message_id = _id_of(entry)
    status = _text_of(entry.get("status")).lower()
    state = states.get(status)
    if message_id is None or state is None:
        return None
    if state != "failed":
        return TrackingUpdate(message_id, state)
    return TrackingUpdate(message_id, state, f"tracking_{status}", _reason_of(entry) or status)


def _reason_of(entry: Mapping[str, object]) -> str:
    return next((_text_of(entry.get(f)) for f in ITEM_REASON_FIELDS if entry.get(f)), "")


def _tracking_entries(raw_body: bytes) -> list[dict[str, object]]:
    stripped = raw_body.lstrip()
    if stripped[:1] in (b"{", b"["):
        try:
            document: object = orjson.loads(stripped)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"tracking body is not JSON: {exc}") from exc
        entries = document if isinstance(document, list) else [document]
        return [entry for entry in entries if isinstance(entry, dict)]
    try:
        form = parse_qsl(stripped.decode(), keep_blank_values=True, strict_parsing=True)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"tracking body is neither JSON nor a form: {exc}") from exc
    return [dict(form)]


def parse_incoming_messages(raw_body: bytes) -> list[tuple[str, str]]:
    """(sender in E.164, text) of each message a person sent the device, in any of the body
    forms the tracking call uses (so one URL can serve as both of the device's webhooks).

    An entry with a `status` is a tracking status, not a message; group messages and entries
    without a number or a text give none, and so does a body that is neither JSON nor a form
    (the tracking parser refuses it).
    """
    try:
        entries = _tracking_entries(raw_body)
    except ValueError:
        return []
    return [message for entry in entries if (message := _incoming(entry)) is not None]


def _incoming(entry: Mapping[str, object]) -> tuple[str, str] | None:
    if "status" in entry or str(entry.get("isGroup")).strip().lower() in ("true", "1"):
        return None
    phone, text = _digits(entry.get("phone")), entry.get("message")
    if not phone or not isinstance(text, str):
        return None
    return f"+{phone}", text


def is_valid_tracking_secret(given: str | None, secret: str) -> bool:
    """True when the tracking URL's `secret` query value is ours (constant-time compare).

    Wablas signs nothing: the secret in the URL we configure is the only proof.
    """
    return given is not None and hmac.compare_digest(given.encode(), secret.encode())
