"""Recipients as producers write them: E.164 normalisation, de-duplication, recipients_key pages."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import zoneinfo
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, TypeVar

import orjson
import phonenumbers
import redis.asyncio
from phonenumbers import timezone as phone_time_zones
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError
from redis.asyncio.cluster import RedisCluster

from blastd.errors import InvalidJobError, InvalidNumberError

# C0 controls other than tab, newline and carriage return: PostgreSQL text rejects NUL, and the
# rest are never legitimate in a message or a number.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
PREVIEW_CHARS = 60
MAX_ENTRY_BYTES = 65_536  # one recipients_key element; a page holds thousands of them
MAX_NUMBER_CHARS = 64  # longer input is rejected before any parsing work
MAX_NUMBER_DIGITS = 17  # libphonenumber's own limit, national prefix included
# Entries read or normalised between two turns of the event loop. A page of 5,000 takes about
# 100 ms of CPU; in one go it stalls every send for that long, and a paced account's sends then
# leave late and together: behind such stalls, bench/multi_rate.py saw 1,003 arrivals in one
# second at R = 1,000. 100 entries take about 2 ms: with 250 (5 ms), a shared pacer's head
# still woke more than its 5 ms allowance late, and gave its slot up, many times a second.
SLICE_ENTRIES = 100

T = TypeVar("T")
U = TypeVar("U")

_SEPARATORS = str.maketrans("", "", " \t\u00a0-.()")
_NUMBER_SHAPE = re.compile(r"\+?\d+")
_PARSE_PROBLEMS = {
    phonenumbers.NumberParseException.INVALID_COUNTRY_CODE: "unknown country code",
    phonenumbers.NumberParseException.NOT_A_NUMBER: "not a number",
    phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "too short",
    phonenumbers.NumberParseException.TOO_SHORT_NSN: "too short",
    phonenumbers.NumberParseException.TOO_LONG: "too long",
}


def preview(value: str) -> str:
    """Return `value` cut to 60 characters and escaped onto one line, safe to echo in a reason."""
    cut = value[:PREVIEW_CHARS]
    return repr(cut) + ("…" if len(value) > PREVIEW_CHARS else "")


def _reject_control_chars(value: str) -> str:
    if found := CONTROL_CHARS.search(value):
        code = ord(found.group())
        raise PydanticCustomError("control_char", f"control character U+{code:04X}")
    return value


def _vars_as_strings(value: object) -> dict[str, str]:
    """Accept string and number values (numbers become their decimal text), nothing else."""
    if not isinstance(value, dict):
        raise PydanticCustomError("vars_type", "must be an object of strings or numbers")
    converted: dict[str, str] = {}
    for name, item in value.items():
        if isinstance(item, str):
            converted[name] = item
        elif isinstance(item, int | float) and not isinstance(item, bool):
            converted[name] = str(item)
        else:
            message = "value of {name} must be a string or a number, not {kind}"
            context = {"name": preview(str(name)), "kind": type(item).__name__}
            raise PydanticCustomError("var_type", message, context)
        _reject_control_chars(name)
        _reject_control_chars(converted[name])
    return converted


class RecipientIn(BaseModel):
    """One recipient as the producer wrote it: the raw number and its placeholder values."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    to: Annotated[str, AfterValidator(_reject_control_chars)]
    vars: Annotated[dict[str, str], BeforeValidator(_vars_as_strings)] = {}


@dataclass(frozen=True, slots=True)
class BadEntry:
    """A recipients_key element that is not a recipient; the caller records it as skipped."""

    raw_preview: str
    reason: str


def normalize_number(raw: str, default_region: str) -> str:
    """Return `raw` in E.164 ('+6281234567890') or raise InvalidNumberError with the reason."""
    if len(raw) > MAX_NUMBER_CHARS:
        raise InvalidNumberError("invalid number: too long")
    compact = raw.translate(_SEPARATORS)
    _check_shape(compact)
    if compact.startswith("+") and compact.isascii() and (e164 := _e164_fast_path(compact)):
        return e164
    number = _parse_valid_number(compact, default_region)
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _check_shape(compact: str) -> None:
    if not compact:
        raise InvalidNumberError("invalid number: empty")
    if not _NUMBER_SHAPE.fullmatch(compact):
        has_letters = any(char.isalpha() for char in compact)
        problem = "contains letters" if has_letters else "unexpected character"
        raise InvalidNumberError(f"invalid number: {problem}")
    if len(compact) - compact.startswith("+") > MAX_NUMBER_DIGITS:
        raise InvalidNumberError("invalid number: too long")


def _e164_fast_path(compact: str) -> str | None:
    """Validate '+<digits>' without phonenumbers.parse (about 3x faster); None means take the
    full parse. Country calling codes are prefix-free, so the first known prefix is the one."""
    digits = compact[1:]
    for length in (1, 2, 3):
        country_code = int(digits[:length])
        if country_code in COUNTRY_CODE_TO_REGION_CODE:
            national = digits[length:]
            if not national or national.startswith("0"):  # Italian leading zero: full parse
                return None
            number = phonenumbers.PhoneNumber(
                country_code=country_code, national_number=int(national)
            )
            return compact if phonenumbers.is_valid_number(number) else None
    return None


def _parse_valid_number(compact: str, default_region: str) -> phonenumbers.PhoneNumber:
    number = _parse(compact, default_region)
    if phonenumbers.is_valid_number(number):
        return number
    if compact.startswith("+"):
        code = number.country_code
        raise InvalidNumberError(f"invalid number: not a valid number for country code +{code}")
    # An international number written without its '+' (14155552671 given region ID).
    with contextlib.suppress(InvalidNumberError):
        retried = _parse("+" + compact, None)
        if phonenumbers.is_valid_number(retried):
            return retried
    raise InvalidNumberError(f"invalid number: not a valid number for region {default_region}")


def _parse(compact: str, region: str | None) -> phonenumbers.PhoneNumber:
    try:
        return phonenumbers.parse(compact, region)
    except phonenumbers.NumberParseException as exc:
        problem = _PARSE_PROBLEMS.get(exc.error_type, "not a number")
        raise InvalidNumberError(f"invalid number: {problem}") from None


def time_zone_of(e164: str) -> str:
    """The IANA time zone a sending window is read in for this number; 'UTC' when unknown.

    libphonenumber names one zone for most numbers (by area code where numbering is
    geographic) but all of a country's zones for the mobile ranges of some countries (Russia,
    Australia). We take the first it lists (alphabetical), as the README documents: there the
    window is only as exact as the spread of that country's zones. About 35 us a number, so
    intake pays it only for campaigns that have a window."""
    number = phonenumbers.parse(e164)
    for name in phone_time_zones.time_zones_for_number(number):
        if _is_known_zone(name):
            return name
    return "UTC"  # non-geographic codes such as +800 answer 'Etc/Unknown'


@functools.cache
def _is_known_zone(name: str) -> bool:
    """Whether this host's tz database has `name`: the campaign converts times with it."""
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


async def stream_recipients_key(
    redis_client: redis.asyncio.Redis | RedisCluster,
    key: str,
    page_size: int,
    *,
    start: int = 0,
    expected: int | None = None,
    first_page_size: int | None = None,
) -> AsyncIterator[list[RecipientIn | BadEntry]]:
    """Yield the list at `key` from index `start` in LRANGE pages of `page_size` (the first
    one `first_page_size`, when given), never the whole list at once.

    The list must hold still while it is read: its length is taken first (or is `expected`,
    its length when an earlier read began), every page must come back whole, and the list must
    hold that many still after the last page. Otherwise InvalidJobError says how much was read,
    so no campaign is committed short of recipients deleted (or one long of recipients
    appended) while it was read."""
    if expected is None:
        expected = await redis_client.llen(key)
    read = start
    size = first_page_size or page_size
    while read < expected:
        size = min(size, expected - read)
        page: list[bytes | str] = await redis_client.lrange(key, read, read + size - 1)
        if len(page) < size:
            raise await _changed_while_read(redis_client, key, read, expected)
        read += size
        yield await map_in_slices(parse_recipient_entry, page)
        size = page_size
    if await redis_client.llen(key) != expected:
        raise await _changed_while_read(redis_client, key, read, expected)


async def _changed_while_read(
    redis_client: redis.asyncio.Redis | RedisCluster, key: str, read: int, expected: int
) -> InvalidJobError:
    now = await redis_client.llen(key)
    return InvalidJobError(
        f"recipients_key changed while it was read: {read} of {expected} read, "
        f"the list holds {now} now"
    )


async def map_in_slices(fn: Callable[[T], U], items: Sequence[T]) -> list[U]:
    """[fn(item) for item in items], giving the event loop a turn every SLICE_ENTRIES items."""
    done: list[U] = []
    for start in range(0, len(items), SLICE_ENTRIES):
        if start:
            await asyncio.sleep(0)
        done.extend(map(fn, items[start : start + SLICE_ENTRIES]))
    return done


def parse_recipient_entry(entry: bytes | str) -> RecipientIn | BadEntry:
    """Read one recipients_key element: JSON {"to", "vars"}, a JSON string or a bare number."""
    if len(entry) > MAX_ENTRY_BYTES:
        return BadEntry(_entry_preview(entry), f"entry is over {MAX_ENTRY_BYTES} bytes")
    try:
        text = entry.decode() if isinstance(entry, bytes) else entry
    except UnicodeDecodeError:
        return BadEntry(_entry_preview(entry), "entry is not valid UTF-8")
    stripped = text.strip()
    if not stripped.startswith(("{", "[", '"')):
        return _validate_recipient({"to": stripped}, stripped)
    try:
        value = orjson.loads(stripped)
    except orjson.JSONDecodeError as exc:
        return BadEntry(preview(stripped), f"invalid JSON: {exc.msg}")
    if isinstance(value, str):
        return _validate_recipient({"to": value}, stripped)
    if not isinstance(value, dict):
        return BadEntry(preview(stripped), "entry must be a JSON object, a string or a number")
    return _validate_recipient(value, stripped)


def _validate_recipient(value: dict[str, object], text: str) -> RecipientIn | BadEntry:
    try:
        return RecipientIn.model_validate(value)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(part) for part in error["loc"])
        return BadEntry(preview(text), f"invalid recipient: {field}: {error['msg']}")


def _entry_preview(entry: bytes | str) -> str:
    if isinstance(entry, bytes):
        return preview(entry[: PREVIEW_CHARS + 1].decode(errors="replace"))
    return preview(entry)
