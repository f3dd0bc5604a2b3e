"""Campaign progress events: published on Redis pub/sub, relayed to server-sent-event clients.

One event shape everywhere: the campaign's status document, the same JSON as
`/v1/campaigns/{id}` and `blastd status --json` (`reports.campaign_status`: id, account, state,
state_reason, total, done, counts, flags, created_at, finished_at). The daemon running a campaign
publishes it on `{prefix}events:{campaign_id}` every `progress_interval_s` while the status
changes (less often for a campaign so large that counting it takes a while), and once more
when its run ends (with the final state when it reached one). A channel per campaign lets
Redis route: an SSE client hears only its campaign, and a consumer that wants
every campaign subscribes to the pattern `{prefix}events:*`. Every daemon's events reach every
daemon's SSE clients, whichever daemon sends the campaign.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from aiohttp import web
from redis.asyncio.client import PubSub

from blastd import metrics, outages, reports
from blastd.errors import PostgresUnavailableError, RedisUnavailableError, UnavailableError

if TYPE_CHECKING:
    from blastd.resources import Dependencies

log = structlog.get_logger()

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
HEARTBEAT = b": heartbeat\n\n"
# Set when the admin app shuts down: open streams end cleanly at once, instead of holding the
# daemon's exit for aiohttp's whole shutdown timeout (60 s) and then being cut.
CLOSING_KEY: web.AppKey[asyncio.Event] = web.AppKey("events_closing", asyncio.Event)

Status = dict[str, Any]

PROGRESS_COST_FACTOR = 20


def channel(prefix: str, campaign_id: str) -> str:
    return f"{prefix}events:{campaign_id}"


class _Reporter:
    """Publishes one campaign's status when it differs from the last one published."""

    def __init__(self, deps: Dependencies, campaign_id: str) -> None:
        self.deps = deps
        self.campaign_id = campaign_id
        self.finished = asyncio.Event()
        self._last: Status | None = None

    async def publish_until_finished(self) -> None:
        while not self.finished.is_set():
            started = time.monotonic()
            await self.publish()
            # Counting a large campaign's states takes a while (about 0.1 s at 100,000
            # recipients): the next count waits at least PROGRESS_COST_FACTOR times as long as
            # this one took, so progress never costs the ledger more than a small share of a core.
            interval_s = max(
                self.deps.settings.progress_interval_s,
                PROGRESS_COST_FACTOR * (time.monotonic() - started),
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.finished.wait(), interval_s)

    async def publish(self) -> None:
        deps = self.deps
        if deps.unreachable:
            return  # an outage: the next sample after it catches up, without adding to the wait
        try:
            status = await outages.on_postgres(reports.campaign_status, deps.pool, self.campaign_id)
            if status is None or status == self._last:
                return
            metrics.set_campaign_progress(self.campaign_id, status["done"], status["total"])
            topic = channel(deps.settings.redis_prefix, self.campaign_id)
            await outages.on_redis(deps.redis.publish, topic, orjson.dumps(status))
        except UnavailableError:
            return  # progress only informs: an outage the health probe has not seen yet
        self._last = status


async def reporting(deps: Dependencies, campaign_id: str, work: Awaitable[None]) -> None:
    """Run one campaign's work, publishing its progress while it runs and once it returns; its
    progress gauges exist only meanwhile."""
    reporter = _Reporter(deps, campaign_id)
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(reporter.publish_until_finished(), name=f"progress:{campaign_id}")
            try:
                await work
            finally:
                reporter.finished.set()
        await reporter.publish()
    finally:
        metrics.forget_campaign(campaign_id)


async def stream(request: web.Request, deps: Dependencies) -> web.StreamResponse:
    """`event: progress` with the campaign's status now, then with every event published for
    it, until one shows it no longer running; a comment line every `sse_heartbeat_s`. A
    campaign whose job is still queued is waited for, like `blastd status --follow` does."""
    async with _subscribed(deps, request.match_info["id"]) as pubsub:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        closing = request.app[CLOSING_KEY]
        with contextlib.suppress(
            *outages.REDIS_OUTAGE_ERRORS
        ):  # the client or Redis went away: end here
            await _relay(response, _Feed(pubsub, closing), deps, request.match_info["id"])
            await response.write_eof()
        return response


async def close_streams(app: web.Application) -> None:
    """on_shutdown: end every open event stream, so the admin server closes at once."""
    app[CLOSING_KEY].set()


@contextlib.asynccontextmanager
async def _subscribed(deps: Dependencies, campaign_id: str) -> AsyncIterator[PubSub]:
    pubsub = deps.redis.pubsub(ignore_subscribe_messages=True)
    try:
        try:
            await outages.on_redis(
                pubsub.subscribe, channel(deps.settings.redis_prefix, campaign_id)
            )
        except RedisUnavailableError as exc:
            raise web.HTTPServiceUnavailable(text="redis is unreachable") from exc
        yield pubsub
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated upstream


async def _relay(
    response: web.StreamResponse, feed: _Feed, deps: Dependencies, campaign_id: str
) -> None:
    """Subscribed before the ledger is read, so no event falls between the two. At each
    heartbeat the ledger is read again: it catches a change whose event an outage lost."""
    heartbeat_s = deps.settings.admin.sse_heartbeat_s
    last = await _ledger_status(deps, campaign_id)
    if last is not None:
        await _send(response, last)
    while (last is None or last["state"] == "running") and not feed.closing.is_set():
        status = await feed.next_event(heartbeat_s)
        if feed.closing.is_set():
            return
        if status is None:
            await response.write(HEARTBEAT)
            status = await _ledger_status(deps, campaign_id)
            if status is None or status == last:
                continue
        await _send(response, status)
        last = status


@dataclass(frozen=True, slots=True)
class _Feed:
    """A stream's subscription, and the admin app's signal that it closes."""

    pubsub: PubSub
    closing: asyncio.Event

    async def next_event(self, timeout_s: float) -> Status | None:
        """The next event published on the channel; None when `timeout_s` passed without one
        or the app began closing."""
        reading = asyncio.ensure_future(self._read(timeout_s))
        closed = asyncio.ensure_future(self.closing.wait())
        try:
            done, _ = await asyncio.wait((reading, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            reading.cancel()  # once closing: the subscription ends with the stream anyway
        return reading.result() if reading in done else None

    async def _read(self, timeout_s: float) -> Status | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (remaining_s := deadline - loop.time()) > 0:
            # None also comes early: for the client's health-check PING answer.
            message = await self.pubsub.get_message(
                ignore_subscribe_messages=True, timeout=remaining_s
            )
            if message is not None and message["type"] == "message":
                status: Status = orjson.loads(message["data"])
                return status
        return None


async def _ledger_status(deps: Dependencies, campaign_id: str) -> Status | None:
    try:
        return await outages.on_postgres(reports.campaign_status, deps.pool, campaign_id)
    except PostgresUnavailableError:
        return None


async def _send(response: web.StreamResponse, status: Status) -> None:
    await response.write(b"event: progress\ndata: " + orjson.dumps(status) + b"\n\n")
