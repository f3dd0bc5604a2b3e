"""The webhook sender every emulator shares: events wait until due, then go out in batches,
each POST retried with doubling waits until a 2xx or the last attempt.

How a batch becomes a request is the provider's (a WebhookFormat): Meta signs an envelope of
statuses, UltraMsg posts one event at a time, Wablas adds its secret to the tracking URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import aiohttp
from aiohttp import web
from yarl import URL

POST_TIMEOUT = aiohttp.ClientTimeout(total=10.0)

EventT = TypeVar("EventT")
EventT_contra = TypeVar("EventT_contra", contravariant=True)


@dataclass(frozen=True, slots=True)
class WebhookPost:
    """One request to the receiver, sent byte for byte the same on every attempt."""

    url: str | URL
    body: bytes
    headers: Mapping[str, str]


class WebhookFormat(Protocol[EventT_contra]):
    """How a provider turns due events into requests."""

    @property
    def batch_max(self) -> int:
        """The most events one request carries."""
        ...

    def encode(self, batch: Sequence[EventT_contra]) -> WebhookPost:
        """The request carrying `batch` (never empty, at most `batch_max` long)."""
        ...


@dataclass(frozen=True, slots=True)
class WebhookTarget(Generic[EventT]):
    """Where and how events go, read afresh for every batch so knobs apply at once."""

    format: WebhookFormat[EventT]
    attempts: int
    retry_initial_s: float  # doubles after each failed POST


class WebhookOutbox(Generic[EventT]):
    """Holds events until due, then POSTs them one batch at a time, earliest due first."""

    def __init__(self) -> None:
        # One FIFO lane per delay: a lane's events fall due in the order queued, so a put is
        # O(1) on the send path, and the earliest of the few lane heads goes next. Entries
        # are (due_s on time.monotonic(), order queued, event): ties keep the queued order.
        # Emptied lanes are removed, so every lane has a head.
        self._lanes: dict[float, deque[tuple[float, int, EventT]]] = {}
        self._order = itertools.count()
        self._pending = 0
        self._has_new_lane_head = asyncio.Event()
        self.delivered = 0
        self.dropped = 0

    def __len__(self) -> int:
        return self._pending

    def put(self, event: EventT, delay_s: float) -> None:
        """Queue one event to be sent `delay_s` from now."""
        lane = self._lanes.get(delay_s)
        if lane is None:  # only a new lane's head can fall due before what the sender awaits
            lane = self._lanes[delay_s] = deque()
            self._has_new_lane_head.set()
        lane.append((time.monotonic() + delay_s, next(self._order), event))
        self._pending += 1

    def reset_counts(self) -> None:
        """Zero the delivered and dropped counts; pending events stay queued."""
        self.delivered = 0
        self.dropped = 0

    async def run(
        self, http: aiohttp.ClientSession, target: Callable[[], WebhookTarget[EventT] | None]
    ) -> None:
        """Deliver events as they fall due, until cancelled; without a target they are dropped."""
        while True:
            await self._wait_until_due()
            current = target()
            if current is None:
                self.dropped += len(self._take_due(self._pending))
                continue
            batch = self._take_due(current.format.batch_max)
            if await _post_with_retries(http, current, current.format.encode(batch)):
                self.delivered += len(batch)
            else:
                self.dropped += len(batch)

    async def _wait_until_due(self) -> None:
        while True:
            head = self._earliest_lane()
            wait_s = None if head is None else head[1][0][0] - time.monotonic()
            if wait_s is not None and wait_s <= 0:
                return
            self._has_new_lane_head.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._has_new_lane_head.wait()

    def _earliest_lane(self) -> tuple[float, deque[tuple[float, int, EventT]]] | None:
        return min(self._lanes.items(), key=lambda item: item[1][0][:2], default=None)

    def _take_due(self, batch_max: int) -> list[EventT]:
        now_s = time.monotonic()
        batch: list[EventT] = []
        while len(batch) < batch_max and (head := self._earliest_lane()) is not None:
            delay_s, lane = head
            if lane[0][0] > now_s:
                break
            batch.append(lane.popleft()[2])
            if not lane:
                del self._lanes[delay_s]
        self._pending -= len(batch)
        return batch


async def _post_with_retries(
    http: aiohttp.ClientSession, target: WebhookTarget[EventT], post: WebhookPost
) -> bool:
    for attempt in range(target.attempts):
        if attempt:
            await asyncio.sleep(target.retry_initial_s * 2 ** (attempt - 1))
        if await _post_once(http, post):
            return True
    return False


async def _post_once(http: aiohttp.ClientSession, post: WebhookPost) -> bool:
    try:
        async with http.post(
            post.url, data=post.body, headers=post.headers, timeout=POST_TIMEOUT
        ) as response:
            return 200 <= response.status < 300
    except (aiohttp.ClientError, TimeoutError):
        return False


async def read_inbound_request(request: web.Request) -> tuple[str, str]:
    """The sender's digits and the text of a POST /_sandbox/inbound {"from": ..., "text": ...};
    400 when either is missing or the sender is not digits."""
    body = await request.json()
    sender = body.get("from") if isinstance(body, dict) else None
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(sender, str) or not sender.isdigit() or not isinstance(text, str):
        raise web.HTTPBadRequest(text='needs "from" (digits) and "text"')
    return sender, text


async def post_now(url: str | None, post: WebhookPost) -> web.Response:
    """POST one webhook at once, outside the outbox, and answer {"webhook_status": ...} with
    the receiver's status: the caller knows the receiver has handled it. 409 without a URL."""
    if url is None:
        raise web.HTTPConflict(text="no webhook_url configured")
    async with (
        aiohttp.ClientSession() as http,
        http.post(post.url, data=post.body, headers=post.headers, timeout=POST_TIMEOUT) as answer,
    ):
        return web.json_response({"webhook_status": answer.status})
