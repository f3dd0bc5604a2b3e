"""Parsing and validation of the jobs that arrive on Redis, and rendering of their messages.

A job is checked in order: size, UTF-8, JSON, object, `id`, control characters, `type`, then the
type's own model (pydantic, strict: a number where a string belongs is an error, never coerced).
Every failure is an InvalidJobError whose reason is one line that echoes at most 60 characters
of the input. Unknown top-level fields are ignored so producers can add them first; unknown
fields inside `message` and `options` are rejected, because there a typo changes what is sent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping
from typing import Annotated, Any, Literal, get_args

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic_core import PydanticCustomError

from blastd.errors import InvalidJobError
from blastd.job_fields import (
    JSON_MAX_DEPTH,
    MAX_CAPTION_CHARS,
    MAX_NAME_CHARS,
    MAX_TEXT_CHARS,
    MESSAGE_TEXT,
    PLACEHOLDER,
    SINGLE_LINE,
    BlastOptions,
    Compiled,
    HttpUrl,
    JobId,
    Limits,
    Line,
    MessageText,
    RedisKey,
    Spec,
    check_inline_count,
    fill,
    id_problem,
    list_as_tuple,
    require_a_valid_number,
    require_one_source,
    validate,
)
from blastd.providers.base import Body, TemplateBody, TextBody, VideoBody
from blastd.recipients import CONTROL_CHARS, RecipientIn, preview
from blastd.video.jobs import VideoBlastJob, VideoPollJob, parse_video_blast, parse_video_poll

MESSAGE_KINDS = ("text", "template", "video")
ControlAction = Literal["pause", "resume", "cancel", "retry_failed"]
CONTROL_SCOPES = ("messages", "videos")  # failed sends, or failed renders of a video_blast
# Classes whose recipients a retry may send again: the provider error classes, and 'uncertain'
# (the request may have reached the provider; resending is the operator's explicit choice).
RetryClass = Literal[
    "transient", "throttled", "pair_limit", "quality", "permanent", "campaign_fatal", "uncertain"
]
RETRY_CLASSES: tuple[RetryClass, ...] = get_args(RetryClass)
# Meta's template categories; a text or video message counts as marketing.
MessageCategory = Literal["marketing", "utility", "authentication"]
# The provider could not take these then; sending again later is what they call for.
DEFAULT_RETRY_CLASSES: tuple[RetryClass, ...] = ("transient", "throttled")

_JSON_KINDS = {dict: "object", list: "array", str: "string", int: "number", float: "number"}
# orjson's wording for its depth limit names no number; say what the producer has to change.
_JSON_PROBLEMS = {"depth limit exceeded": f"nested deeper than {JSON_MAX_DEPTH} levels"}


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return _JSON_KINDS.get(type(value), type(value).__name__)


class TemplateSpec(Spec):
    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS), SINGLE_LINE]
    language: Annotated[str, Field(pattern=r"^[A-Za-z]{2,3}([_-][A-Za-z0-9]{2,8})*$")]
    params: Annotated[tuple[MessageText, ...], BeforeValidator(list_as_tuple)] = ()
    header_video: HttpUrl | None = None
    category: MessageCategory = "marketing"


class VideoSpec(Spec):
    link: HttpUrl
    caption: Annotated[str, Field(max_length=MAX_CAPTION_CHARS), MESSAGE_TEXT] | None = None


class MessageSpec(Spec):
    """Exactly one of text, template or video. Placeholder texts are split once, on first use,
    so that rendering a recipient's message is a dict lookup per placeholder and a join."""

    text: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS), MESSAGE_TEXT] | None = None
    template: TemplateSpec | None = None
    video: VideoSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _require_one_kind(cls, value: object) -> object:
        if not isinstance(value, dict | MessageSpec):
            raise PydanticCustomError("message_type", "must be an object")
        if isinstance(value, dict):
            kinds = [kind for kind in MESSAGE_KINDS if value.get(kind) is not None]
            if len(kinds) != 1:
                found = ", ".join(kinds) or "none"
                raise PydanticCustomError(
                    "message_kind",
                    "needs exactly one of text, template, video (found: {found})",
                    {"found": found},
                )
        return value

    @functools.cached_property
    def _compiled(self) -> Compiled:
        # A cached_property lives in the instance dict: reading it is a plain attribute lookup,
        # where a pydantic private attribute costs microseconds per render.
        parts = tuple(tuple(PLACEHOLDER.split(text)) for text in self._texts())
        return Compiled(parts, frozenset(name for split in parts for name in split[1::2]))

    @property
    def category(self) -> MessageCategory:
        """The category the opt-out list is checked against."""
        return self.template.category if self.template is not None else "marketing"

    def _texts(self) -> tuple[str, ...]:
        """The texts that may hold placeholders, in the order _body takes them back."""
        if self.text is not None:
            return (self.text,)
        if self.template is not None:
            return self.template.params
        assert self.video is not None  # _require_one_kind
        return () if self.video.caption is None else (self.video.caption,)

    def _body(self, texts: list[str]) -> Body:
        if self.text is not None:
            return TextBody(texts[0])
        if self.template is not None:
            spec = self.template
            return TemplateBody(
                spec.name, spec.language, tuple(texts), spec.header_video, spec.category
            )
        assert self.video is not None  # _require_one_kind
        return VideoBody(self.video.link, texts[0] if texts else None)


class BlastJob(BaseModel):
    """One message to many recipients, inline or in the Redis list named by recipients_key."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    type: Literal["blast"] = "blast"
    id: JobId
    account: Line
    message: MessageSpec
    recipients: Annotated[list[RecipientIn], Field(min_length=1)] | None = None
    recipients_key: RedisKey | None = None
    options: BlastOptions = BlastOptions()

    @model_validator(mode="after")
    def _require_one_recipient_source(self) -> BlastJob:
        require_one_source(self.recipients, self.recipients_key, "recipients")
        return self


def _known_scope(value: str) -> str:
    if value not in CONTROL_SCOPES:
        supported = ", ".join(CONTROL_SCOPES)
        raise PydanticCustomError(
            "scope",
            "scope {scope} is not supported (supported: {supported})",
            {"scope": preview(value), "supported": supported},
        )
    return value


class ControlJob(BaseModel):
    """An operator's action on an existing campaign: pause, resume, cancel or retry_failed."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    type: Literal["control"] = "control"
    id: JobId
    action: ControlAction
    campaign_id: JobId
    scope: Annotated[str, AfterValidator(_known_scope)] = "messages"
    classes: (
        Annotated[
            tuple[RetryClass, ...],
            Field(min_length=1),
            BeforeValidator(list_as_tuple),
        ]
        | None
    ) = None

    @model_validator(mode="after")
    def _classes_only_for_retry(self) -> ControlJob:
        if self.classes is not None and self.action != "retry_failed":
            raise PydanticCustomError("classes", "classes: only retry_failed takes classes")
        return self


StatusKind = Literal["text", "image", "video"]
HexColor = Annotated[str, Field(pattern=r"^#[0-9A-Fa-f]{6}$")]


class StatusSpec(Spec):
    """The status (story) to post: a text on a background, or an image or video by URL."""

    type: StatusKind
    text: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS), MESSAGE_TEXT] | None = None
    url: HttpUrl | None = None
    caption: Annotated[str, Field(max_length=MAX_CAPTION_CHARS), MESSAGE_TEXT] | None = None
    background_color: HexColor = "#000000"  # text only; Evolution requires one
    font: Annotated[int, Field(ge=0, le=5)] = 1  # text only; Evolution's range

    @model_validator(mode="after")
    def _require_what_the_type_shows(self) -> StatusSpec:
        if self.type == "text" and (self.text is None or self.url is not None):
            raise PydanticCustomError("status_kind", "a text status needs text and no url")
        if self.type != "text" and (self.url is None or self.text is not None):
            raise PydanticCustomError("status_kind", "an image or video status needs url, no text")
        return self


class StatusContact(BaseModel):
    """One contact of a status: the number, and a priority (higher first; the top one anchors)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    to: Annotated[str, Field(max_length=MAX_NAME_CHARS), SINGLE_LINE]
    priority: Annotated[float, Field(allow_inf_nan=False)] = 0.0


class StatusOptions(Spec):
    """Per-job overrides of the account's batch settings, and the order of the contacts."""

    batch_size: Annotated[int, Field(ge=1, le=100_000)] | None = None
    batch_delay_ms: Annotated[float, Field(ge=0, le=3_600_000, allow_inf_nan=False)] | None = None
    max_concurrent_batches: Annotated[int, Field(ge=1, le=100)] | None = None
    order_by_priority: bool = True
    group_by_country: bool = False


class StatusJob(BaseModel):
    """A status to many contacts through a status gateway account (docs/status.md)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    type: Literal["status"] = "status"
    id: JobId
    account: Line
    status: StatusSpec
    contacts: Annotated[list[StatusContact], Field(min_length=1)] | None = None
    contacts_key: RedisKey | None = None
    options: StatusOptions = StatusOptions()

    @model_validator(mode="after")
    def _require_one_contact_source(self) -> StatusJob:
        require_one_source(self.contacts, self.contacts_key, "contacts")
        return self


Job = BlastJob | ControlJob | StatusJob | VideoBlastJob | VideoPollJob


def parse_job(
    raw: bytes,
    *,
    max_bytes: int,
    accounts: Collection[str],
    max_inline_recipients: int,
    default_region: str,
    video_accounts: Collection[str] = (),
) -> Job:
    """Return the validated job or raise InvalidJobError with a one-line reason and its id."""
    data = _load_object(raw, max_bytes)
    job_id = _read_id(data)
    try:
        _check_control_chars(data)
        parse = _JOB_TYPES[_read_type(data)]
        limits = Limits(accounts, max_inline_recipients, default_region, video_accounts)
        return parse(data, limits)
    except InvalidJobError as exc:
        exc.job_id = job_id
        raise


def _load_object(raw: bytes, max_bytes: int) -> dict[str, Any]:
    if len(raw) > max_bytes:
        raise InvalidJobError(f"job is {len(raw)} bytes, over the {max_bytes}-byte limit")
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise InvalidJobError(f"job is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        problem = _JSON_PROBLEMS.get(exc.msg, exc.msg)
        where = f"line {exc.lineno} column {exc.colno}"
        raise InvalidJobError(f"invalid JSON: {problem} at {where}") from None
    if not isinstance(data, dict):
        raise InvalidJobError(f"job must be a JSON object, not {_json_kind(data)}")
    return data


def _read_id(data: dict[str, Any]) -> str:
    job_id = data.get("id")
    if job_id is None:
        raise InvalidJobError("missing id")
    if not isinstance(job_id, str):
        raise InvalidJobError(f"id must be a string, not {_json_kind(job_id)}")
    if problem := id_problem(job_id):
        raise InvalidJobError(problem)
    return job_id


def _check_control_chars(data: dict[str, Any]) -> None:
    """Reject C0 controls (but tab, CR, LF) in every string and key, ignored fields included:
    PostgreSQL text and jsonb refuse NUL. Iterative: a valid document may be 1024 deep."""
    stack: list[tuple[object, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            _reject_control_chars(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else key
                _reject_control_chars(key, child)
                stack.append((item, child))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{index}]") for index, item in enumerate(value))


def _reject_control_chars(text: str, path: str) -> None:
    if found := CONTROL_CHARS.search(text):
        code = ord(found.group())
        raise InvalidJobError(f"control character U+{code:04X} in {preview(path)}")


def _read_type(data: dict[str, Any]) -> str:
    job_type = data.get("type")
    if job_type is None:
        raise InvalidJobError("missing type")
    if not isinstance(job_type, str):
        raise InvalidJobError(f"type must be a string, not {_json_kind(job_type)}")
    if job_type not in _JOB_TYPES:
        known = ", ".join(sorted(_JOB_TYPES))
        raise InvalidJobError(f"unknown type {preview(job_type)} (known: {known})")
    return job_type


def _parse_blast(data: dict[str, Any], limits: Limits) -> BlastJob:
    check_inline_count(data, "recipients", limits)
    job = validate(BlastJob, data)
    if job.account not in limits.messaging_accounts:
        raise InvalidJobError(f"unknown account {preview(job.account)}")
    if job.recipients is not None:
        require_a_valid_number(job.recipients, limits.default_region)
    return job


def _parse_status(data: dict[str, Any], limits: Limits) -> StatusJob:
    check_inline_count(data, "contacts", limits)
    job = validate(StatusJob, data)
    if job.account not in limits.messaging_accounts:
        raise InvalidJobError(f"unknown account {preview(job.account)}")
    return job


def _parse_control(data: dict[str, Any], limits: Limits) -> ControlJob:
    return validate(ControlJob, data)


_JOB_TYPES: dict[str, Callable[[dict[str, Any], Limits], Job]] = {
    "blast": _parse_blast,
    "control": _parse_control,
    "status": _parse_status,
    "video_blast": parse_video_blast,
    "video_poll": parse_video_poll,
}


def placeholders(message: MessageSpec) -> frozenset[str]:
    """Return the names of the `{name}` placeholders the message uses."""
    return message._compiled.names


def missing_variables(message: MessageSpec, values: Mapping[str, str]) -> frozenset[str]:
    """Return the placeholder names that `values` does not provide."""
    return frozenset(name for name in message._compiled.names if name not in values)


def render(message: MessageSpec, values: Mapping[str, str]) -> Body:
    """Substitute `{name}` tokens only, in one pass; anything else stays literal.

    Raises KeyError for a missing name: check missing_variables first. Values are never
    re-scanned, and str.format is never used, so '{0.__class__}' from a producer stays text.
    """
    return message._body([fill(parts, values) for parts in message._compiled.parts])
