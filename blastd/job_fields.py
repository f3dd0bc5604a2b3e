"""The building blocks of job models: checked field types, the placeholder renderer, the
shared options, and the one-line description of a validation error."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from blastd.errors import InvalidJobError, InvalidNumberError
from blastd.recipients import CONTROL_CHARS, RecipientIn, normalize_number, preview

ModelT = TypeVar("ModelT", bound=BaseModel)
MAX_ID_CHARS = 200
MAX_TEXT_CHARS = 4096  # Cloud API text body limit
MAX_CAPTION_CHARS = 1024  # Cloud API media caption limit
MAX_URL_CHARS = 2048
MAX_NAME_CHARS = 512
MAX_PROBLEMS = 10  # validation problems named in one reason
MAX_LOCATION_CHARS = 80  # a field path in a reason; longer (hostile keys) is cut by preview()
JSON_MAX_DEPTH = 1024  # orjson's fixed nesting limit


PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


CLOCK = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")


def rejecting(pattern: re.Pattern[str]) -> AfterValidator:
    def check(value: str) -> str:
        if found := pattern.search(value):
            code = ord(found.group())
            raise PydanticCustomError("control_char", f"control character U+{code:04X}")
        return value

    return AfterValidator(check)


def http_url(value: str) -> str:
    try:
        parts = urlsplit(value)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise PydanticCustomError("url", "must be an http(s) URL")
    if not value.isprintable() or " " in value:
        raise PydanticCustomError("url", "must be an http(s) URL without spaces")
    return value


def id_problem(value: str) -> str | None:
    if not value.strip():
        return "id is empty"
    if len(value) > MAX_ID_CHARS:
        return f"id is longer than {MAX_ID_CHARS} characters"
    if not value.isprintable():
        return f"id {preview(value)} contains a control or invisible character"
    return None


def valid_id(value: str) -> str:
    if problem := id_problem(value):
        raise PydanticCustomError("job_id", problem)
    return value


def list_as_tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def aware_datetime(value: object) -> object:
    """ISO-8601 with an explicit offset, converted to UTC; pydantic's strict mode takes no str."""
    if isinstance(value, str) and len(value) <= 64:
        with contextlib.suppress(ValueError):  # left a str: rejected just below
            value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise PydanticCustomError("datetime", "must be an ISO-8601 datetime string")
    if value.utcoffset() is None:
        raise PydanticCustomError("datetime", "needs a timezone, e.g. +07:00 or Z")
    return value.astimezone(UTC)


# Length constraints go before these validators, so that pydantic words them for a string.
SINGLE_LINE = rejecting(re.compile(r"[\x00-\x1f]"))
MESSAGE_TEXT = rejecting(CONTROL_CHARS)
Line = Annotated[str, SINGLE_LINE]
MessageText = Annotated[str, MESSAGE_TEXT]
RedisKey = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS), SINGLE_LINE]
HttpUrl = Annotated[str, Field(max_length=MAX_URL_CHARS), AfterValidator(http_url)]
JobId = Annotated[str, AfterValidator(valid_id)]


Parts = tuple[str, ...]  # literal, name, literal, name, ..., literal: re.split with one group


@dataclass(frozen=True, slots=True)
class Compiled:
    parts: tuple[Parts, ...]
    names: frozenset[str]


def fill(parts: Parts, values: Mapping[str, str]) -> str:
    if len(parts) == 1:
        return parts[0]
    filled = list(parts)
    for index in range(1, len(parts), 2):
        filled[index] = values[parts[index]]
    return "".join(filled)


class Spec(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")


def clock_time(value: str) -> str:
    if not CLOCK.fullmatch(value):
        raise PydanticCustomError("clock", "must be HH:MM, from 00:00 to 23:59")
    return value


ClockTime = Annotated[str, AfterValidator(clock_time)]
AwareDatetime = Annotated[datetime, BeforeValidator(aware_datetime)]


class SendWindow(Spec):
    """Hours of the recipient's local day when sending is allowed: start included, end not.
    An end before the start wraps past midnight (21:00-06:00)."""

    start: ClockTime
    end: ClockTime

    @model_validator(mode="after")
    def _require_a_span(self) -> SendWindow:
        if self.start == self.end:
            raise PydanticCustomError("window", "start and end must differ")
        return self

    def contains(self, local: time) -> bool:
        """True when `local`, a wall-clock time in the recipient's zone, is inside the window."""
        start, end = time.fromisoformat(self.start), time.fromisoformat(self.end)
        if start < end:
            return start <= local < end
        return local >= start or local < end


class BlastOptions(Spec):
    rate_per_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    not_before: AwareDatetime | None = None
    not_after: AwareDatetime | None = None  # pending recipients then end 'expired'
    window: SendWindow | None = None

    @model_validator(mode="after")
    def _require_not_after_later(self) -> BlastOptions:
        if self.not_before and self.not_after and self.not_after <= self.not_before:
            raise PydanticCustomError("not_after", "not_after must be later than not_before")
        return self


@dataclass(frozen=True, slots=True)
class Limits:
    accounts: Collection[str]
    max_inline_recipients: int
    default_region: str
    video_accounts: Collection[str] = ()  # the accounts of a video kind, among `accounts`

    @property
    def messaging_accounts(self) -> set[str]:
        return set(self.accounts) - set(self.video_accounts)


def require_a_valid_number(recipients: list[RecipientIn], default_region: str) -> None:
    """Invalid numbers are skipped one by one later, but a job with no valid one is dead."""
    first_problem = ""
    for recipient in recipients:
        try:
            normalize_number(recipient.to, default_region)
        except InvalidNumberError as exc:
            first_problem = first_problem or exc.reason
        else:
            return
    raise InvalidJobError(f"no valid recipient (first: {first_problem})")


def describe(exc: ValidationError) -> str:
    """Every problem on one line: 'missing account; missing notify'. A hostile job can hold
    thousands; past MAX_PROBLEMS the rest are counted, so the reason stays readable."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    reasons = [_problem(error) for error in errors[:MAX_PROBLEMS]]
    more = len(errors) - len(reasons)
    return "; ".join(reasons) + (f" (and {more} more)" if more else "")


def _problem(error: ErrorDetails) -> str:
    where = location(error)
    if error["type"] == "missing":
        return f"missing {where}"
    if error["type"] == "extra_forbidden":
        return f"unknown field {where}"
    return f"{where}: {error['msg']}" if where else error["msg"]


def location(error: ErrorDetails) -> str:
    where = ""
    for part in error["loc"]:
        if isinstance(part, int):
            where += f"[{part}]"
        else:
            where = f"{where}.{part}" if where else part
    return where if where.isprintable() and len(where) <= MAX_LOCATION_CHARS else preview(where)


def require_one_source(items: object, key: object, field: str) -> None:
    """A job names its recipients (or contacts) inline in `field` or by `{field}_key`: one."""
    if (items is None) == (key is None):
        raise PydanticCustomError(
            "source", "exactly one of {field} and {field}_key is required", {"field": field}
        )


def check_inline_count(data: dict[str, Any], field: str, limits: Limits) -> None:
    """Before validating a long inline list: past the limit it belongs in a Redis list."""
    items = data.get(field)
    if isinstance(items, list) and len(items) > limits.max_inline_recipients:
        raise InvalidJobError(
            f"{len(items)} inline {field}, over the limit of "
            f"{limits.max_inline_recipients}: use {field}_key"
        )


def validate(model: type[ModelT], data: dict[str, Any]) -> ModelT:
    """The job as `model`, or InvalidJobError with the first problem as its reason."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidJobError(describe(exc)) from None
