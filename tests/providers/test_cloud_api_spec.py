"""The requests blastd sends to the Cloud API, checked against Meta's own OpenAPI description
(tests/providers/meta/) instead of hand-written expectations.

Each kind of message blastd sends goes through the real adapter to the sandbox by way of a
loopback recorder, which keeps the path, content type and body of every request as it went on
the wire; each recorded body must fit the spec's request schema for the path template its path
matches. The same validators refuse deliberately wrong bodies, and each amendment made to the
spec at load time (meta_spec.py) is shown to still change a verdict.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from pydantic import SecretStr

from blastd.config import CloudApiAccount
from blastd.providers.base import Body, OutboundMessage, TemplateBody, TextBody, VideoBody
from blastd.providers.cloud_api import CloudApiProvider, build_request_body
from tests.harness import cloud_api_emulator, serving
from tests.providers import meta_spec

MESSAGES = "/{Version}/{Phone-Number-ID}/messages"
MARKETING_MESSAGES = "/{Version}/{Phone-Number-ID}/marketing_messages"
JSON = "application/json"
NUMBER = "+6281200000001"
VIDEO_LINK = "https://cdn.example.com/v/123.mp4"
FORWARDED_HEADERS = ("Authorization", "Content-Type")


@dataclass(frozen=True, slots=True)
class Recorded:
    path: str
    content_type: str
    body: Any


@contextlib.asynccontextmanager
async def recorder(
    target: str, http: aiohttp.ClientSession
) -> AsyncIterator[tuple[str, list[Recorded]]]:
    """A loopback server that keeps each POST it takes and passes it on to `target` unchanged,
    answering with `target`'s answer; yields its URL and what it kept."""
    kept: list[Recorded] = []

    async def forward(request: web.Request) -> web.Response:
        raw = await request.read()
        kept.append(Recorded(request.path, request.content_type, orjson.loads(raw)))
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS}
        async with http.post(target + request.path_qs, data=raw, headers=headers) as answer:
            body = await answer.read()
            return web.Response(status=answer.status, body=body, content_type=answer.content_type)

    app = web.Application()
    app.router.add_post("/{tail:.*}", forward)
    async with serving(app) as url:
        yield url, kept


def provider(base_url: str, http: aiohttp.ClientSession, marketing: bool) -> CloudApiProvider:
    account = CloudApiAccount(
        kind="cloud_api",
        base_url=base_url,
        api_version="v23.0",  # the spec's version
        phone_number_id="100000000000001",
        token=SecretStr("sandbox-token"),
        marketing_messages_api=marketing,
    )
    return CloudApiProvider("spec", account, http)


# Every kind of body blastd sends (it sends no image, document, interactive or button
# messages), with the endpoint each goes to.
SENT: dict[str, tuple[Body, bool, str]] = {
    "text": (TextBody("Halo Budi, promo akhir tahun"), False, MESSAGES),
    "template-body-params-video-header": (
        TemplateBody("promo_nov", "id", ("Budi", "X1"), header_video_link=VIDEO_LINK),
        False,
        MESSAGES,
    ),
    "template-body-params": (TemplateBody("promo_nov", "id", ("Budi", "X1")), False, MESSAGES),
    "template-without-params": (
        TemplateBody("hello_world", "en_US", category="utility"),
        True,  # not marketing: /messages even on a Marketing Messages account
        MESSAGES,
    ),
    "video-with-caption": (VideoBody(VIDEO_LINK, caption="Your video is ready"), False, MESSAGES),
    "video": (VideoBody(VIDEO_LINK), False, MESSAGES),
    "marketing-template": (
        TemplateBody("promo_nov", "id", ("Budi", "X1"), header_video_link=VIDEO_LINK),
        True,
        MARKETING_MESSAGES,
    ),
}


def validator(template: str) -> Draft202012Validator:
    return meta_spec.request_validator(meta_spec.spec(), template, JSON)


def refusals(template: str, body: object) -> list[str]:
    return [error.message for error in validator(template).iter_errors(body)]


@pytest.mark.parametrize(("body", "marketing", "endpoint"), SENT.values(), ids=list(SENT))
async def test_each_request_blastd_sends_fits_the_spec_of_its_endpoint(
    http: aiohttp.ClientSession, body: Body, marketing: bool, endpoint: str
) -> None:
    async with cloud_api_emulator() as sandbox_url, recorder(sandbox_url, http) as (url, kept):
        receipt = await provider(url, http, marketing).send(OutboundMessage(42, NUMBER, body))
    assert receipt.provider_message_id.startswith("wamid.")  # the sandbox took it too
    [request] = kept
    assert meta_spec.path_template(meta_spec.spec(), "post", request.path) == endpoint
    assert request.content_type == JSON
    assert refusals(endpoint, request.body) == []


def text_request() -> dict[str, Any]:
    return build_request_body(OutboundMessage(42, NUMBER, TextBody("Halo")))


def template_request() -> dict[str, Any]:
    body = TemplateBody("promo_nov", "id", ("Budi", "X1"), header_video_link=VIDEO_LINK)
    return build_request_body(OutboundMessage(42, NUMBER, body))


def without(document: dict[str, Any], key: str) -> dict[str, Any]:
    return {name: value for name, value in document.items() if name != key}


def first_body_param(request: dict[str, Any], param: dict[str, Any]) -> dict[str, Any]:
    components = request["template"]["components"]
    body = {**components[1], "parameters": [param]}
    return {**request, "template": {**request["template"], "components": [components[0], body]}}


WRONG: dict[str, tuple[str, dict[str, Any], str]] = {
    "unknown-top-level-field": (
        MESSAGES,
        {**text_request(), "priority": "high"},
        "Unevaluated properties are not allowed ('priority' was unexpected)",
    ),
    "unknown-field-in-text": (
        MESSAGES,
        {**text_request(), "text": {"body": "Halo", "bold": True}},
        "Additional properties are not allowed ('bold' was unexpected)",
    ),
    "no-recipient": (MESSAGES, without(text_request(), "to"), "'to' is a required property"),
    "template-without-its-object": (
        MESSAGES,
        without(template_request(), "template"),
        "'template' is a required property",
    ),
    "body-param-without-its-text": (
        MESSAGES,
        first_body_param(template_request(), {"type": "text"}),
        "'text' is a required property",
    ),
    "callback-data-too-long": (
        MESSAGES,
        {**text_request(), "biz_opaque_callback_data": "x" * 513},
        "is too long",
    ),
    "callback-data-on-marketing-messages": (
        MARKETING_MESSAGES,
        template_request(),
        "Additional properties are not allowed ('biz_opaque_callback_data' was unexpected)",
    ),
    "marketing-text": (
        MARKETING_MESSAGES,
        without(text_request(), "biz_opaque_callback_data"),
        "'template' was expected",
    ),
}


@pytest.mark.parametrize(("endpoint", "body", "reason"), WRONG.values(), ids=list(WRONG))
def test_a_wrong_body_is_refused_by_the_same_validator(
    endpoint: str, body: dict[str, Any], reason: str
) -> None:
    errors = list(validator(endpoint).iter_errors(body))
    assert errors, f"the spec accepted {body}"
    assert any(reason in message for message in _messages(errors)), _messages(errors)


def _messages(errors: Iterable[ValidationError]) -> list[str]:
    """The errors' messages and those of the errors under them: /messages picks its kind
    through a oneOf, whose own message only says no kind fits."""
    return [
        message for error in errors for message in (error.message, *_messages(error.context or ()))
    ]


# For each amendment, a body whose verdict it changes: refused by the published spec and
# accepted once amended, or (the tightening) accepted by the published spec and refused.
WITNESSES: dict[str, tuple[str, Any, bool]] = {
    "closed_all_of": (MESSAGES, without(text_request(), "biz_opaque_callback_data"), True),
    "callback_data_on_messages": (MESSAGES, text_request(), True),
    "language_policy_optional": (
        MARKETING_MESSAGES,
        without(template_request(), "biz_opaque_callback_data"),
        True,
    ),
    "discriminators_applied": (
        MESSAGES,
        first_body_param(template_request(), {"type": "text"}),
        False,
    ),
}


def test_every_amendment_has_a_witness() -> None:
    assert set(WITNESSES) == set(meta_spec.AMENDMENTS)


@pytest.mark.parametrize("amendment", list(WITNESSES))
def test_each_amendment_to_the_spec_still_changes_a_verdict(amendment: str) -> None:
    endpoint, body, valid = WITNESSES[amendment]
    amended = meta_spec.request_validator(meta_spec.spec(), endpoint, JSON)
    published_but_this = meta_spec.spec(without=amendment)
    unamended = meta_spec.request_validator(published_but_this, endpoint, JSON)
    assert amended.is_valid(body) is valid
    assert unamended.is_valid(body) is not valid
