"""The Marketing Messages API endpoint of the Cloud API emulator: what it takes beyond /messages.

It takes marketing templates only, and no field outside its own list (no
biz_opaque_callback_data, so its statuses carry the message id alone); the rest (templates,
faults, limits, the answer) is the /messages emulation's.
"""

from __future__ import annotations

import orjson

from blastd.sandbox.cloud_api_requests import Rejection

MARKETING_FIELDS = frozenset(
    {
        "messaging_product",
        "recipient_type",
        "to",
        "type",
        "template",
        "product_policy",
        "message_activity_sharing",
    }
)


def check_marketing_request(raw_body: bytes) -> None:
    """Raise Rejection (code 100, invalid parameter) for what this endpoint does not take."""
    try:
        document = orjson.loads(raw_body)
    except orjson.JSONDecodeError:
        return  # the /messages emulation answers a body that is not JSON
    if not isinstance(document, dict):
        return
    if document.get("type") != "template":
        raise Rejection(100, "marketing_messages sends templates only")
    extra = sorted(set(document) - MARKETING_FIELDS)
    if extra:
        raise Rejection(100, f"unexpected field(s) for marketing_messages: {', '.join(extra)}")
