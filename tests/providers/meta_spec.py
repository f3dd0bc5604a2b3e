"""Meta's OpenAPI description of the Cloud API (tests/providers/meta/), as JSON Schema validators
for the request bodies of its endpoints.

OpenAPI 3.1 schemas are JSON Schema 2020-12, so jsonschema validates against them directly once
`referencing` resolves their `$ref`s inside the file. The file is used as Meta publishes it,
except for the amendments below, made in memory at load time. Each says why; the spec tests
show each one still changes a verdict, so one that a newer spec no longer needs is noticed.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).parent / "meta" / "business-messaging-api_v23.0.yaml"
SPEC_URI = "urn:meta:business-messaging-api:v23.0"
SCHEMAS = "#/components/schemas/"

Spec = dict[str, Any]


def _closed_all_of(spec: Spec) -> None:
    """The message kinds are `allOf: [BaseMessageProperties, {own fields,
    additionalProperties: false}]`. In JSON Schema additionalProperties sees only its own
    subschema's properties, so as written every message is refused, Meta's own examples too
    (messaging_product is "additional" to the text part). What the authors meant, nothing beyond
    the base's fields and the kind's own, is `unevaluatedProperties: false` on the whole."""
    for schema in _schemas(spec).values():
        parts = schema.get("allOf", [])
        closed = [part for part in parts if part.get("additionalProperties") is False]
        for part in closed:
            del part["additionalProperties"]
        if closed:
            schema["unevaluatedProperties"] = False


def _callback_data_on_messages(spec: Spec) -> None:
    """The spec lists biz_opaque_callback_data on calls only, but Meta's messages reference
    takes it on every message (an arbitrary string up to 512 characters, echoed in that
    message's status webhooks): blastd puts its ledger id there."""
    properties = _schemas(spec)["BaseMessageProperties"]["properties"]
    properties["biz_opaque_callback_data"] = {"type": "string", "maxLength": 512}


def _language_policy_optional(spec: Spec) -> None:
    """LanguageObject requires `policy`, but its only value, deterministic, is the default in
    Meta's documentation, and the spec's own template examples leave it out."""
    language = _schemas(spec)["LanguageObject"]
    language["required"] = [name for name in language["required"] if name != "policy"]


def _discriminators_applied(spec: Spec) -> None:
    """A tightening: template components and their parameters are typed only through OpenAPI's
    `discriminator` (type "body" -> BodyComponent, "text" -> TextParameter, ...), a keyword
    JSON Schema ignores, which would leave them unchecked. Each mapped schema is
    `allOf: [the base, its own part]`; the base gets an if/then per mapping onto that own part
    (referencing the whole mapped schema would recurse through the base forever)."""
    schemas = _schemas(spec)
    for name, schema in schemas.items():
        discriminator = schema.get("discriminator")
        if discriminator is None or "oneOf" in schema:
            continue  # a oneOf already picks the mapped schema
        prop = discriminator["propertyName"]
        rules = []
        for value, target in discriminator["mapping"].items():
            target_name = target.removeprefix(SCHEMAS)
            base, own = schemas[target_name]["allOf"]
            assert base == {"$ref": SCHEMAS + name}, f"{target_name} does not extend {name}"
            assert own.get("type") == "object", f"{target_name}'s own part is not an object"
            rules.append(
                {
                    "if": {"properties": {prop: {"const": value}}, "required": [prop]},
                    "then": {"$ref": f"{SCHEMAS}{target_name}/allOf/1"},
                }
            )
        schema["allOf"] = rules


Amendment = Callable[[Spec], None]
AMENDMENTS: dict[str, Amendment] = {
    "closed_all_of": _closed_all_of,
    "callback_data_on_messages": _callback_data_on_messages,
    "language_policy_optional": _language_policy_optional,
    "discriminators_applied": _discriminators_applied,
}


def _schemas(spec: Spec) -> dict[str, Any]:
    schemas: dict[str, Any] = spec["components"]["schemas"]
    return schemas


@functools.cache
def _published_spec() -> Spec:
    with SPEC_PATH.open(encoding="utf-8") as file:
        spec: Spec = yaml.load(file, Loader=yaml.CSafeLoader)
    return spec


@functools.cache
def spec(without: str | None = None) -> Spec:
    """The published spec with every amendment, or every one but `without`."""
    if without is not None and without not in AMENDMENTS:
        raise KeyError(without)
    amended = copy.deepcopy(_published_spec())
    for name, amend in AMENDMENTS.items():
        if name != without:
            amend(amended)
    return amended


def path_template(document: Spec, method: str, path: str) -> str:
    """The one path template of `document` with a `method` operation that `path` fits."""
    matches = [
        template
        for template, operations in document["paths"].items()
        if method in operations and _template_regex(template).fullmatch(path)
    ]
    assert len(matches) == 1, f"{method.upper()} {path} fits {matches or 'no path'} of the spec"
    return matches[0]


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)))


def request_validator(
    document: Spec, template: str, content_type: str, method: str = "post"
) -> Draft202012Validator:
    """A validator for the request body `template` takes as `content_type`."""
    content: Mapping[str, Any] = document["paths"][template][method]["requestBody"]["content"]
    assert content_type in content, f"{template} takes {sorted(content)}, not {content_type}"
    registry: Registry[Any] = Registry().with_resource(
        SPEC_URI, Resource.from_contents(document, default_specification=DRAFT202012)
    )
    # the body schema is always a $ref into the spec's components
    schema = {"$ref": SPEC_URI + content[content_type]["schema"]["$ref"]}
    return Draft202012Validator(schema, registry=registry)
