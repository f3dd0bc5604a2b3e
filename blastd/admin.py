"""aiohttp app on loopback: health, readiness, metrics, campaign status and its event stream,
campaign and recipient listings (JSON, CSV, the web pages of blastd.webui), and the providers'
status webhooks."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from blastd import events, exports, ledger, metrics, outages, queues, reports, webui
from blastd.config import CloudApiAccount, UltraMsgAccount, WablasAccount
from blastd.errors import PostgresUnavailableError, RedisUnavailableError
from blastd.providers.cloud_api import (
    answer_verification,
    count_system_errors,
    is_valid_signature,
    parse_inbound_texts,
    parse_opted_out_statuses,
    parse_status_webhook,
)
from blastd.providers.ultramsg import is_valid_secret, parse_ack_webhook, parse_received_texts
from blastd.providers.wablas import (
    is_valid_tracking_secret,
    parse_incoming_messages,
    parse_tracking_webhook,
)
from blastd.video import schedule as video_schedule

if TYPE_CHECKING:
    from blastd.resources import Dependencies

log = structlog.get_logger()
P = ParamSpec("P")
T = TypeVar("T")
DEPS_KEY: web.AppKey[Dependencies] = web.AppKey("deps")
MAX_WEBHOOK_BYTES = 1_048_576
RECEIPT_STATES = frozenset({"sent", "delivered", "read", "failed"})
UI_LOGIN = "/ui/login"
MAX_CAMPAIGNS_LISTED = 1_000
DEAD_LETTERS_SHOWN = 100


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
    app.router.add_get("/v1/campaigns", serve_campaigns)
    app.router.add_get("/v1/campaigns/{id}", serve_campaign_status)
    app.router.add_get("/v1/campaigns/{id}/recipients", serve_recipients)
    app.router.add_get("/v1/campaigns/{id}/events", serve_campaign_events)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/webhooks/cloud_api/{account}", verify_cloud_api_webhook)
    app.router.add_post("/webhooks/cloud_api/{account}", receive_cloud_api_webhook)
    app.router.add_post("/webhooks/ultramsg/{account}", receive_ultramsg_webhook)
    app.router.add_post("/webhooks/wablas/{account}", receive_wablas_webhook)
    app.router.add_post("/webhooks/video/{account}", receive_video_webhook)
    add_ui_routes(app)
    return app


def add_ui_routes(app: web.Application) -> None:
    app.router.add_get("/ui", ui_campaigns)
    app.router.add_get("/ui/campaigns/{id}", ui_campaign)
    app.router.add_get("/ui/campaigns/{id}/recipients.csv", ui_recipients_csv)
    app.router.add_get("/ui/dead", ui_dead)
    app.router.add_get(UI_LOGIN, ui_login_form)
    app.router.add_post(UI_LOGIN, ui_login)
    app.router.add_post("/ui/logout", ui_logout)


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
    await _record_opt_outs(deps, name, raw)
    if receipts:
        # A status may overtake the answer it follows: answers already in hand are written
        # first, so a status without our opaque field still finds the message id it names.
        await deps.outcomes.synced()
        await deps.receipts.add_durably(receipts)
    return web.Response(text="ok")


async def _record_opt_outs(deps: Dependencies, account: str, raw: bytes) -> None:
    """Before Meta hears our 200, the opt-out list takes the numbers of statuses failed as
    opted out, and of people who wrote one of the stop keywords."""
    if stopped := parse_opted_out_statuses(raw):
        await deps.db(ledger.add_optouts, stopped, "provider", "stopped marketing messages")
    await _record_stop_keywords(deps, account, parse_inbound_texts(raw))


async def _record_stop_keywords(
    deps: Dependencies, account: str, inbound: Sequence[tuple[str, str]]
) -> None:
    """Put on the opt-out list the sender of each (phone, text) whose text is one of the stop
    keywords (the whole message, trimmed, any case), before the provider hears our 200."""
    keywords = {k.strip().casefold() for k in deps.settings.optout_keywords}
    for phone, text in inbound:
        if text.strip().casefold() in keywords:
            added = await deps.db(ledger.add_optouts, [phone], "inbound", text.strip()[:100])
            log.info("opted_out", account=account, phone=phone, new=bool(added))


async def receive_ultramsg_webhook(request: web.Request) -> web.Response:
    """message_ack and message_received events: UltraMsg signs nothing, so the URL carries our
    secret (constant-time check); acks and stop keywords are in the ledger before our 200."""
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
    raw = await request.read()
    try:
        updates = parse_ack_webhook(raw)
    except ValueError as exc:
        raise web.HTTPBadRequest() from exc
    await _record_stop_keywords(deps, name, parse_received_texts(raw))
    if updates:
        receipts = [
            ledger.Receipt(u.ledger_id, u.status, u.provider_message_id, account=name)
            for u in updates
        ]
        await deps.receipts.add_durably(receipts)
    return web.Response(text="ok")


async def receive_wablas_webhook(request: web.Request) -> web.Response:
    """The device's tracking URL and its incoming-message URL, both: statuses matched by
    Wablas' message id, messages checked for the stop keywords. The secret in the URL is
    checked (constant-time), and the ledger has both before we answer 200."""
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
    raw = await request.read()
    try:
        updates = parse_tracking_webhook(raw, account.tracking_states)
    except ValueError as exc:
        raise web.HTTPBadRequest() from exc
    await _record_stop_keywords(deps, name, parse_incoming_messages(raw))
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
    """/metrics, /v1/* and /ui* answer 401 unless the request carries the configured token in
    its Authorization header (never the query string: it ends up in logs and histories); the
    pages also take the login form's cookie, and send a browser without it to the form."""
    token = request.app[DEPS_KEY].settings.admin.token
    path = _route_path(request)
    if token is None or not _is_protected(path):
        return await handler(request)
    expected = token.get_secret_value().encode()
    if _has_bearer(request, expected):
        return await handler(request)
    if _is_ui(path):
        if webui.is_session_token(request.cookies.get(webui.SESSION_COOKIE), expected):
            return await handler(request)
        raise web.HTTPSeeOther(UI_LOGIN)
    raise web.HTTPUnauthorized(headers={"WWW-Authenticate": "Bearer"})


def _has_bearer(request: web.Request, expected: bytes) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)


def _route_path(request: web.Request) -> str:
    """By the route matched, not the raw path: no spelling of a path slips past the check."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else ""


def _is_protected(path: str) -> bool:
    """Health, readiness, the login form and the webhooks (which check their own signatures)
    stay open."""
    return path == "/metrics" or path.startswith("/v1/") or (_is_ui(path) and path != UI_LOGIN)


def _is_ui(path: str) -> bool:
    return path == "/ui" or path.startswith("/ui/")


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


# --- results: campaign list and recipient export ---------------------------------------------


def _choices(request: web.Request, name: str, allowed: tuple[str, ...] | None) -> list[str]:
    """The repeated query parameter `name` (empty values ignored); 400 for a value not allowed."""
    values = [value for value in request.query.getall(name, []) if value]
    if allowed is not None and (unknown := sorted(set(values) - set(allowed))):
        raise web.HTTPBadRequest(text=f"unknown {name}: {', '.join(unknown)}")
    return values


def _int_param(request: web.Request, name: str, default: int, maximum: int) -> int:
    try:
        value = int(request.query.get(name, default))
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"{name} must be a whole number") from exc
    if not 0 <= value <= maximum:
        raise web.HTTPBadRequest(text=f"{name} must be between 0 and {maximum}")
    return value


async def _on_postgres(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    try:
        return await outages.on_postgres(fn, *args, **kwargs)
    except PostgresUnavailableError as exc:
        raise web.HTTPServiceUnavailable(text="postgres is unreachable") from exc


async def _campaign_list(request: web.Request) -> tuple[list[str], list[exports.CampaignLine]]:
    states = _choices(request, "state", exports.CAMPAIGN_STATES)
    limit = _int_param(request, "limit", 50, MAX_CAMPAIGNS_LISTED)
    deps = request.app[DEPS_KEY]
    return states, await _on_postgres(exports.list_campaigns, deps.pool, states, limit)


async def serve_campaigns(request: web.Request) -> web.Response:
    """The newest campaigns as `blastd campaigns --json` prints them; ?state= (repeatable),
    ?limit=."""
    _states, lines = await _campaign_list(request)
    return web.json_response([line.as_json() for line in lines])


def _recipient_filter(request: web.Request, *, may_unmask: bool) -> exports.RecipientFilter:
    """?state= and ?class= (repeatable); ?unmask=1 where the caller allows whole numbers."""
    return exports.RecipientFilter(
        request.match_info["id"],
        _choices(request, "state", exports.RECIPIENT_STATES),
        _choices(request, "class", None),
        unmask=may_unmask and request.query.get("unmask", "") in ("1", "true"),
    )


async def serve_recipients(request: web.Request) -> web.StreamResponse:
    """A campaign's recipients, streamed page by page: ?format=json (default) or csv, ?state=
    and ?class= (repeatable), ?unmask=1 for whole numbers."""
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise web.HTTPBadRequest(text="format is json or csv")
    return await _stream_recipients(request, _recipient_filter(request, may_unmask=True), fmt)


async def _stream_recipients(
    request: web.Request, which: exports.RecipientFilter, fmt: str
) -> web.StreamResponse:
    deps = request.app[DEPS_KEY]
    if not await _on_postgres(ledger.campaign_exists, deps.pool, which.campaign_id):
        raise web.HTTPNotFound(text="no such campaign")
    response = web.StreamResponse(headers=_export_headers(which.campaign_id, fmt))
    await response.prepare(request)
    # Past prepare() the status is sent: an outage now cuts the body short, which the client
    # sees as a broken transfer, not as a complete file.
    async for chunk in exports.export_chunks(deps.pool, which, fmt):
        await response.write(chunk)
    await response.write_eof()
    return response


def _export_headers(campaign_id: str, fmt: str) -> dict[str, str]:
    if fmt == "json":
        return {"Content-Type": "application/json"}
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in campaign_id)
    return {
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": f'attachment; filename="{name}-recipients.csv"',
    }


# --- the web pages (rendered by blastd.webui) -------------------------------------------------


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(
        text=body, status=status, content_type="text/html", headers=webui.SECURITY_HEADERS
    )


async def ui_campaigns(request: web.Request) -> web.Response:
    states, lines = await _campaign_list(request)
    return _html(webui.render_campaigns(lines, states))


async def ui_campaign(request: web.Request) -> web.Response:
    deps = request.app[DEPS_KEY]
    which = _recipient_filter(request, may_unmask=False)
    report = await _on_postgres(reports.campaign_status, deps.pool, which.campaign_id)
    if report is None:
        raise web.HTTPNotFound(text="no such campaign")
    after = _int_param(request, "after", 0, 2**63 - 1)
    page_rows = webui.RECIPIENTS_PER_PAGE
    lines = await _on_postgres(exports.recipients_page, deps.pool, which, after, page_rows + 1)
    next_after = lines[page_rows - 1].id if len(lines) > page_rows else None
    return _html(webui.render_campaign(report, which, lines[:page_rows], next_after))


async def ui_recipients_csv(request: web.Request) -> web.StreamResponse:
    """The page's download link: every matching recipient as CSV, numbers masked."""
    return await _stream_recipients(request, _recipient_filter(request, may_unmask=False), "csv")


async def ui_dead(request: web.Request) -> web.Response:
    deps = request.app[DEPS_KEY]
    prefix = deps.settings.redis_prefix
    try:
        entries = await outages.on_redis(queues.list_dead, deps.redis, prefix, DEAD_LETTERS_SHOWN)
    except RedisUnavailableError as exc:
        raise web.HTTPServiceUnavailable(text="redis is unreachable") from exc
    return _html(webui.render_dead(entries))


async def ui_login_form(request: web.Request) -> web.Response:
    if request.app[DEPS_KEY].settings.admin.token is None:
        raise web.HTTPSeeOther("/ui")
    return _html(webui.render_login(failed=False))


async def ui_login(request: web.Request) -> web.Response:
    """The form's token, checked in constant time, becomes an HttpOnly, SameSite=Strict cookie
    for /ui only: a browser sends it to no other path and no other site's page."""
    token = request.app[DEPS_KEY].settings.admin.token
    if token is None:
        raise web.HTTPSeeOther("/ui")
    given = str((await request.post()).get("token", ""))
    expected = token.get_secret_value()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        log.warning("ui_login_rejected")
        return _html(webui.render_login(failed=True), status=401)
    response = web.HTTPSeeOther("/ui")
    response.set_cookie(
        webui.SESSION_COOKIE, expected, path="/ui", httponly=True, samesite="Strict"
    )
    raise response


async def ui_logout(_request: web.Request) -> web.Response:
    response = web.HTTPSeeOther(UI_LOGIN)
    response.del_cookie(webui.SESSION_COOKIE, path="/ui")
    raise response
