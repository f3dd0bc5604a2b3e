"""The webhooks of the Wablas emulator: its status events and the messages people send the
device, and how they are POSTed to the device's URLs with our shared secret in the query.

Shapes: docs/providers.md, Wablas (JSON object, JSON array or form post; `date`
in Asia/Jakarta time). Wablas signs nothing, so neither does this.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import urlencode

import orjson
from yarl import URL

from blastd.sandbox.webhooks import WebhookPost

JAKARTA = timezone(timedelta(hours=7))
DEVICE_NUMBER = "6280000000000"  # the device's own number

Event = dict[str, object]


def tracking_event(message_id: str, phone: str, status: str) -> Event:
    """One status of one message, as the tracking URL receives it."""
    stamp = datetime.now(UTC).astimezone(JAKARTA).strftime("%Y-%m-%d %H:%M:%S")
    return {
        "id": message_id,
        "phone": phone,
        "status": status,
        "date": {"created_at": stamp, "updated_at": stamp},
    }


def incoming_event(sender_digits: str, text: str) -> Event:
    """A text a person sent the device, as its incoming-message URL receives it: no status."""
    return {
        "id": f"SANDBOX-IN-{time.time_ns()}",
        "pushName": "Sandbox",
        "isGroup": False,
        "message": text,
        "phone": sender_digits,
        "messageType": "text",
        "file": "",
        "mimeType": "",
        "sender": DEVICE_NUMBER,
        "timestamp": int(time.time()),
    }


@dataclass(frozen=True, slots=True)
class TrackingPosts:
    """Wablas' way: our secret in the tracking URL's query, one event per JSON object or form,
    or JSON arrays of up to `array_max` events."""

    url: str
    secret: str | None
    is_form: bool
    array_max: int  # 1: one JSON object per POST

    @property
    def batch_max(self) -> int:
        return 1 if self.is_form else self.array_max  # a form carries one event

    def encode(self, batch: Sequence[Event]) -> WebhookPost:
        """The POST of the batch, to the tracking URL with ?secret= when one is set."""
        url = URL(self.url)
        if self.secret is not None:
            url = url.update_query(secret=self.secret)
        body, content_type = _encode(batch, self.is_form, self.array_max > 1)
        return WebhookPost(url, body, {"Content-Type": content_type})


def _encode(batch: Sequence[Event], is_form: bool, is_array: bool) -> tuple[bytes, str]:
    if is_form:  # flat fields: the dates move up beside the others
        (event,) = batch
        fields = {k: v for k, v in event.items() if k != "date"}
        date = event.get("date")
        if isinstance(date, dict):
            fields.update(date)
        return urlencode(fields).encode(), "application/x-www-form-urlencoded"
    document = batch if is_array else batch[0]
    return orjson.dumps(document), "application/json"
