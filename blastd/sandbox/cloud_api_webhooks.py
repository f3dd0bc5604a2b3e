"""Status webhooks of the Cloud API emulator: their entries, and batches signed like Meta's.

Shapes: docs/providers.md, Cloud API webhooks.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from aiohttp import web

from blastd.sandbox.webhooks import WebhookPost, post_now, read_inbound_request

ERROR_DOCS_URL = "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"
SANDBOX_WABA_ID = "102290129340398"
SANDBOX_DISPLAY_NUMBER = "15550783881"

Status = tuple[str, dict[str, object]]  # (phone_number_id, one entry of value.statuses[])


def status_event(
    message_id: str,
    state: str,
    recipient_id: str,
    callback_data: str | None,
    failure: tuple[int, str] | None = None,
) -> dict[str, object]:
    """One entry of value.statuses[]; `failure` is (code, title) for a failed status."""
    event: dict[str, object] = {
        "id": message_id,
        "status": state,
        "timestamp": str(int(time.time())),
        "recipient_id": recipient_id,
    }
    if callback_data is not None:
        event["biz_opaque_callback_data"] = callback_data
    if failure is None:
        event["pricing"] = {"billable": True, "pricing_model": "PMP", "category": "marketing"}
    else:
        code, title = failure
        details = {"details": title}
        error = {"code": code, "title": title, "message": title, "error_data": details}
        event["errors"] = [{**error, "href": ERROR_DOCS_URL}]
    return event


def sign(raw_body: bytes, app_secret: str) -> str:
    """The X-Hub-Signature-256 value Meta sends: HMAC-SHA256 of the exact bytes."""
    return "sha256=" + hmac.new(app_secret.encode(), raw_body, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class SignedStatuses:
    """Meta's way: due statuses in one envelope, grouped by phone number, signed."""

    url: str
    app_secret: str
    batch_max: int

    def encode(self, batch: Sequence[Status]) -> WebhookPost:
        """One POST of the batch, with the X-Hub-Signature-256 of its exact bytes."""
        raw_body = orjson.dumps(_webhook_document(batch))
        headers = {
            "Content-Type": "application/json",
            "X-Hub-Signature-256": sign(raw_body, self.app_secret),
        }
        return WebhookPost(self.url, raw_body, headers)


def _webhook_document(batch: Sequence[Status]) -> dict[str, object]:
    statuses_by_number: dict[str, list[dict[str, object]]] = {}
    for phone_number_id, event in batch:
        statuses_by_number.setdefault(phone_number_id, []).append(event)
    changes = [
        {
            "field": "messages",
            "value": {
                "messaging_product": "whatsapp",
                "metadata": {
                    "display_phone_number": SANDBOX_DISPLAY_NUMBER,
                    "phone_number_id": phone_number_id,
                },
                "statuses": statuses,
            },
        }
        for phone_number_id, statuses in statuses_by_number.items()
    ]
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": SANDBOX_WABA_ID, "changes": changes}],
    }


async def post_inbound(
    request: web.Request, webhook_url: str | None, app_secret: str
) -> web.Response:
    """POST /_sandbox/inbound {"from": digits, "text": ..., "phone_number_id"?: ...}: a person
    writes to the business; the signed messages[] webhook is posted before this answers, and
    the answer carries the status the webhook endpoint gave."""
    sender, text = await read_inbound_request(request)
    phone_number_id = str((await request.json()).get("phone_number_id", "sandbox"))
    raw = orjson.dumps(_inbound_document(phone_number_id, sender, text))
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": sign(raw, app_secret)}
    return await post_now(webhook_url, WebhookPost(webhook_url or "", raw, headers))


def _inbound_document(phone_number_id: str, sender: str, text: str) -> dict[str, object]:
    message = {
        "from": sender,
        "id": f"wamid.inbound.{time.time_ns()}",
        "timestamp": str(int(time.time())),
        "type": "text",
        "text": {"body": text},
    }
    value = {
        "messaging_product": "whatsapp",
        "metadata": {
            "display_phone_number": SANDBOX_DISPLAY_NUMBER,
            "phone_number_id": phone_number_id,
        },
        "contacts": [{"profile": {"name": "Sandbox"}, "wa_id": sender}],
        "messages": [message],
    }
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": SANDBOX_WABA_ID, "changes": [{"field": "messages", "value": value}]}],
    }
