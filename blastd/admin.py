"""aiohttp app on loopback: health, readiness and the providers' status webhooks."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from blastd import ledger
from blastd.config import CloudApiAccount
from blastd.providers.cloud_api import answer_verification, is_valid_signature, parse_status_webhook

if TYPE_CHECKING:
    from blastd.daemon import Dependencies

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
    app = web.Application(client_max_size=MAX_WEBHOOK_BYTES)
    app[DEPS_KEY] = deps
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/webhooks/cloud_api/{account}", verify_cloud_api_webhook)
    app.router.add_post("/webhooks/cloud_api/{account}", receive_cloud_api_webhook)
    return app


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    deps = request.app[DEPS_KEY]
    if deps.is_draining:
        return web.json_response({"status": "draining"}, status=503)
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
        ledger.Receipt(u.ledger_id, u.status, u.provider_message_id, u.error_code, u.error_text)
        for u in updates
        if u.status in RECEIPT_STATES
    ]
    if receipts:
        await deps.receipts.add_durably(receipts)
    return web.Response(text="ok")
