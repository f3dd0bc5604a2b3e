from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from blastd.errors import InvalidJobError
from blastd.job_fields import BlastOptions
from blastd.jobs import (
    BlastJob,
    MessageSpec,
    missing_variables,
    parse_job,
    placeholders,
    render,
)
from blastd.providers.base import TemplateBody, TextBody, VideoBody
from blastd.recipients import RecipientIn
from tests.poison_jobs import ACCOUNT, MALFORMED_JOBS, REASON_WORDS

MAX_BYTES = 1_048_576


def parse(
    raw: bytes, *, max_bytes: int = MAX_BYTES, max_inline_recipients: int = 10_000
) -> BlastJob:
    return parse_job(
        raw,
        max_bytes=max_bytes,
        accounts={ACCOUNT, "wablas-2"},
        max_inline_recipients=max_inline_recipients,
        default_region="ID",
    )


def job(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "type": "blast",
        "id": "promo-2026-11",
        "account": ACCOUNT,
        "message": {"text": "Hi {name}"},
        "recipients": [{"to": "+6281234567890", "vars": {"name": "Budi"}}],
    }
    return orjson.dumps(base | fields)


def message(spec: dict[str, Any]) -> MessageSpec:
    return MessageSpec.model_validate(spec)


def test_corpus_has_at_least_30_distinct_jobs() -> None:
    names = [name for name, _ in MALFORMED_JOBS]
    assert len(set(names)) == len(names) >= 30
    assert set(REASON_WORDS) == set(names)


@pytest.mark.parametrize(("name", "raw"), MALFORMED_JOBS, ids=[name for name, _ in MALFORMED_JOBS])
def test_malformed_job_is_rejected_with_a_one_line_reason(name: str, raw: bytes) -> None:
    with pytest.raises(InvalidJobError) as caught:
        parse(raw)
    reason = caught.value.reason
    assert REASON_WORDS[name].lower() in reason.lower()
    assert reason == str(caught.value)
    assert reason.isprintable()  # so no line break either
    assert len(reason) <= 200


def test_design_example_parses() -> None:
    raw = job(
        message={
            "template": {"name": "promo_nov", "language": "id", "params": ["{name}", "{code}"]}
        },
        recipients=[{"to": "+6281234567890", "vars": {"name": "Budi", "code": "X1"}}],
        options={"rate_per_s": 80, "not_before": "2026-11-22T09:00:00+07:00"},
    )
    parsed = parse(raw)
    assert parsed.id == "promo-2026-11"
    assert parsed.account == ACCOUNT
    assert parsed.message.template is not None
    assert parsed.message.template.params == ("{name}", "{code}")
    assert parsed.recipients == [
        RecipientIn(to="+6281234567890", vars={"name": "Budi", "code": "X1"})
    ]
    assert parsed.recipients_key is None
    assert parsed.options.rate_per_s == 80.0
    assert parsed.options.not_before == datetime(2026, 11, 22, 2, 0, tzinfo=UTC)


def test_not_before_with_z_suffix_is_utc() -> None:
    parsed = parse(job(options={"not_before": "2026-11-22T09:00:00Z"}))
    assert parsed.options.not_before == datetime(2026, 11, 22, 9, 0, tzinfo=UTC)


def test_recipients_key_job_parses_without_inline_recipients() -> None:
    raw = orjson.dumps(
        {
            "type": "blast",
            "id": "big",
            "account": "wablas-2",
            "message": {"video": {"link": "https://cdn.test/v.mp4", "caption": "For {name}"}},
            "recipients_key": "app:recipients:big",
        }
    )
    parsed = parse(raw)
    assert parsed.recipients is None
    assert parsed.recipients_key == "app:recipients:big"
    assert parsed.options == BlastOptions()


def test_unknown_top_level_fields_are_ignored() -> None:
    parsed = parse(job(priority="high", created_by={"user": 7}, tags=["a", "b"]))
    assert parsed.id == "promo-2026-11"
    assert "priority" not in parsed.model_dump()


def test_number_vars_become_text_without_coercing_strings() -> None:
    raw = job(recipients=[{"to": "+6281234567890", "vars": {"n": 3, "price": 12.5, "code": "007"}}])
    (recipient,) = parse(raw).recipients or []
    assert recipient.vars == {"n": "3", "price": "12.5", "code": "007"}


def test_invalid_numbers_do_not_invalidate_a_job_with_one_valid_number() -> None:
    """Bad numbers are skipped recipient by recipient at intake, not by failing the job."""
    raw = job(recipients=[{"to": "12"}, {"to": "not a number"}, {"to": "0812-3456-7890"}])
    parsed = parse(raw)
    assert [r.to for r in parsed.recipients or []] == ["12", "not a number", "0812-3456-7890"]


def test_inline_recipients_at_the_limit_are_accepted() -> None:
    raw = job(recipients=[{"to": "+6281234567890"}] * 5)
    assert len(parse(raw, max_inline_recipients=5).recipients or []) == 5
    with pytest.raises(InvalidJobError, match="over the limit of 4"):
        parse(raw, max_inline_recipients=4)


def test_size_is_checked_before_parsing() -> None:
    raw = b"{not json at all" + b" " * 2000
    with pytest.raises(InvalidJobError, match="over the 1024-byte limit"):
        parse(raw, max_bytes=1024)


def test_million_deep_nesting_is_rejected_clearly() -> None:
    raw = b'{"type": "blast", "id": "deep", "x": ' + b"[" * 1_000_000 + b"]" * 1_000_000 + b"}"
    with pytest.raises(InvalidJobError, match="nested deeper than 1024 levels"):
        parse(raw, max_bytes=len(raw))


def test_legal_deep_nesting_in_an_ignored_field_is_accepted() -> None:
    """orjson allows 1024 levels, near Python's recursion limit: the checks must not recurse."""
    depth = 1020
    raw = job()[:-1] + b', "extra": ' + b"[" * depth + b'"x"' + b"]" * depth + b"}"
    assert parse(raw).id == "promo-2026-11"


def test_job_id_travels_with_the_error_once_read() -> None:
    with pytest.raises(InvalidJobError) as caught:
        parse(job(account="nobody"))
    assert caught.value.job_id == "promo-2026-11"
    with pytest.raises(InvalidJobError) as caught:
        parse(job(id=""))
    assert caught.value.job_id is None


def test_echoed_input_is_truncated() -> None:
    with pytest.raises(InvalidJobError) as caught:
        parse(job(account="a" * 10_000))
    assert "a" * 60 in caught.value.reason
    assert "a" * 61 not in caught.value.reason


def test_line_breaks_and_tabs_are_allowed_in_message_text() -> None:
    parsed = parse(job(message={"text": "Line 1\r\nLine 2\tend"}))
    assert parsed.message.text == "Line 1\r\nLine 2\tend"


def test_line_break_in_template_name_is_rejected() -> None:
    raw = job(message={"template": {"name": "promo\nnov", "language": "id"}})
    with pytest.raises(
        InvalidJobError, match=r"message\.template\.name: control character U\+000A"
    ):
        parse(raw)


def test_rtl_override_is_kept_literally_in_text() -> None:
    """Right-to-left text is legitimate content; only ids must be plainly printable."""
    text = "\u202e\u0645\u0631\u062d\u0628\u0627 {name}"
    parsed = parse(job(message={"text": text}))
    assert render(parsed.message, {"name": "Budi"}) == TextBody(
        "\u202e\u0645\u0631\u062d\u0628\u0627 Budi"
    )


@pytest.mark.parametrize(
    "hostile",
    [
        "{0.__class__}",
        "{name.__class__.__mro__}",
        "{0}",
        "{name!r}",
        "{name:>99999999}",
        "{{name}}x",
    ],
)
def test_format_string_attacks_stay_literal(hostile: str) -> None:
    parsed = parse(job(message={"text": f"Hi {hostile} {{name}}"}))
    body = render(parsed.message, {"name": "Budi"})
    expected = f"Hi {hostile} {{name}}".replace("{name}", "Budi")
    assert body == TextBody(expected)


def test_substituted_values_are_not_expanded_again() -> None:
    spec = message({"text": "{a} and {b}"})
    assert render(spec, {"a": "{b}", "b": "{0.__class__}"}) == TextBody("{b} and {0.__class__}")


def test_only_identifier_tokens_are_placeholders() -> None:
    spec = message({"text": "{ name } {1st} {} {first_name} {_x9} {a-b}"})
    assert placeholders(spec) == frozenset({"first_name", "_x9"})
    rendered = render(spec, {"first_name": "Budi", "_x9": "9"})
    assert rendered == TextBody("{ name } {1st} {} Budi 9 {a-b}")


def test_template_params_are_rendered_per_recipient() -> None:
    spec = message(
        {
            "template": {
                "name": "promo_nov",
                "language": "en_US",
                "params": ["{name}", "fixed", "code {code}!"],
                "header_video": "https://cdn.test/h.mp4",
            }
        }
    )
    assert placeholders(spec) == frozenset({"name", "code"})
    assert render(spec, {"name": "Budi", "code": "X1"}) == TemplateBody(
        "promo_nov", "en_US", ("Budi", "fixed", "code X1!"), "https://cdn.test/h.mp4"
    )
    second = render(spec, {"name": "Sari", "code": "Y2"})
    assert isinstance(second, TemplateBody)
    assert second.body_params == ("Sari", "fixed", "code Y2!")


def test_video_caption_is_rendered_and_link_left_alone() -> None:
    spec = message({"video": {"link": "https://cdn.test/{name}.mp4", "caption": "For {name}"}})
    assert placeholders(spec) == frozenset({"name"})
    assert render(spec, {"name": "Budi"}) == VideoBody("https://cdn.test/{name}.mp4", "For Budi")
    bare = message({"video": {"link": "http://cdn.test/v.mp4"}})
    assert render(bare, {}) == VideoBody("http://cdn.test/v.mp4", None)


def test_missing_variables_are_reported_and_render_refuses_them() -> None:
    spec = message({"text": "Hi {name}, code {code}"})
    assert missing_variables(spec, {"name": "Budi"}) == frozenset({"code"})
    assert missing_variables(spec, {"name": "Budi", "code": "X", "extra": "y"}) == frozenset()
    with pytest.raises(KeyError):
        render(spec, {"name": "Budi"})


def test_message_round_trips_through_json_for_the_ledger() -> None:
    spec = message({"template": {"name": "promo", "language": "id", "params": ["{name}"]}})
    stored = orjson.loads(orjson.dumps(spec.model_dump(mode="json")))
    reloaded = MessageSpec.model_validate(stored)
    assert reloaded == spec
    assert render(reloaded, {"name": "Budi"}) == render(spec, {"name": "Budi"})


def test_options_round_trip_through_json_for_the_ledger() -> None:
    options = parse(
        job(options={"rate_per_s": 2.5, "not_before": "2026-01-01T00:00:00+07:00"})
    ).options
    stored = orjson.loads(orjson.dumps(options.model_dump(mode="json", exclude_none=True)))
    assert BlastOptions.model_validate(stored) == options


@pytest.mark.parametrize(
    ("spec", "word"),
    [
        ({"text": "Hi", "template": None}, None),
        ({"template": {"name": "t", "language": "english"}}, "language"),
        ({"video": {"link": "https://"}}, "URL"),
        ({"video": {"link": "https://cdn.test/a b.mp4"}}, "spaces"),
        ({"video": {"link": "https://cdn.test/v.mp4", "caption": "x" * 1025}}, "caption"),
    ],
)
def test_message_spec_edge_cases(spec: dict[str, Any], word: str | None) -> None:
    raw = job(message=spec)
    if word is None:
        assert parse(raw).message.text == "Hi"
        return
    with pytest.raises(InvalidJobError) as caught:
        parse(raw)
    assert word.lower() in caught.value.reason.lower()
