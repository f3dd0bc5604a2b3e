"""Webhooks of the UltraMsg emulator: its events, one JSON event per POST.

Shapes: docs/providers.md, UltraMsg (envelope, `message_ack`, ack values).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from blastd.sandbox.webhooks import WebhookPost

# WhatsApp Web's numbers for the ack names, which some payloads carry instead.
NUMERIC_ACKS = {"pending": 0, "server": 1, "device": 2, "read": 3, "played": 4}
JSON_HEADERS = {"Content-Type": "application/json"}
SANDBOX_CHAT_ID = "6280000000000@c.us"  # the instance's own number

Event = dict[str, object]


@dataclass(frozen=True, slots=True)
class EventPerPost:
    """UltraMsg's way: every event in a JSON POST of its own, signed by nothing."""

    url: str

    @property
    def batch_max(self) -> int:
        return 1

    def encode(self, batch: Sequence[Event]) -> WebhookPost:
        """The POST of the batch's one event."""
        (event,) = batch
        return WebhookPost(self.url, orjson.dumps(event), JSON_HEADERS)


@dataclass(frozen=True, slots=True)
class AcceptedMessage:
    """What an event needs to know about a message the emulator accepted."""

    instance_id: str
    message_id: int
    to_digits: str
    type: str
    body: str
    reference_id: str


def ack_event(message: AcceptedMessage, ack: str, *, numeric: bool) -> Event:
    """A `message_ack` event for one message, echoing its referenceId at the top level."""
    return _envelope("message_ack", message, NUMERIC_ACKS[ack] if numeric else ack)


def create_event(message: AcceptedMessage) -> Event:
    """The `message_create` event UltraMsg sends for our own outgoing messages."""
    return _envelope("message_create", message, "pending")


def received_event(instance_id: str, sender_digits: str, text: str) -> Event:
    """The `message_received` event of a text a person sent the instance."""
    chat_id = f"{sender_digits}@c.us"
    return {
        "event_type": "message_received",
        "instanceId": instance_id.removeprefix("instance"),
        "id": "",
        "referenceId": "",
        "data": {
            "id": f"false_{chat_id}_SANDBOX{time.time_ns()}",
            "from": chat_id,
            "to": SANDBOX_CHAT_ID,
            "author": "",
            "pushname": "Sandbox",
            "ack": "",
            "type": "chat",
            "body": text,
            "media": "",
            "fromMe": False,
            "time": int(time.time()),
        },
    }


def _envelope(event_type: str, message: AcceptedMessage, ack: str | int) -> Event:
    chat_id = f"{message.to_digits}@c.us"
    return {
        "event_type": event_type,
        "instanceId": message.instance_id.removeprefix("instance"),
        "id": "",
        "referenceId": message.reference_id,
        "data": {
            "id": f"true_{chat_id}_SANDBOX{message.message_id:012d}",
            "from": SANDBOX_CHAT_ID,
            "to": chat_id,
            "ack": ack,
            "type": message.type,
            "body": message.body,
            "fromMe": True,
            "time": int(time.time()),
        },
    }
