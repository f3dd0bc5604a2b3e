"""WhatsApp Cloud API: one message per request, answers classified by Graph error code.

Also parses the status webhooks Meta sends back and answers its verification handshake.
Codes and shapes: docs/providers.md (Cloud API) and docs/errors.md (its codes).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

import aiohttp
import orjson

from blastd.config import CloudApiAccount
from blastd.errors import (
    CampaignFatalError,
    ConfigError,
    ConfigurationError,
    MarketingCapError,
    OptedOutError,
    PairLimitError,
    PermanentError,
    ProviderError,
    QualityError,
    ThrottledError,
    TransientError,
    UncertainOutcomeError,
)
from blastd.providers.answers import (
    MAX_ERROR_TEXT_CHARS,
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
    VideoBody,
)

CALLBACK_PREFIX = "blastd:"  # biz_opaque_callback_data = CALLBACK_PREFIX + ledger_id
SIGNATURE_PREFIX = "sha256="
WEBHOOK_STATUSES = frozenset({"sent", "delivered", "read", "failed"})

# 131053 (media upload) is retried: tenacity's bounded attempts give the "once, then fail"
# it calls for without a class of its own.
TRANSIENT_CODES = (1, 2, 131000, 131016, 131053)
THROTTLED_CODES = (4, 80007, 130429)
PAIR_LIMIT_CODES = (131056,)
# 132015 (template paused for low quality) is lifted by Meta after hours: an operator resumes.
QUALITY_CODES = (131048, 368, 132015)
PERMANENT_CODES = (
    100,
    130472,
    131008,
    131009,
    131014,
    131026,
    131047,
    131051,
    132000,
)
# 131049: the person's marketing cap (across businesses) is reached; it may be tried after 24 h.
MARKETING_CAP_CODES = (131049,)
# 131050: the user stopped marketing messages from this business.
OPTED_OUT_CODES = (131050,)
# Nothing on the account can succeed until a human acts: template gone (132001) or disabled
# for good (132016), auth and permission (0, 3, 10, 190, 200-299), account locked (131031),
# payment (131042, the Graph twin of HTTP 402). Pausing would only resume into the same wall.
CAMPAIGN_FATAL_CODES = (0, 3, 10, 190, 131031, 131042, 132001, 132016, *range(200, 300))

# Answers that say the request went to something that does not exist: Graph 100 with subcode 33
# (no such object: the phone-number id), 2635 (an API version Graph no longer serves), a path
# Graph cannot parse (a version it never had), or a bare 400/404 (not Graph at all).
UNKNOWN_OBJECT = (100, 33)
UNSUPPORTED_VERSION_CODES = (2635,)
WRONG_PATH_PHRASES = ("unknown path components", "unsupported version", "deprecated version")
BARE_WRONG_PATH_STATUSES = (400, 404)

ERROR_CLASS_BY_CODE: dict[int, type[ProviderError]] = {
    **dict.fromkeys(TRANSIENT_CODES, TransientError),
    **dict.fromkeys(THROTTLED_CODES, ThrottledError),
    **dict.fromkeys(PAIR_LIMIT_CODES, PairLimitError),
    **dict.fromkeys(QUALITY_CODES, QualityError),
    **dict.fromkeys(PERMANENT_CODES, PermanentError),
    **dict.fromkeys(OPTED_OUT_CODES, OptedOutError),
    **dict.fromkeys(MARKETING_CAP_CODES, MarketingCapError),
    **dict.fromkeys(CAMPAIGN_FATAL_CODES, CampaignFatalError),
}


class CloudApiProvider(SingleMessageProvider):
    """Sends messages through one Cloud API phone number."""

    def __init__(self, name: str, account: CloudApiAccount, http: aiohttp.ClientSession) -> None:
        if account.token is None:
            raise ConfigError(f"account {name!r}: cloud_api needs a token")
        self._token = account.token.get_secret_value()
        base_url = account.base_url.rstrip("/")
        self._url = f"{base_url}/{account.api_version}/{account.phone_number_id}/messages"
        self._marketing_url = (
            f"{base_url}/{account.api_version}/{account.phone_number_id}/marketing_messages"
            if account.marketing_messages_api
            else None
        )
        self._headers = {
            "Authorization": f"Bearer {self._token}",
            "Content-Type": "application/json",
        }
        self._timeout = client_timeout(account)
        self._http = http

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Send one message; return Meta's wamid or raise the ProviderError its answer means."""
        url, request = self._url, build_request_body(message)
        if self._marketing_url is not None and is_marketing_template(message):
            url, request = self._marketing_url, marketing_request_body(request)
        payload = orjson.dumps(request)
        answer = await post_for_answer(
            self._http, url, payload, self._headers, self._timeout, self._describe
        )
        if 200 <= answer.status < 300:
            return read_receipt(answer.status, answer.raw_body)
        raise classify_failure(answer.status, answer.raw_body, answer.retry_after, self._token)

    def _describe(self, exc: Exception) -> str:
        return clean_error_text(repr(exc), self._token)


def build_request_body(message: OutboundMessage) -> dict[str, object]:
    """The JSON request for one message, carrying its ledger id for the status webhooks."""
    request: dict[str, object] = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": message.to.removeprefix("+"),
        "biz_opaque_callback_data": f"{CALLBACK_PREFIX}{message.ledger_id}",
    }
    body = message.body
    if isinstance(body, TextBody):
        request["type"] = "text"
        request["text"] = {"preview_url": False, "body": body.text}
    elif isinstance(body, TemplateBody):
        request["type"] = "template"
        request["template"] = _template_object(body)
    else:
        request["type"] = "video"
        request["video"] = _video_object(body)
    return request


def _template_object(body: TemplateBody) -> dict[str, object]:
    components: list[dict[str, object]] = []
    if body.header_video_link is not None:
        video = {"type": "video", "video": {"link": body.header_video_link}}
        components.append({"type": "header", "parameters": [video]})
    if body.body_params:
        texts = [{"type": "text", "text": param} for param in body.body_params]
        components.append({"type": "body", "parameters": texts})
    template: dict[str, object] = {"name": body.name, "language": {"code": body.language}}
    if components:
        template["components"] = components
    return template


def _video_object(body: VideoBody) -> dict[str, str]:
    if body.caption is None:
        return {"link": body.link}
    return {"link": body.link, "caption": body.caption}


def read_receipt(status: int, raw_body: bytes) -> SendReceipt:
    """The wamid of a 2xx answer; an unreadable 2xx may still have been accepted: uncertain."""
    try:
        document = orjson.loads(raw_body)
        message_id = document["messages"][0]["id"]
    except (orjson.JSONDecodeError, LookupError, TypeError) as exc:
        raise UncertainOutcomeError(f"http_{status}", "2xx without messages[0].id") from exc
    if not isinstance(message_id, str) or not message_id:
        raise UncertainOutcomeError(f"http_{status}", "2xx with an empty message id")
    return SendReceipt(provider_message_id=message_id)


def classify_failure(
    status: int, raw_body: bytes, retry_after: str | None, token: str
) -> ProviderError:
    """The error a non-2xx answer means: by Graph error code, by HTTP status without one."""
    graph_code, text = _read_graph_error(raw_body)
    text = clean_error_text(text or f"HTTP {status}", token)
    error_class = ERROR_CLASS_BY_CODE.get(graph_code) if graph_code is not None else None
    if error_class is None:
        error_class = _error_class_for_status(status)
    code = str(graph_code) if graph_code is not None else f"http_{status}"
    if _is_wrong_endpoint(status, raw_body):
        return ConfigurationError(code, text)
    if error_class is ThrottledError:
        return throttled_error(code, text, retry_after)
    return error_class(code, text)


def _is_wrong_endpoint(status: int, raw_body: bytes) -> bool:
    """Whether the answer proves the version, the phone-number id or the base URL is wrong."""
    try:
        error = orjson.loads(raw_body)["error"]
        key = (error.get("code"), error.get("error_subcode"))
        message = str(error.get("message", "")).lower()
    except (orjson.JSONDecodeError, LookupError, TypeError, AttributeError):
        return status in BARE_WRONG_PATH_STATUSES
    if key == UNKNOWN_OBJECT or key[0] in UNSUPPORTED_VERSION_CODES:
        return True
    return any(phrase in message for phrase in WRONG_PATH_PHRASES)


def _error_class_for_status(status: int) -> type[ProviderError]:
    if status == 429:
        return ThrottledError
    if status in (401, 402):
        return CampaignFatalError
    if status >= 500:
        return TransientError
    return PermanentError


def _read_graph_error(raw_body: bytes) -> tuple[int | None, str]:
    """Graph's error.code and its most useful text; (None, "") when the body is not Graph's."""
    try:
        error = orjson.loads(raw_body)["error"]
        code = error["code"]
    except (orjson.JSONDecodeError, LookupError, TypeError):
        return None, ""
    if not isinstance(code, int) or isinstance(code, bool):
        return None, ""
    return code, _error_text(error)


def _error_text(error: Mapping[str, object]) -> str:
    error_data = error.get("error_data")
    # error_data is an object on messaging endpoints and a plain string on some others
    details = error_data.get("details") if isinstance(error_data, dict) else error_data
    if isinstance(details, str) and details:
        return details
    message = error.get("message")
    return message if isinstance(message, str) else ""


def is_valid_signature(raw_body: bytes, header: str | None, app_secret: str) -> bool:
    """True when X-Hub-Signature-256 is the HMAC-SHA256 of the exact raw body bytes."""
    if header is None or not header.startswith(SIGNATURE_PREFIX):
        return False
    expected = hmac.new(app_secret.encode(), raw_body, hashlib.sha256).hexdigest()
    received = header.removeprefix(SIGNATURE_PREFIX).lower()
    return hmac.compare_digest(expected.encode(), received.encode())


def answer_verification(query: Mapping[str, str], verify_token: str) -> str | None:
    """hub.challenge when Meta's GET handshake carries our verify token, else None."""
    challenge = query.get("hub.challenge")
    token = query.get("hub.verify_token")
    if query.get("hub.mode") != "subscribe" or challenge is None or token is None:
        return None
    if not hmac.compare_digest(token.encode(), verify_token.encode()):
        return None
    return challenge


def parse_status_webhook(raw_body: bytes) -> list[StatusUpdate]:
    """Our statuses from a webhook body; others' and malformed entries are skipped.

    Raises ValueError when the body is not JSON.
    """
    try:
        document: object = orjson.loads(raw_body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"webhook body is not JSON: {exc}") from exc
    updates: list[StatusUpdate] = []
    for entry in _list_at(document, "entry"):
        for change in _list_at(entry, "changes"):
            value = change.get("value") if isinstance(change, dict) else None
            for status in _list_at(value, "statuses"):
                update = _read_status(status)
                if update is not None:
                    updates.append(update)
    return updates


def count_system_errors(raw_body: bytes) -> int:
    """The errors[] of a webhook's changes that name no message (an app or account problem
    Meta reports outside any status). 0 when the body is not JSON."""
    try:
        document: object = orjson.loads(raw_body)
    except orjson.JSONDecodeError:
        return 0
    return sum(
        len(_list_at(change.get("value") if isinstance(change, dict) else None, "errors"))
        for entry in _list_at(document, "entry")
        for change in _list_at(entry, "changes")
    )


def _list_at(container: object, key: str) -> list[object]:
    value = container.get(key) if isinstance(container, dict) else None
    return value if isinstance(value, list) else []


def _read_status(status: object) -> StatusUpdate | None:
    if not isinstance(status, dict):
        return None
    ledger_id = _ledger_id(status.get("biz_opaque_callback_data"))
    state = status.get("status")
    raw_id = status.get("id")
    message_id = raw_id if isinstance(raw_id, str) and raw_id else None
    # Meta does not always echo biz_opaque_callback_data: the wamid alone still names it.
    if (ledger_id is None and message_id is None) or not isinstance(state, str):
        return None
    if state not in WEBHOOK_STATUSES:
        return None
    error_code, error_text = _status_error(status) if state == "failed" else (None, None)
    return StatusUpdate(
        ledger_id=ledger_id,
        status=state,
        provider_message_id=message_id,
        error_code=error_code,
        error_text=error_text,
    )


def _ledger_id(callback_data: object) -> int | None:
    if not isinstance(callback_data, str) or not callback_data.startswith(CALLBACK_PREFIX):
        return None
    digits = callback_data.removeprefix(CALLBACK_PREFIX)
    return int(digits) if digits.isascii() and digits.isdigit() else None


def _status_error(status: Mapping[str, object]) -> tuple[str | None, str | None]:
    errors = status.get("errors")
    first = errors[0] if isinstance(errors, list) and errors else None
    if not isinstance(first, dict):
        return None, None
    code = first.get("code")
    title = first.get("title")
    return (
        str(code) if isinstance(code, int | str) else None,
        title[:MAX_ERROR_TEXT_CHARS] if isinstance(title, str) else None,
    )


def parse_inbound_texts(raw_body: bytes) -> list[tuple[str, str]]:
    """(sender in E.164, text) of each message a person sent us in a webhook body: typed text
    and the text of a tapped quick-reply button (a marketing template's "Stop promotions").
    Other kinds and malformed entries are skipped; a body that is not JSON gives none."""
    try:
        document: object = orjson.loads(raw_body)
    except orjson.JSONDecodeError:
        return []
    return [
        inbound
        for entry in _list_at(document, "entry")
        for change in _list_at(entry, "changes")
        for message in _list_at(
            change.get("value") if isinstance(change, dict) else None, "messages"
        )
        if (inbound := _read_inbound(message)) is not None
    ]


def _read_inbound(message: object) -> tuple[str, str] | None:
    if not isinstance(message, dict):
        return None
    sender = message.get("from")
    kind = message.get("type")
    part = message.get(kind) if isinstance(kind, str) and kind in ("text", "button") else None
    text = part.get("body" if kind == "text" else "text") if isinstance(part, dict) else None
    if not isinstance(sender, str) or not sender.isdigit() or not isinstance(text, str):
        return None
    return f"+{sender}", text


def is_marketing_template(message: OutboundMessage) -> bool:
    body = message.body
    return isinstance(body, TemplateBody) and body.category == "marketing"


# The fields the Marketing Messages API takes: no biz_opaque_callback_data, so its status
# webhooks are matched by the message id alone.
MARKETING_REQUEST_FIELDS = ("messaging_product", "recipient_type", "to", "type", "template")


def marketing_request_body(request: Mapping[str, object]) -> dict[str, object]:
    """The /messages request of a marketing template as /marketing_messages takes it."""
    return {key: request[key] for key in MARKETING_REQUEST_FIELDS}


def parse_opted_out_statuses(raw_body: bytes) -> list[str]:
    """The numbers (E.164) of `failed` statuses that say the person stopped marketing messages:
    Meta reports 131050 this way too, after accepting the message."""
    try:
        document: object = orjson.loads(raw_body)
    except orjson.JSONDecodeError:
        return []
    return [
        f"+{status['recipient_id']}"
        for entry in _list_at(document, "entry")
        for change in _list_at(entry, "changes")
        for status in _list_at(
            change.get("value") if isinstance(change, dict) else None, "statuses"
        )
        if isinstance(status, dict)
        and status.get("status") == "failed"
        and _status_error(status)[0] in {str(code) for code in OPTED_OUT_CODES}
        and str(status.get("recipient_id", "")).isdigit()
    ]
