"""Status webhooks of the Cloud API emulator: batched, signed like Meta's, retried until 2xx.

Shapes: shared/providers/cloud-api.md section 7.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson

ERROR_DOCS_URL = "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"
SANDBOX_WABA_ID = "102290129340398"
SANDBOX_DISPLAY_NUMBER = "15550783881"
POST_TIMEOUT = aiohttp.ClientTimeout(total=10.0)


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """Where and how the statuses go, read afresh for every batch so knobs apply at once."""

    url: str
    app_secret: str
    batch_max: int
    attempts: int
    retry_initial_s: float


@dataclass(frozen=True, slots=True)
class _PendingStatus:
    due_s: float  # time.monotonic()
    phone_number_id: str
    event: dict[str, object]


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


class WebhookOutbox:
    """Holds status events until due, then POSTs them in batches, one batch at a time."""

    def __init__(self) -> None:
        self._pending: deque[_PendingStatus] = deque()
        self._has_pending = asyncio.Event()
        self.delivered = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, phone_number_id: str, event: dict[str, object], delay_s: float) -> None:
        """Queue one status event to be sent `delay_s` from now."""
        self._pending.append(_PendingStatus(time.monotonic() + delay_s, phone_number_id, event))
        self._has_pending.set()

    def reset_counts(self) -> None:
        """Zero the delivered and dropped counts; pending events stay queued."""
        self.delivered = 0
        self.dropped = 0

    async def run(
        self, http: aiohttp.ClientSession, target: Callable[[], WebhookTarget | None]
    ) -> None:
        """Deliver events as they fall due, until cancelled; without a target they are dropped."""
        while True:
            await self._wait_until_due()
            current = target()
            batch = self._take_due(current.batch_max if current else len(self._pending))
            if current is None:
                self.dropped += len(batch)
            else:
                await self._deliver(http, current, batch)

    async def _wait_until_due(self) -> None:
        while not self._pending:
            self._has_pending.clear()
            await self._has_pending.wait()
        wait_s = self._pending[0].due_s - time.monotonic()
        if wait_s > 0:
            await asyncio.sleep(wait_s)

    def _take_due(self, batch_max: int) -> list[_PendingStatus]:
        now_s = time.monotonic()
        batch: list[_PendingStatus] = []
        while self._pending and len(batch) < batch_max and self._pending[0].due_s <= now_s:
            batch.append(self._pending.popleft())
        return batch

    async def _deliver(
        self, http: aiohttp.ClientSession, target: WebhookTarget, batch: list[_PendingStatus]
    ) -> None:
        raw_body = orjson.dumps(_webhook_document(batch))
        headers = {
            "Content-Type": "application/json",
            "X-Hub-Signature-256": sign(raw_body, target.app_secret),
        }
        for attempt in range(target.attempts):
            if attempt:
                await asyncio.sleep(target.retry_initial_s * 2 ** (attempt - 1))
            if await _post(http, target.url, raw_body, headers):
                self.delivered += len(batch)
                return
        self.dropped += len(batch)


def _webhook_document(batch: list[_PendingStatus]) -> dict[str, object]:
    statuses_by_number: dict[str, list[dict[str, object]]] = {}
    for pending in batch:
        statuses_by_number.setdefault(pending.phone_number_id, []).append(pending.event)
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


async def _post(
    http: aiohttp.ClientSession, url: str, raw_body: bytes, headers: dict[str, str]
) -> bool:
    try:
        async with http.post(url, data=raw_body, headers=headers, timeout=POST_TIMEOUT) as response:
            return 200 <= response.status < 300
    except (aiohttp.ClientError, TimeoutError):
        return False
