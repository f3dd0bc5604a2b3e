"""Malformed and hostile job payloads: every one must be dead-lettered, none may crash blastd.

Shared by tests/test_jobs.py (parse_job) and daemon-level tests (pushed onto Redis). They assume
the default limits (max_job_bytes 1 MiB, max_inline_recipients 10,000), default_region 'ID' and
one configured account, 'cloud-main'. REASON_WORDS gives a word each reason must contain.
"""

from __future__ import annotations

from typing import Any

import orjson

ACCOUNT = "cloud-main"
VALID_RECIPIENT = {"to": "+6281234567890", "vars": {"name": "Budi"}}
_DROP = object()  # a field value meaning: leave the field out


def _job(name: str, **fields: Any) -> bytes:
    job: dict[str, Any] = {
        "type": "blast",
        "id": f"poison-{name}",
        "account": ACCOUNT,
        "message": {"text": "Hi {name}"},
        "recipients": [VALID_RECIPIENT],
    }
    job.update(fields)
    return orjson.dumps({key: value for key, value in job.items() if value is not _DROP})


def _drop(name: str, field: str) -> bytes:
    return _job(name, **{field: _DROP})


_TEMPLATE = {"name": "promo_nov", "language": "id", "params": ["{name}"]}
_DEEP = b"[" * 100_000 + b"]" * 100_000  # 200 kB: under the size cap, far over orjson's depth

# (name, payload, a word the reason must contain)
_CORPUS: list[tuple[str, bytes, str]] = [
    ("over_size_10mb", b'{"type":"blast","id":"big","x":"' + b"x" * 10_485_760 + b'"}', "limit"),
    ("empty_payload", b"", "JSON"),
    ("invalid_utf8", b'{"type": "blast", "id": "caf\xe9"}', "UTF-8"),
    ("truncated_json", b'{"type": "blast", "id": "cut', "JSON"),
    ("trailing_comma", b'{"type": "blast", "id": "comma",}', "JSON"),
    ("nan_literal", b'{"type": "blast", "id": "nan", "options": {"rate_per_s": NaN}}', "JSON"),
    ("infinity_literal", b'{"type": "blast", "id": "inf", "x": Infinity}', "JSON"),
    ("number_overflows_to_infinity", b'{"type": "blast", "id": "big-num", "x": 1e400}', "JSON"),
    ("lone_surrogate_escape", b'{"type": "blast", "id": "sur", "x": "\\ud800"}', "JSON"),
    ("deep_nesting_100k", b'{"type": "blast", "id": "deep", "x": ' + _DEEP + b"}", "nested"),
    ("top_level_array", b'[{"type": "blast"}]', "object"),
    ("top_level_string", b'"blast"', "object"),
    ("missing_id", _drop("missing_id", "id"), "id"),
    ("empty_id", _job("empty_id", id=""), "id"),
    ("whitespace_id", _job("whitespace_id", id="   "), "id"),
    ("id_not_string", _job("id_not_string", id=12345), "id"),
    ("id_too_long", _job("id_too_long", id="x" * 201), "id"),
    ("id_with_newline", _job("id_with_newline", id="a\nb"), "id"),
    ("id_with_rtl_override", _job("id_with_rtl_override", id="invoice\u202egpj.exe"), "id"),
    ("missing_type", _drop("missing_type", "type"), "type"),
    ("unknown_type", _job("unknown_type", type="nuke"), "type"),
    ("type_not_string", _job("type_not_string", type=["blast"]), "type"),
    ("unknown_account", _job("unknown_account", account="someone-else"), "account"),
    ("account_not_string", _job("account_not_string", account=7), "account"),
    ("missing_message", _drop("missing_message", "message"), "message"),
    ("message_not_object", _job("message_not_object", message="Hi"), "message"),
    ("message_without_kind", _job("message_without_kind", message={}), "message"),
    (
        "message_two_kinds",
        _job("message_two_kinds", message={"text": "Hi", "video": {"link": "https://x.test/v"}}),
        "exactly one",
    ),
    (
        "message_unknown_field",
        _job("message_unknown_field", message={"text": "Hi", "b": 1}),
        "unknown",
    ),
    ("text_not_string", _job("text_not_string", message={"text": 42}), "string"),
    ("text_empty", _job("text_empty", message={"text": ""}), "text"),
    ("text_too_long", _job("text_too_long", message={"text": "x" * 4097}), "text"),
    (
        "template_missing_name",
        _job("template_missing_name", message={"template": {"language": "id"}}),
        "name",
    ),
    (
        "template_missing_language",
        _job("template_missing_language", message={"template": {"name": "promo_nov"}}),
        "language",
    ),
    (
        "template_param_number",
        _job("template_param_number", message={"template": {**_TEMPLATE, "params": [1]}}),
        "params",
    ),
    (
        "template_unknown_field",
        _job("template_unknown_field", message={"template": {**_TEMPLATE, "body": "x"}}),
        "unknown",
    ),
    (
        "template_header_video_not_http",
        _job(
            "template_header_video_not_http",
            message={"template": {**_TEMPLATE, "header_video": "ftp://x.test/v.mp4"}},
        ),
        "URL",
    ),
    (
        "video_link_javascript",
        _job("video_link_javascript", message={"video": {"link": "javascript:alert(1)"}}),
        "URL",
    ),
    ("nul_in_text", _job("nul_in_text", message={"text": "Hi\x00there"}), "control"),
    ("nul_in_ignored_field", _job("nul_in_ignored_field", note="a\x00b"), "control"),
    (
        "escape_char_in_var",
        _job("escape_char_in_var", recipients=[{"to": "+6281234567890", "vars": {"n": "\x1b[2J"}}]),
        "control",
    ),
    ("control_char_in_key", _job("control_char_in_key", **{"bad\x07key": 1}), "control"),
    (
        "both_recipients_and_key",
        _job("both_recipients_and_key", recipients_key="blastd:recipients:x"),
        "recipients",
    ),
    ("neither_recipients_nor_key", _drop("neither_recipients_nor_key", "recipients"), "recipients"),
    ("empty_recipients", _job("empty_recipients", recipients=[]), "recipients"),
    ("recipients_not_list", _job("recipients_not_list", recipients={"to": "+62"}), "recipients"),
    (
        "recipient_bare_string",
        _job("recipient_bare_string", recipients=["+6281234567890"]),
        "recipients",
    ),
    (
        "recipient_to_is_number",
        _job("recipient_to_is_number", recipients=[{"to": 6281234567890}]),
        "to",
    ),
    ("recipient_missing_to", _job("recipient_missing_to", recipients=[{"vars": {}}]), "to"),
    (
        "var_value_boolean",
        _job("var_value_boolean", recipients=[{"to": "+6281234567890", "vars": {"vip": True}}]),
        "vars",
    ),
    (
        "var_value_nested",
        _job("var_value_nested", recipients=[{"to": "+6281234567890", "vars": {"a": {"b": 1}}}]),
        "vars",
    ),
    (
        "all_numbers_invalid",
        _job("all_numbers_invalid", recipients=[{"to": "12"}, {"to": "call me"}, {"to": ""}]),
        "no valid recipient",
    ),
    (
        "too_many_inline_recipients",
        _job("too_many_inline_recipients", recipients=[{"to": "+6281234567890"}] * 10_001),
        "recipients_key",
    ),
    (
        "recipients_key_empty",
        _job("recipients_key_empty", recipients=_DROP, recipients_key=""),
        "recipients_key",
    ),
    (
        "recipients_key_number",
        _job("recipients_key_number", recipients=_DROP, recipients_key=9),
        "recipients_key",
    ),
    ("rate_zero", _job("rate_zero", options={"rate_per_s": 0}), "rate_per_s"),
    ("rate_as_string", _job("rate_as_string", options={"rate_per_s": "80"}), "rate_per_s"),
    ("rate_as_boolean", _job("rate_as_boolean", options={"rate_per_s": True}), "rate_per_s"),
    (
        "not_before_without_timezone",
        _job("not_before_without_timezone", options={"not_before": "2026-11-22T09:00:00"}),
        "timezone",
    ),
    (
        "not_before_garbage",
        _job("not_before_garbage", options={"not_before": "tomorrow"}),
        "not_before",
    ),
    (
        "not_before_epoch_number",
        _job("not_before_epoch_number", options={"not_before": 1795000000}),
        "not_before",
    ),
    (
        "options_unknown_field",
        _job("options_unknown_field", options={"rate_per_sec": 5}),
        "unknown",
    ),
    ("options_not_object", _job("options_not_object", options=[1]), "options"),
    (
        "huge_unknown_key_in_message",
        _job("huge_unknown_key_in_message", message={"text": "Hi", "k" * 100_000: 1}),
        "unknown",
    ),
]

MALFORMED_JOBS: list[tuple[str, bytes]] = [(name, raw) for name, raw, _ in _CORPUS]
REASON_WORDS: dict[str, str] = {name: word for name, _, word in _CORPUS}
