from __future__ import annotations

import asyncio

import orjson
import phonenumbers
import pytest
import redis.asyncio as aioredis

from blastd.errors import InvalidNumberError
from blastd.recipients import (
    MAX_ENTRY_BYTES,
    SLICE_ENTRIES,
    BadEntry,
    RecipientIn,
    map_in_slices,
    normalize_number,
    parse_recipient_entry,
    stream_recipients_key,
)

E164 = "+6281234567890"


@pytest.mark.parametrize(
    "raw",
    [
        "+6281234567890",
        "+62 812-3456-7890",
        "+62 (812) 3456-7890",
        "0812-3456-7890",
        "081234567890",
        "(0812) 3456.7890",
        "0812 3456 7890",
        "6281234567890",
        "62 812 3456 7890",
        "81234567890",
        "\u00a00812\u00a03456\u00a07890 ",
        "\t+62.812.3456.7890",
        "\u0660\u0668\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669\u0660",
        "+\u0666\u0662\u0668\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669\u0660",
    ],
)
def test_indonesian_forms_collapse_to_one_e164(raw: str) -> None:
    assert normalize_number(raw, "ID") == E164


def test_international_number_without_plus_is_retried_with_plus() -> None:
    assert normalize_number("14155552671", "ID") == "+14155552671"
    assert normalize_number("4915123456789", "ID") == "+4915123456789"


def test_national_number_follows_the_default_region() -> None:
    assert normalize_number("030 123456", "DE") == "+4930123456"
    assert normalize_number("(415) 555-2671", "US") == "+14155552671"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("", "empty"),
        ("  - ", "empty"),
        ("0812-ABCD-7890", "contains letters"),
        ("1-800-FLOWERS", "contains letters"),
        ("+62 812 3456 7890 ext. 5", "contains letters"),
        ("0812#3456", "unexpected character"),
        ("+62+8123456789", "unexpected character"),
        ("0812/3456/7890", "unexpected character"),
        ("\u0660\u0668\u0661\u0662x", "contains letters"),
        ("1" * 18, "too long"),
        ("0" * 100, "too long"),
        ("+0812345678", "unknown country code"),
        ("12", "not a valid number for region ID"),
        ("0812", "not a valid number for region ID"),
        ("+6212345", "not a valid number for country code +62"),
        ("+1 555 0100", "not a valid number for country code +1"),
    ],
)
def test_invalid_numbers_are_rejected_with_a_reason(raw: str, problem: str) -> None:
    with pytest.raises(InvalidNumberError) as caught:
        normalize_number(raw, "ID")
    assert caught.value.reason == f"invalid number: {problem}"


@pytest.mark.parametrize("region", sorted(phonenumbers.SUPPORTED_REGIONS))
def test_e164_fast_path_agrees_with_libphonenumber(region: str) -> None:
    """The '+digits' shortcut must give what a full parse gives, for every region's examples."""
    for kind in (phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE):
        example = phonenumbers.example_number_for_type(region, kind)
        if example is None:
            continue
        e164 = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
        national = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.NATIONAL)
        assert normalize_number(e164, "ID") == e164
        if not any(char.isalpha() for char in national):
            assert normalize_number(national, region) == e164


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (b'{"to": "0812-3456-7890", "vars": {"name": "Budi", "n": 2}}',
         RecipientIn(to="0812-3456-7890", vars={"name": "Budi", "n": "2"})),
        (b"+6281234567890", RecipientIn(to="+6281234567890")),
        (b" 0812 3456 7890\n", RecipientIn(to="0812 3456 7890")),
        (b'"+6281234567890"', RecipientIn(to="+6281234567890")),
        ("6281234567890", RecipientIn(to="6281234567890")),
        (b'{"to": "+6281234567890", "priority": 1}', RecipientIn(to="+6281234567890")),
    ],
)  # fmt: skip
def test_entries_parse_to_recipients(entry: bytes | str, expected: RecipientIn) -> None:
    assert parse_recipient_entry(entry) == expected


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (b'{"to": 6281234567890}', "invalid recipient: to: Input should be a valid string"),
        (b'{"vars": {}}', "invalid recipient: to: Field required"),
        (b'{"to": "+62", "vars": {"a": [1]}}', "invalid recipient: vars: value of 'a'"),
        (b'{"to": "+62", "vars": "x"}', "invalid recipient: vars: must be an object"),
        (b'{"to": "+62\\u0000"}', "invalid recipient: to: control character U+0000"),
        (b"+62\x00812", "invalid recipient: to: control character U+0000"),
        (b'{"to": "+62"', "invalid JSON"),
        (b"[1, 2]", "entry must be a JSON object"),
        (b"\xff\xfe", "entry is not valid UTF-8"),
        (b"x" * (MAX_ENTRY_BYTES + 1), f"entry is over {MAX_ENTRY_BYTES} bytes"),
    ],
)
def test_malformed_entries_become_bad_entries(entry: bytes, reason: str) -> None:
    result = parse_recipient_entry(entry)
    assert isinstance(result, BadEntry)
    assert result.reason.startswith(reason)
    assert result.raw_preview.isprintable()
    assert len(result.raw_preview) <= 70


@pytest.fixture
def redis_client(redis: aioredis.Redis) -> aioredis.Redis:
    """The session's real Redis (tests/conftest.py), flushed for this test."""
    return redis


async def collect_pages(
    client: aioredis.Redis, key: str, page_size: int
) -> list[list[RecipientIn | BadEntry]]:
    return [page async for page in stream_recipients_key(client, key, page_size)]


async def test_stream_yields_pages_in_list_order(redis_client: aioredis.Redis) -> None:
    entries = [orjson.dumps({"to": f"+62812345678{i:02d}", "vars": {"i": i}}) for i in range(12)]
    await redis_client.rpush("recipients:a", *entries)
    pages = await collect_pages(redis_client, "recipients:a", page_size=5)
    assert [len(page) for page in pages] == [5, 5, 2]
    flat = [entry for page in pages for entry in page]
    assert flat == [RecipientIn(to=f"+62812345678{i:02d}", vars={"i": str(i)}) for i in range(12)]


async def test_stream_ends_cleanly_on_an_exact_page_boundary(redis_client: aioredis.Redis) -> None:
    await redis_client.rpush("recipients:b", *[b"+6281234567890"] * 10)
    pages = await collect_pages(redis_client, "recipients:b", page_size=5)
    assert [len(page) for page in pages] == [5, 5]


async def test_stream_of_a_missing_key_is_empty(redis_client: aioredis.Redis) -> None:
    assert await collect_pages(redis_client, "recipients:none", page_size=5) == []


async def test_stream_marks_malformed_elements_and_keeps_going(
    redis_client: aioredis.Redis,
) -> None:
    await redis_client.rpush(
        "recipients:c", b'{"to": "+6281234567890"}', b"{broken", b"\xff", b"0812-3456-7890"
    )
    (page,) = await collect_pages(redis_client, "recipients:c", page_size=100)
    assert page[0] == RecipientIn(to="+6281234567890")
    assert isinstance(page[1], BadEntry)
    assert page[1].reason.startswith("invalid JSON")
    assert page[1].raw_preview == "'{broken'"
    assert isinstance(page[2], BadEntry)
    assert page[3] == RecipientIn(to="0812-3456-7890")


async def test_a_long_page_gives_other_tasks_turns_while_it_is_worked_through() -> None:
    """A page is normalised a slice at a time, so a send that falls due meanwhile goes out."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)  # the ticker's first turn
    started = ticks
    done = await map_in_slices(str, range(SLICE_ENTRIES * 4))
    ticker.cancel()
    assert done == [str(n) for n in range(SLICE_ENTRIES * 4)]
    assert ticks - started == 3  # one turn between each two slices
