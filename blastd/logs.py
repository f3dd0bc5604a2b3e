"""structlog setup: JSON lines off a terminal, console on one; numbers masked, secrets scrubbed."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

# A phone number as it reaches a log line: 8 to 15 digits in a run, optionally after '+'
# ("6281234567890"), or written for people, starting with '+', '(' or a trunk '0', with single
# spaces or dashes and a bracketed area code ("+62 812-3456-7890", "(021) 555-1234",
# "0812 3456 7890"). Dates (2026-12-03) and addresses (10.0.0.1) start otherwise: left alone.
# A full stop may end one (a sentence), a decimal point may not (a measurement).
PHONE_PATTERN = re.compile(
    r"(?<![\w.+(-])(?:\+?\d{8,15}|(?:\+\d|\(\d|0\d)(?:[ -]?\(?\d\)?){6,14})(?!\w|\.\d)"
)
MIN_DIGITS, KEPT_HEAD, KEPT_TAIL = 8, 3, 4  # the country prefix and the last four digits stay
REDACTED = "[redacted]"

EventDict = MutableMapping[str, Any]


def mask_phone_numbers(_logger: object, _name: str, event: EventDict) -> EventDict:
    """Keep the country prefix and the last four digits of anything that looks like a number."""
    for key, value in event.items():
        event[key] = map_strings(value, mask_numbers)
    return event


def mask_numbers(text: str) -> str:
    """The text with every phone number in it masked."""
    return PHONE_PATTERN.sub(_masked, text)


def map_strings(value: object, fn: Callable[[str], str]) -> Any:
    """Apply `fn` to every string in a field, inside dicts, lists and tuples too.

    Containers are copied, never changed in place: they may be the caller's live objects.
    """
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {map_strings(key, fn): map_strings(item, fn) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [map_strings(item, fn) for item in value]
    return value


def _masked(match: re.Match[str]) -> str:
    """Keep the first three and the last four digits, the separators as written."""
    found = match.group(0)
    digits = sum(char.isdigit() for char in found)
    if digits < MIN_DIGITS:
        return found  # a short number: a count, a port, not a phone
    out, seen = [], 0
    for char in found:
        if char.isdigit():
            seen += 1
            hidden = KEPT_HEAD < seen <= digits - KEPT_TAIL
            out.append("*" if hidden else char)
        else:
            out.append(char)
    return "".join(out)


class SecretScrubber:
    """Replaces every configured secret in every string, nested ones and tracebacks included."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, _logger: object, _name: str, event: EventDict) -> EventDict:
        for key, value in event.items():
            event[key] = map_strings(value, self.scrub)
        return event

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


def configure(
    *,
    level: str = "info",
    fmt: str = "auto",
    secrets: Iterable[str] = (),
    mask_phones: bool = True,
    stream: TextIO | None = None,
) -> None:
    """Set up structlog once per process; `fmt` is auto, json or console."""
    out = stream or sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if mask_phones:
        processors.append(mask_phone_numbers)
    processors.append(SecretScrubber(secrets))
    if as_json:
        processors.append(structlog.processors.JSONRenderer(serializer=_dumps))
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )


def _dumps(event: EventDict, **_kwargs: Any) -> str:
    return orjson.dumps(event, default=str).decode()
