"""aiohttp app on loopback: health, readiness, metrics, campaign status and its event stream,
and the providers' status webhooks."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from typing import TYPE_CHECKING

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from blastd import events, ledger, metrics, outages, queues, reports
from blastd.config import CloudApiAccount, UltraMsgAccount, WablasAccount
from blastd.errors import PostgresUnavailableError
from blastd.providers.cloud_api import (
    answer_verification,
    count_system_errors,
    is_valid_signature,
    parse_status_webhook,
)
from blastd.providers.ultramsg import is_valid_secret, parse_ack_webhook
from blastd.providers.wablas import is_valid_tracking_secret, parse_tracking_webhook
from blastd.video import schedule as video_schedule

if TYPE_CHECKING:
    from blastd.resources import Dependencies

log = structlog.get_logger()
DEPS_KEY: web.AppKey[Dependencies] = web.AppKey("deps")
MAX_WEBHOOK_BYTES = 1_048_576
RECEIPT_STATES = frozenset({"sent", "delivered", "read", "failed"})


async def start(stack: contextlib.AsyncExitStack, deps: Dependencies) -> None:
    """Serve the admin app on the configured loopback address until the stack closes."""
    app = build_app(deps)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, deps.settings.admin.host, deps.settings.admin.port)
    await site.start()
    log.info("admin_listening", host=deps.settings.admin.host, port=bound_port(runner))


def bound_port(runner: web.AppRunner) -> int | None:
    for address in runner.addresses:
        return int(address[1])
    return None


def build_app(deps: Dependencies) -> web.Application:
    app = web.Application(client_max_size=MAX_WEBHOOK_BYTES, middlewares=[require_token])
    app[DEPS_KEY] = deps
    app[events.CLOSING_KEY] = asyncio.Event()
    app.on_shutdown.append(events.close_streams)
    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/v1/campaigns/{id}", serve_campaign_status)
    app.router.add_get("/v1/campaigns/{id}/events", serve_campaign_events)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/webhooks/cloud_api/{account}", verify_cloud_api_webhook)
    app.router.add_post("/webhooks/cloud_api/{account}", receive_cloud_api_webhook)
    app.router.add_post("/webhooks/ultramsg/{account}", receive_ultramsg_webhook)
    app.router.add_post("/webhooks/wablas/{account}", receive_wablas_webhook)
    app.router.add_post("/webhooks/video/{account}", receive_video_webhook)
    return app


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 while sending is possible; 503 while draining or while Redis or PostgreSQL does not
    answer (the daemon waits for it and resumes on its own)."""
    deps = request.app[DEPS_KEY]
    if deps.is_draining:
        return web.json_response({"status": "draining"}, status=503)
    if deps.unreachable:
        body = {"status": "waiting", "unreachable": sorted(deps.unreachable)}
        return web.json_response(body, status=503)
    return web.json_response({"status": "ready"})


def _cloud_account(request: web.Request) -> tuple[Dependencies, str, CloudApiAccount]:
    deps = request.app[DEPS_KEY]
    name = request.match_info["account"]
    account = deps.settings.accounts.get(name)
    if not isinstance(account, CloudApiAccount):
        raise web.HTTPNotFound()
    return deps, name, account


async def verify_cloud_api_webhook(request: web.Request) -> web.Response:
    """Meta's GET handshake: echo hub.challenge when the verify token matches."""
    _deps, _name, account = _cloud_account(request)
    token = account.verify_token
    challenge = (
        None if token is None else answer_verification(request.query, token.get_secret_value())
    )
    if challenge is None:
        raise web.HTTPForbidden()
    return web.Response(text=challenge)


async def receive_cloud_api_webhook(request: web.Request) -> web.Response:
    """Status webhook: verified over the raw body, applied to the ledger before we answer 200."""
    deps, name, account = _cloud_account(request)
    secret = account.app_secret
    raw = await request.read()
    signature = request.headers.get("X-Hub-Signature-256")
    if secret is None or not is_valid_signature(raw, signature, secret.get_secret_value()):
        log.warning("webhook_rejected", account=name, reason="bad or missing signature")
        raise web.HTTPUnauthorized()
    try:
        updates = parse_status_webhook(raw)
    except ValueError as exc:
        raise web.HTTPBadRequest() from exc
    receipts = [
        ledger.Receipt(
            u.ledger_id, u.status, u.provider_message_id, u.error_code, u.error_text, name
        )
        for u in updates
        if u.status in RECEIPT_STATES
    ]
    # Errors about the app or the account, outside any status: no recipient to apply them to.
    metrics.UNMATCHED_RECEIPTS.count(name, "system_error", count_system_errors(raw))
    if receipts:
        # A status may overtake the answer it follows: answers already in hand are written
        # first, so a status without our opaque field still finds the message id it names.
        await deps.outcomes.synced()
        await deps.receipts.add_durably(receipts)
    return web.Response(text="ok")


async def receive_ultramsg_webhook(request: web.Request) -> web.Response:
    """message_ack events: UltraMsg signs nothing, so the URL carries our secret (constant-time
    check); the acks are in the ledger before we answer 200."""
    deps = request.app[DEPS_KEY]
    name = request.match_info["account"]
    account = deps.settings.accounts.get(name)
    if not isinstance(account, UltraMsgAccount):
        raise web.HTTPNotFound()
    secret = account.webhook_secret
    given = request.query.get("secret")
    if secret is None or not is_valid_secret(given, secret.get_secret_value()):
        log.warning("webhook_rejected", account=name, reason="bad or missing secret")
        raise web.HTTPUnauthorized()
    try:
        updates = parse_ack_webhook(await request.read())
    except ValueError as exc:
        raise web.HTTPBadRequest() from exc
    if updates:
        receipts = [
            ledger.Receipt(u.ledger_id, u.status, u.provider_message_id, account=name)
            for u in updates
        ]
        await deps.receipts.add_durably(receipts)
    return web.Response(text="ok")


async def receive_wablas_webhook(request: web.Request) -> web.Response:
    """Tracking statuses, matched by Wablas' message id: the secret in the URL is checked
    (constant-time), and the receipts are in the ledger before we answer 200."""
    deps = request.app[DEPS_KEY]
    name = request.match_info["account"]
    account = deps.settings.accounts.get(name)
    if not isinstance(account, WablasAccount):
        raise web.HTTPNotFound()
    secret = account.webhook_secret
    if secret is None or not is_valid_tracking_secret(
        request.query.get("secret"), secret.get_secret_value()
    ):
        log.warning("webhook_rejected", account=name, reason="bad or missing secret")
        raise web.HTTPUnauthorized()
    try:
        updates = parse_tracking_webhook(await request.read(), account.tracking_states)
    except ValueError as exc:
        raise web.HTTPBadRequest() from exc
    if updates:
        # The item ids reach the ledger with the send outcomes, written in batches: wait for
        # the outcomes already answered, so a quick status finds the id it names.
        await deps.outcomes.synced()
        receipts = [
            ledger.MessageReceipt(u.provider_message_id, u.state, u.error_code, u.error_text)
            for u in updates
        ]
        await deps.db(ledger.apply_receipts_by_message_id, receipts)
    return web.Response(text="ok")


async def receive_video_webhook(request: web.Request) -> web.Response:
    """A render finished (D-ID's per-job webhook, a generic API's callback): the body only
    says which job; the job is polled at once, with our credentials, before anything is
    believed (D-ID documents no signature). The URL carries our secret when one is set."""
    deps = request.app[DEPS_KEY]
    name = request.match_info["account"]
    video = deps.video_accounts.get(name)
    if video is None:
        raise web.HTTPNotFound()
    secret = video.settings.webhook_secret
    given = request.query.get("token", "").encode()
    if secret is not None and not hmac.compare_digest(given, secret.get_secret_value().encode()):
        log.warning("webhook_rejected", account=name, reason="bad or missing token")
        raise web.HTTPUnauthorized()
    try:
        payload = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise web.HTTPBadRequest() from exc
    job_id = video.provider.webhook_job_id(payload) if isinstance(payload, dict) else None
    if job_id is not None and not await video_schedule.nudge(deps, job_id):
        log.info("video_webhook_unknown_job", account=name, video_job_id=job_id)
    return web.Response(text="ok")


# --- metrics and campaign status, behind the optional bearer token ---------------------------


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """/metrics and /v1/* answer 401 unless the request carries the configured token in its
    Authorization header (never the query string: it ends up in logs and histories)."""
    token = request.app[DEPS_KEY].settings.admin.token
    if token is not None and _is_protected(request):
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        expected = token.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


def _is_protected(request: web.Request) -> bool:
    """By the route matched, not the raw path: no spelling of a path slips past the check.
    Health, readiness and the webhooks (which check their own signatures) stay open."""
    resource = request.match_info.route.resource
    path = resource.canonical if resource is not None else ""
    return path == "/metrics" or path.startswith("/v1/")


async def serve_metrics(request: web.Request) -> web.Response:
    """Prometheus text format; the Redis queue depths are read at each scrape."""
    deps = request.app[DEPS_KEY]
    prefix = deps.settings.redis_prefix
    lists = {
        "jobs": queues.jobs_key(prefix),
        "dead": queues.dead_key(prefix),
        "processing": queues.processing_key(prefix, deps.settings.instance_id),
    }
    if deps.video_accounts:
        lists["video_poll"] = video_schedule.video_keys(deps).queue
    await metrics.sample_queue_depths(deps.redis, lists)
    return web.Response(body=metrics.exposition(), headers={"Content-Type": metrics.CONTENT_TYPE})


async def serve_campaign_status(request: web.Request) -> web.Response:
    """The campaign's status document, as `blastd status --json` prints it."""
    deps = request.app[DEPS_KEY]
    try:
        report = await outages.on_postgres(
            reports.campaign_status, deps.pool, request.match_info["id"]
        )
    except PostgresUnavailableError as exc:
        raise web.HTTPServiceUnavailable(text="postgres is unreachable") from exc
    if report is None:
        raise web.HTTPNotFound(text="no such campaign")
    return web.json_response(report)


async def serve_campaign_events(request: web.Request) -> web.StreamResponse:
    return await events.stream(request, request.app[DEPS_KEY])
