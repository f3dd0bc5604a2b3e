"""What the Wablas emulator reads from a send request, and how it refuses one.

Shapes: docs/providers.md, Wablas. Wablas refuses with HTTP 200 and
{"status": false, "message": ...} for most reasons; the texts here are our own wording,
chosen to look like the reasons integrations report.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl

import orjson

TOKEN_REFUSAL = "token invalid or unauthorized"
DEVICE_REFUSAL = "device disconnected, please scan the QR code again"
QUOTA_REFUSAL = "quota exhausted or package expired, please renew your package"
TRUE_STRINGS = ("true", "1")


class Refusal(Exception):
    """Ends a send with {"status": false, "message": text}, or a bare page for 5xx answers."""

    def __init__(self, reason: str, text: str, http_status: int = 200) -> None:
        super().__init__(text)
        self.reason = reason  # the key it is counted under in /_sandbox/stats
        self.text = text
        self.http_status = http_status


@dataclass(frozen=True, slots=True)
class Item:
    """One message to send: a v2 `data` entry, or the body of a single send."""

    phone: str  # digits, as Wablas wants them
    content: str  # the text, or the video URL
    caption: str | None
    is_video: bool


def read_bulk_items(raw_body: bytes, is_video: bool) -> list[Item]:
    """The items of {"data": [...]}; top-level retry/priority are accepted and ignored."""
    try:
        document = orjson.loads(raw_body)
    except orjson.JSONDecodeError as exc:
        raise Refusal("bad_request", "invalid JSON body") from exc
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list) or not data:
        raise Refusal("bad_request", "data must be a non-empty array")
    return [read_item(entry, is_video) for entry in data]


def read_fields(raw_body: bytes, content_type: str) -> dict[str, object]:
    """A single send's fields: Wablas takes JSON and form posts alike."""
    if content_type == "application/json":
        try:
            document = orjson.loads(raw_body)
        except orjson.JSONDecodeError as exc:
            raise Refusal("bad_request", "invalid JSON body") from exc
        if not isinstance(document, dict):
            raise Refusal("bad_request", "body must be an object")
        return document
    try:
        return dict(parse_qsl(raw_body.decode(), keep_blank_values=True))
    except UnicodeDecodeError as exc:
        raise Refusal("bad_request", "body is not UTF-8") from exc


def read_item(entry: object, is_video: bool) -> Item:
    """One item: a v2 `data` entry, or the fields of a single send."""
    if not isinstance(entry, dict):
        raise Refusal("bad_request", "each data entry must be an object")
    phone = entry.get("phone")
    if not isinstance(phone, str) or not _is_phone_or_group(phone, entry.get("isGroup")):
        raise Refusal("invalid_number", f"phone number invalid: {phone!r}")
    field = "video" if is_video else "message"
    content = entry.get(field)
    if not isinstance(content, str) or not content:
        raise Refusal("bad_request", f"{field} is required")
    caption = entry.get("caption") if is_video else None
    return Item(phone, content, caption if isinstance(caption, str) else None, is_video)


def _is_phone_or_group(phone: str, is_group: object) -> bool:
    # A group id is "<digits>-<digits>" (package README); isGroup comes as bool or "true".
    if is_group is True or (isinstance(is_group, str) and is_group.lower() in TRUE_STRINGS):
        head, _, tail = phone.partition("-")
        return head.isdigit() and tail.isdigit()
    return phone.isascii() and phone.isdigit() and 8 <= len(phone) <= 15


def is_authorized(
    authorization: str | None, tokens: frozenset[str], secret_key: str, auth: str
) -> bool:
    """`auth` says which forms are accepted: "token", "token_secret" or "either"."""
    if authorization is None:
        return False
    token, dot, secret = authorization.partition(".")
    if dot:
        return auth != "token" and token in tokens and secret == secret_key
    return auth != "token_secret" and token in tokens
