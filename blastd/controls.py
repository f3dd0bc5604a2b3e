"""An operator's pause, resume, cancel and retry_failed, applied to a campaign in the ledger.

The CLI calls `apply_control` directly (an operator tool with database access, so it can report
the result at once); `control` jobs from Redis call the same function through
`apply_control_job`. A daemon sending the campaign notices within its campaign poll interval:
claims need the campaign 'running', and the scheduler halts runs of campaigns that left it.
Every action is idempotent; a control job's id is recorded in the same transaction, so a job
pushed twice is applied once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
import structlog
from structlog.contextvars import bound_contextvars

from blastd import ledger
from blastd.errors import InvalidJobError
from blastd.jobs import DEFAULT_RETRY_CLASSES, ControlAction, ControlJob
from blastd.recipients import preview
from blastd.video import ledger as video_ledger

if TYPE_CHECKING:
    from blastd.resources import Dependencies

log = structlog.get_logger()
OPERATOR = "operator"  # state_reason of a campaign an operator paused or cancelled


@dataclass(frozen=True, slots=True)
class ControlResult:
    """What a control did: `applied` is False when there was nothing to do (`message` says why)."""

    campaign_id: str
    action: str
    applied: bool
    state: str  # the campaign's state afterwards
    message: str
    recipients: int = 0  # recipients cancelled or requeued


@dataclass(frozen=True, slots=True)
class _Request:
    campaign_id: str
    action: ControlAction
    classes: tuple[str, ...]
    scope: str = "messages"


_Action = Callable[[asyncpg.Connection, _Request, str], Awaitable[ControlResult]]


async def apply_control(
    pool: ledger.Pool,
    campaign_id: str,
    action: ControlAction,
    classes: Sequence[str] = DEFAULT_RETRY_CLASSES,
    *,
    control_id: str | None = None,
    scope: str = "messages",
) -> ControlResult | None:
    """Apply one action in one transaction; None when there is no such campaign. A retry's
    `scope` is 'messages' (failed sends) or 'videos' (failed renders of a video campaign)."""
    request = _Request(campaign_id, action, tuple(classes), scope)
    async with ledger.transaction(pool) as conn:
        state = await ledger.lock_campaign_state(conn, campaign_id)
        if state is None:
            return None
        if control_id is None or await ledger.record_control(conn, control_id, campaign_id, action):
            result = await _ACTIONS[action](conn, request, state)
        else:
            result = _unchanged(request, state, "this control job was applied before")
    _log(result, request, state)
    return result


async def notice_departed(deps: Dependencies, campaign_ids: Sequence[str]) -> set[str]:
    """Log each campaign that left 'running' by an operator's hand as this daemon notices it
    (the CLI changes the ledger directly, so the daemon's log would not show it otherwise);
    return the ids an operator paused or cancelled."""
    by_operator = set()
    for campaign_id in campaign_ids:
        campaign = await deps.db(ledger.load_campaign, campaign_id)
        if campaign is None or campaign.state_reason != OPERATOR:
            continue
        by_operator.add(campaign_id)
        log.info(
            f"campaign_{campaign.state}_by_operator",
            campaign_id=campaign_id,
            old_state="running",
            new_state=campaign.state,
            recipients=await deps.db(ledger.count_states, campaign_id),
        )
    return by_operator


def notice_resumed(campaign_id: str) -> None:
    """A campaign an operator had paused runs again: resumed, or failed recipients retried."""
    log.info(
        "campaign_resumed_by_operator",
        campaign_id=campaign_id,
        old_state="paused",
        new_state="running",
    )


async def apply_control_job(deps: Dependencies, job: ControlJob) -> None:
    """Apply a control job from Redis; an unknown campaign is the job's error (dead-lettered)."""
    classes = job.classes or DEFAULT_RETRY_CLASSES
    with bound_contextvars(job_id=job.id, campaign_id=job.campaign_id):
        result = await deps.db(
            apply_control,
            job.campaign_id,
            job.action,
            classes,
            control_id=job.id,
            scope=job.scope,
        )
        if result is None:
            raise InvalidJobError(f"unknown campaign {preview(job.campaign_id)}", job.id)
        # Wake the scheduler: it starts a reopened campaign and halts a paused or cancelled one.
        deps.campaigns_changed.set()


async def _pause(conn: asyncpg.Connection, request: _Request, state: str) -> ControlResult:
    if state != "running":
        return _unchanged(request, state, f"campaign is {state}, not running")
    await ledger.change_campaign_state(conn, request.campaign_id, "paused", OPERATOR)
    return ControlResult(request.campaign_id, request.action, True, "paused", "paused")


async def _resume(conn: asyncpg.Connection, request: _Request, state: str) -> ControlResult:
    if state not in ("paused", "stopped"):
        return _unchanged(request, state, f"campaign is {state}: only paused or stopped resume")
    await ledger.change_campaign_state(conn, request.campaign_id, "running", None)
    return ControlResult(request.campaign_id, request.action, True, "running", "running again")


async def _cancel(conn: asyncpg.Connection, request: _Request, state: str) -> ControlResult:
    if state in ("done", "cancelled"):
        return _unchanged(request, state, f"campaign is {state} already")
    await ledger.change_campaign_state(conn, request.campaign_id, "cancelled", OPERATOR)
    cancelled = await ledger.cancel_pending(conn, request.campaign_id)
    message = f"cancelled; {cancelled} pending recipients cancelled"
    return ControlResult(request.campaign_id, request.action, True, "cancelled", message, cancelled)


async def _retry_failed(conn: asyncpg.Connection, request: _Request, state: str) -> ControlResult:
    """Requeued recipients reopen the campaign, whatever stopped it, unless it was cancelled."""
    if state == "cancelled":
        return _unchanged(request, state, "campaign is cancelled: nothing is retried")
    campaign_type = await ledger.campaign_type(conn, request.campaign_id)
    is_video = campaign_type in ("video_blast", "video_poll")
    if request.scope == "videos":
        if campaign_type != "video_blast":
            return _unchanged(request, state, "only a video_blast renders videos again")
        requeued = await video_ledger.requeue_renders(conn, request.campaign_id)
        if not requeued:
            return _unchanged(request, state, "no failed renders")
        back_to = "pending: rendered again"
    else:
        # A video campaign's video is there: only its message is sent again.
        to_state = "rendered" if is_video else "pending"
        requeued = await ledger.requeue_recipients(
            conn, request.campaign_id, request.classes, to_state
        )
        back_to = "rendered: sent again" if is_video else "pending"
        if not requeued:
            classes = ", ".join(request.classes)
            return _unchanged(request, state, f"no failed recipients of class {classes}")
    await ledger.change_campaign_state(conn, request.campaign_id, "running", None)
    message = f"{requeued} recipients back to {back_to}; campaign running"
    return ControlResult(request.campaign_id, request.action, True, "running", message, requeued)


_ACTIONS: dict[ControlAction, _Action] = {
    "pause": _pause,
    "resume": _resume,
    "cancel": _cancel,
    "retry_failed": _retry_failed,
}
_EVENTS: dict[ControlAction, str] = {
    "pause": "campaign_paused",
    "resume": "campaign_resumed",
    "cancel": "campaign_cancelled",
    "retry_failed": "recipients_requeued",
}


def _unchanged(request: _Request, state: str, why: str) -> ControlResult:
    return ControlResult(request.campaign_id, request.action, False, state, why)


def _log(result: ControlResult, request: _Request, old_state: str) -> None:
    fields: dict[str, object] = {
        "campaign_id": result.campaign_id,
        "old_state": old_state,
        "state": result.state,
    }
    if not result.applied:
        log.info("control_not_applied", action=result.action, reason=result.message, **fields)
        return
    if request.action == "retry_failed":
        fields["classes"] = list(request.classes)
        fields["scope"] = request.scope
    log.info(_EVENTS[request.action], count=result.recipients, **fields)
