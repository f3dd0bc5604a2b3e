"""What the Cloud API answers to a send request it cannot accept: validation and error codes.

Checks follow Meta's OpenAPI spec (Message, TemplateObject, MediaObject schemas) and the error
codes of docs/errors.md (Cloud API).
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

SUPPORTED_TYPES = ("text", "template", "video")
MAX_CALLBACK_DATA_CHARS = 512  # OpenAPI spec: biz_opaque_callback_data maxLength
MAX_TEXT_BODY_CHARS = 4096
MAX_CAPTION_CHARS = 1024  # OpenAPI spec: MediaObject caption maxLength
# The message kinds Meta knows: a request of one we do not emulate is 131051, not an unknown key.
MESSAGE_KINDS = (
    *SUPPORTED_TYPES,
    *("image", "audio", "document", "sticker", "location", "contacts", "interactive", "reaction"),
)
# The spec's Message schemas do not allow other top-level properties.
TOP_LEVEL_KEYS = frozenset(
    {"messaging_product", "recipient_type", "to", "type", "context", "biz_opaque_callback_data"}
    | set(MESSAGE_KINDS)
)
UNKNOWN_OBJECT_SUBCODE = 33  # with code 100: the path names an object Graph does not have

# code -> (HTTP status, title). Meta says not to parse titles; these are our own wording.
# The HTTP statuses of 4, 368, 131048 and 80007 are not confirmed: these are the likeliest.
GRAPH_ERRORS: dict[int, tuple[int, str]] = {
    1: (400, "API Unknown"),
    2: (503, "API Service"),
    4: (429, "Application request limit reached"),
    10: (403, "Application does not have permission for this action"),
    100: (400, "Invalid parameter"),
    190: (401, "Invalid OAuth access token"),
    2500: (400, "Unknown path components"),
    2635: (400, "You are calling a deprecated version of the Graph API"),
    368: (403, "Temporarily blocked for policies violations"),
    80007: (429, "Rate limit issues"),
    130429: (429, "Rate limit hit"),
    130472: (400, "User's number is part of an experiment"),
    131000: (500, "Something went wrong"),
    131008: (400, "Required parameter is missing"),
    131009: (400, "Parameter value is not valid"),
    131014: (400, "Media could not be downloaded from the given URL"),
    131016: (503, "Service unavailable"),
    131026: (400, "Message undeliverable"),
    131031: (403, "Business Account locked"),
    131042: (400, "Business eligibility payment issue"),
    131047: (400, "Re-engagement message"),
    131048: (400, "Spam rate limit hit"),
    131049: (400, "Message not delivered to maintain healthy ecosystem engagement"),
    131050: (400, "User has stopped marketing messages"),
    131051: (400, "Unsupported message type"),
    131053: (400, "Media upload error"),
    131056: (429, "(Business Account, Consumer Account) pair rate limit hit"),
    132000: (400, "Number of parameters does not match the expected number of params"),
    132001: (400, "Template name does not exist in the translation"),
    132015: (400, "Template is paused"),
    132016: (400, "Template is disabled"),
}
UNKNOWN_ERROR = (400, "Unknown error")


class Rejection(Exception):
    """Ends a send with an error answer: a Graph code, or a bare HTTP status without one."""

    def __init__(
        self,
        code: int | None,
        details: str = "",
        http_status: int = 502,
        subcode: int | None = None,
        message: str | None = None,
    ) -> None:
        super().__init__(code)
        self.code = code
        self.details = details
        self.http_status = http_status
        self.subcode = subcode
        self.message = message  # Graph's own wording, when the title is not it


def check_version(version: str, phone_number_id: str, versions: tuple[str, ...]) -> None:
    """Reject an API version Graph does not serve: an old one, or one it never had."""
    if version in versions:
        return
    if _is_older(version, versions):
        raise Rejection(2635, f"{version} is no longer served; use one of {', '.join(versions)}")
    message = f"Unknown path components: /{version}/{phone_number_id}"
    raise Rejection(2500, f"{version} is not an API version", message=message)


def check_phone_number_id(phone_number_id: str, hosted: frozenset[str]) -> None:
    """Reject a phone-number id the account does not have, as Graph does any unknown object."""
    if phone_number_id in hosted:
        return
    message = (
        f"Unsupported post request. Object with ID '{phone_number_id}' does not exist, "
        "cannot be loaded due to missing permissions, or does not support this operation"
    )
    raise Rejection(100, "no such phone number", subcode=UNKNOWN_OBJECT_SUBCODE, message=message)


def _is_older(version: str, versions: tuple[str, ...]) -> bool:
    """Whether `version` is a well-formed version below every supported one."""
    numbers = [_version_number(v) for v in versions]
    number = _version_number(version)
    known = [n for n in numbers if n is not None]
    return number is not None and bool(known) and number < min(known)


def _version_number(version: str) -> float | None:
    try:
        return float(version.removeprefix("v")) if version.startswith("v") else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class SendRequest:
    """The parts of a valid send request the emulator acts on."""

    to: str  # as sent
    wa_id: str  # digits only
    type: str
    callback_data: str | None


def read_message(raw_body: bytes, templates: dict[tuple[str, str], int]) -> SendRequest:
    """The message in a send request, or a Rejection with the code Meta would answer."""
    try:
        document = orjson.loads(raw_body)
    except orjson.JSONDecodeError:
        raise Rejection(100, "the request body is not JSON") from None
    if not isinstance(document, dict):
        raise Rejection(100, "the request body is not a JSON object")
    unknown = sorted(key for key in document if key not in TOP_LEVEL_KEYS)
    if unknown:
        raise Rejection(100, f"unknown parameter {unknown[0]!r}")
    product = _required_str(document, "messaging_product")
    if product != "whatsapp":
        raise Rejection(100, "messaging_product must be whatsapp")
    to = _required_str(document, "to")
    message_type = _required_str(document, "type")
    if message_type not in SUPPORTED_TYPES:
        raise Rejection(131051, f"type {message_type!r} is not one of {SUPPORTED_TYPES}")
    _check_content(message_type, document.get(message_type), templates)
    return SendRequest(to, _digits_of(to), message_type, _callback_data(document))


def _required_str(document: dict[str, object], key: str) -> str:
    value = document.get(key)
    if value is None or value == "":
        raise Rejection(131008, f"{key} is required")
    if not isinstance(value, str):
        raise Rejection(100, f"{key} must be a string")
    return value


def _digits_of(to: str) -> str:
    wa_id = "".join(char for char in to if char.isdigit())
    if not wa_id:
        raise Rejection(131009, "to is not a phone number")
    return wa_id


def _callback_data(document: dict[str, object]) -> str | None:
    value = document.get("biz_opaque_callback_data")
    if value is not None and (not isinstance(value, str) or len(value) > MAX_CALLBACK_DATA_CHARS):
        raise Rejection(100, "biz_opaque_callback_data must be a string of at most 512 chars")
    return value


def _check_content(
    message_type: str, content: object, templates: dict[tuple[str, str], int]
) -> None:
    if not isinstance(content, dict):
        raise Rejection(131008, f"the {message_type} object is required")
    if message_type == "text":
        _check_text_body(content.get("body"))
    if message_type == "video":
        _check_video(content)
    if message_type == "template":
        _check_template(content, templates)


def _check_text_body(body: object) -> None:
    if not _is_text(body):
        raise Rejection(131008, "text.body is required")
    assert isinstance(body, str)  # _is_text
    if not body.strip():
        raise Rejection(100, "text.body must not be blank")
    if len(body) > MAX_TEXT_BODY_CHARS:
        raise Rejection(100, f"text.body is longer than {MAX_TEXT_BODY_CHARS} characters")


def _check_video(video: dict[str, object]) -> None:
    if not (_is_text(video.get("link")) or _is_text(video.get("id"))):
        raise Rejection(131008, "video.link or video.id is required")
    caption = video.get("caption")
    if isinstance(caption, str) and len(caption) > MAX_CAPTION_CHARS:
        raise Rejection(100, f"video.caption is longer than {MAX_CAPTION_CHARS} characters")


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _check_template(template: dict[str, object], templates: dict[tuple[str, str], int]) -> None:
    name = template.get("name")
    language = template.get("language")
    code = language.get("code") if isinstance(language, dict) else None
    if not isinstance(name, str) or not isinstance(code, str):
        raise Rejection(131008, "template.name and template.language.code are required")
    expected = templates.get((name, code))
    if expected is None:
        raise Rejection(132001, f"template {name!r} does not exist in {code!r}")
    received = _count_body_params(template.get("components", []))
    if received != expected:
        raise Rejection(132000, f"template {name!r} takes {expected} body parameters")


def _count_body_params(components: object) -> int:
    if not isinstance(components, list):
        raise Rejection(100, "template.components must be an array")
    return sum(
        len(component.get("parameters") or ())
        for component in components
        if isinstance(component, dict) and component.get("type") == "body"
    )
