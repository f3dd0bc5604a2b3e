"""UltraMsg: one message per request to an instance, answers classified by their error text.

UltraMsg has no error codes: a refusal is `{"error": "<text>"}` or a list of field errors,
behind HTTP 200 or a 4xx (both are seen), so the account's keyword lists decide the class.
Also parses the `message_ack` webhooks, matched to the ledger by our `referenceId`, and the
texts people send the instance (`message_received`), for the opt-out keywords.
Shapes: docs/providers.md (UltraMsg) and docs/errors.md (its refusals).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from urllib.parse import quote, urlencode

import aiohttp
import orjson
from yarl import URL

from blastd.config import UltraMsgAccount
from blastd.errors import (
    CampaignFatalError,
    ConfigError,
    PermanentError,
    ProviderError,
    TransientError,
    UncertainOutcomeError,
)
from blastd.providers.answers import (
    clean_error_text,
    client_timeout,
    post_for_answer,
    throttled_error,
)
from blastd.providers.base import (
    OutboundMessage,
    SendReceipt,
    SingleMessageProvider,
    StatusUpdate,
    TemplateBody,
    TextBody,
)

REFERENCE_PREFIX = "blastd:"  # referenceId = REFERENCE_PREFIX + ledger_id, echoed on acks
ACCEPTED_SENT_VALUES = frozenset({"true", "queued", "1"})  # `sent` as a string, lower-cased
ACK_EVENT_TYPES = frozenset({"message_ack", "webhook_message_ack"})
INBOUND_EVENT_TYPES = frozenset({"message_received", "webhook_message_received"})
PERSONAL_CHAT_SUFFIX = "@c.us"  # a person's chat id; groups end in @g.us
# WhatsApp Web's ack scale, which some payloads send as numbers: 0 pending, 1 server,
# 2 device, 3 read, 4 played. Pending and unknown values move nothing.
ACK_STATES: dict[str, str] = {
    "server": "sent",
    "device": "delivered",
    "read": "read",
    "played": "read",
    "1": "sent",
    "2": "delivered",
    "3": "read",
    "4": "read",
}
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
JSON_CONTENT_TYPE = "application/json"


class UltraMsgProvider(SingleMessageProvider):
    """Sends text and video messages through one UltraMsg instance."""

    def __init__(self, name: str, account: UltraMsgAccount, http: aiohttp.ClientSession) -> None:
        if account.token is None:
            raise ConfigError(f"account {name!r}: ultramsg needs a token")
        self._token = account.token.get_secret_value()
        self._account = account
        self._chat_url = self._endpoint("chat")
        self._video_url = self._endpoint("video")
        content_type = JSON_CONTENT_TYPE if account.body_format == "json" else FORM_CONTENT_TYPE
        self._headers = {"Content-Type": content_type}
        self._timeout = client_timeout(account)
        self._http = http

    def _endpoint(self, message_type: str) -> URL:
        base_url = self._account.base_url.rstrip("/")
        url = f"{base_url}/{instance_path(self._account.instance_id)}/messages/{message_type}"
        if self._account.token_placement == "query":
            url += "?token=" + quote(self._token, safe="")
        return URL(url, encoded=True)

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Send one message; return UltraMsg's queue id or raise the error its answer means."""
        url, fields = self._request_for(message)
        if self._account.token_placement == "body":
            fields["token"] = self._token
        payload = orjson.dumps(fields) if self._account.body_format == "json" else urlencode(fields)
        answer = await post_for_answer(
            self._http, url, payload, self._headers, self._timeout, self._describe
        )
        return classify_answer(
            answer.status, answer.raw_body, answer.retry_after, self._account, self._token
        )

    def _describe(self, exc: Exception) -> str:
        # aiohttp's own texts may quote the URL, and with it the token: we write our own.
        if isinstance(exc, TimeoutError):
            return f"no answer within {self._account.request_timeout_s:g} s"
        return f"{type(exc).__name__} talking to UltraMsg"

    def _request_for(self, message: OutboundMessage) -> tuple[URL, dict[str, str | int]]:
        fields: dict[str, str | int] = {
            "to": message.to,
            "priority": self._account.priority,
            "referenceId": f"{REFERENCE_PREFIX}{message.ledger_id}",
        }
        body = message.body
        if isinstance(body, TemplateBody):
            raise PermanentError(
                "template_unsupported", "UltraMsg has no message templates: send text or video"
            )
        if isinstance(body, TextBody):
            return self._chat_url, {**fields, "body": body.text}
        fields["video"] = body.link
        if body.caption is not None:
            fields["caption"] = body.caption
        return self._video_url, fields


def instance_path(instance_id: str) -> str:
    """The path segment of an instance: the Node SDK prefixes 'instance' to bare digits."""
    return f"instance{instance_id}" if instance_id.isdigit() else instance_id


def classify_answer(
    status: int, raw_body: bytes, retry_after: str | None, account: UltraMsgAccount, token: str
) -> SendReceipt:
    """The receipt of an accepting answer; raises the ProviderError any other answer means.

    429 and 5xx decide by status alone. Otherwise an `error` body decides by its text whatever
    the status, since UltraMsg sends refusals behind 200 as well as behind 4xx."""
    document = _json_object(raw_body)
    if status == 429:
        text = _refusal_text(document, "HTTP 429", token)
        raise throttled_error("http_429", text, retry_after)
    if status >= 500:
        raise TransientError(f"http_{status}", _refusal_text(document, f"HTTP {status}", token))
    if document is not None and document.get("error"):
        raise classify_error(document["error"], account, token)
    if not 200 <= status < 300:
        raise _error_for_status(status, _refusal_text(document, f"HTTP {status}", token))
    if document is None:
        raise UncertainOutcomeError(f"http_{status}", "2xx body is not a JSON object")
    return _read_receipt(status, document, account, token)


def _json_object(raw_body: bytes) -> dict[str, object] | None:
    try:
        document: object = orjson.loads(raw_body)
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


def _refusal_text(document: Mapping[str, object] | None, fallback: str, token: str) -> str:
    """The body's own words where it has some (`error`, then `message`), else the fallback."""
    for key in ("error", "message"):
        value = document.get(key) if document is not None else None
        if isinstance(value, str) and value:
            return clean_error_text(value, token)
    return fallback


def _error_for_status(status: int, text: str) -> ProviderError:
    # 404 is "instance not found or pending" in the Node SDK; 401/402/403 are the account's.
    if status in (401, 402, 403, 404):
        return CampaignFatalError(f"http_{status}", text)
    return PermanentError(f"http_{status}", text)


def _read_receipt(
    status: int, document: Mapping[str, object], account: UltraMsgAccount, token: str
) -> SendReceipt:
    sent = document.get("sent")
    if sent is False or (isinstance(sent, str) and sent.lower() == "false"):
        raise classify_error(document.get("message") or "not sent", account, token)
    is_accepted = sent is True or (isinstance(sent, str) and sent.lower() in ACCEPTED_SENT_VALUES)
    message_id = document.get("id")
    if not is_accepted or isinstance(message_id, bool) or not message_id:
        raise UncertainOutcomeError(f"http_{status}", "2xx without sent=true and an id")
    if not isinstance(message_id, str | int):
        raise UncertainOutcomeError(f"http_{status}", "2xx with an unreadable id")
    return SendReceipt(provider_message_id=str(message_id))


def classify_error(error: object, account: UltraMsgAccount, token: str) -> ProviderError:
    """The error an `error` value means: a text by its keywords, a list of field errors."""
    if isinstance(error, list):
        return _field_error(error, token)
    text = clean_error_text(
        error if isinstance(error, str) else orjson.dumps(error).decode(), token
    )
    lowered = text.lower()
    # Fatal first: "instance does not exist" must stop the campaign, not fail a recipient.
    for keyword in account.fatal_error_keywords:
        if keyword.lower() in lowered:
            return CampaignFatalError(_code_of(keyword), text)
    for keyword in account.invalid_number_keywords:
        if keyword.lower() in lowered:
            return PermanentError("invalid_number", text)
    # An unknown refusal is taken to concern this message: failing it beats stalling the rest.
    return PermanentError("error", text)


def _field_error(errors: list[object], token: str) -> ProviderError:
    """`[{"to": "is required"}, ...]`: this request was wrong, unless the token was missing."""
    pairs = [
        (str(field), str(reason))
        for item in errors
        if isinstance(item, dict)
        for field, reason in item.items()
    ]
    text = clean_error_text("; ".join(f"{f}: {r}" for f, r in pairs) or "field errors", token)
    if any(field == "token" for field, _ in pairs):
        return CampaignFatalError("token", text)
    return PermanentError("field_error", text)


def _code_of(keyword: str) -> str:
    return "_".join(keyword.lower().split())


def is_valid_secret(given: str | None, expected: str) -> bool:
    """True when the webhook URL's `secret` is ours; UltraMsg signs nothing."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def parse_ack_webhook(raw_body: bytes) -> list[StatusUpdate]:
    """The receipt in a `message_ack` event; other events and others' messages give none.

    Raises ValueError when the body is not JSON.
    """
    try:
        document: object = orjson.loads(raw_body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"webhook body is not JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("event_type") not in ACK_EVENT_TYPES:
        return []
    data = document.get("data")
    data = data if isinstance(data, dict) else {}
    # referenceId sits at the top level, or inside `data` in some payloads
    ledger_id = ledger_id_of(document.get("referenceId"))
    if ledger_id is None:
        ledger_id = ledger_id_of(data.get("referenceId"))
    ack = data.get("ack")
    state = ACK_STATES.get(str(ack).lower()) if isinstance(ack, str | int) else None
    if ledger_id is None or state is None:
        return []
    message_id = data.get("id")
    provider_message_id = str(message_id) if isinstance(message_id, str | int) else None
    return [StatusUpdate(ledger_id, state, provider_message_id or None)]


def ledger_id_of(reference: object) -> int | None:
    """The ledger id in a referenceId we sent; None for anything else."""
    if not isinstance(reference, str) or not reference.startswith(REFERENCE_PREFIX):
        return None
    digits = reference.removeprefix(REFERENCE_PREFIX)
    return int(digits) if digits.isascii() and digits.isdigit() else None


def parse_received_texts(raw_body: bytes) -> list[tuple[str, str]]:
    """(sender in E.164, text) of a `message_received` event: what a person typed to us in a
    one-to-one chat. Our own messages (`fromMe`), groups, media and other events give none;
    so does a body that is not JSON (the ack parser refuses it)."""
    try:
        document: object = orjson.loads(raw_body)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(document, dict) or document.get("event_type") not in INBOUND_EVENT_TYPES:
        return []
    data = document.get("data")
    if not isinstance(data, dict) or str(data.get("fromMe")).lower() == "true":
        return []
    sender, text = data.get("from"), data.get("body")
    if data.get("type") != "chat" or not isinstance(text, str) or not isinstance(sender, str):
        return []
    number = sender.removesuffix(PERSONAL_CHAT_SUFFIX)
    if number == sender or not number.isascii() or not number.isdigit():
        return []
    return [(f"+{number}", text)]
