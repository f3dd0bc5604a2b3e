"""Delivers a finished video over WhatsApp, and the notices of failed renders.

The video goes as a native video message with its caption; should the provider refuse it
(media it cannot fetch, a chat that takes no video), the same recipient gets the text with
the link instead (the fallback text). Either way the recipient is 'sending' before the
request leaves and written with the answer, as any message of a blast.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import structlog

from blastd import ledger
from blastd.ledger import Outcome
from blastd.providers.base import OutboundMessage, TextBody, VideoBody
from blastd.runner import stop_state_of
from blastd.sender import Delivery, Sender
from blastd.video import ledger as video_ledger
from blastd.video.jobs import DEFAULT_FALLBACK, fill

if TYPE_CHECKING:
    from blastd.resources import Dependencies

log = structlog.get_logger()


async def deliver(deps: Dependencies, recipient_id: int) -> None:
    """Send a rendered video; nothing happens unless it is 'rendered' in a running campaign."""
    claim = await deps.db(video_ledger.claim_delivery, recipient_id, deps.settings.instance_id)
    if claim is None:
        return
    sender = deps.senders.get(claim.account)
    if sender is None:
        log.error("video_not_delivered", reason=f"account {claim.account!r} is not configured")
        await _record(deps, Outcome(claim.id, "rendered"))
        return
    texts = claim.message.get("message", {})
    values = {
        **(claim.vars or {}),
        "video_url": claim.video_url,
        "elapsed_s": str(round(claim.elapsed_s)),
    }
    caption_text = texts.get("caption")
    caption = fill(caption_text, values) if caption_text else None
    video = OutboundMessage(claim.id, claim.phone, VideoBody(claim.video_url, caption))
    outcome = await _send(deps, sender, video, claim.attempts)
    if outcome.state == "failed":
        fallback = fill(
            texts.get("fallback_text") or DEFAULT_FALLBACK, {**values, "caption": caption or ""}
        )
        link = OutboundMessage(claim.id, claim.phone, TextBody(fallback.strip()))
        second = await _send(deps, sender, link, claim.attempts + outcome.requests)
        log.warning(
            "video_sent_as_link",
            recipient=claim.id,
            video_error=outcome.error_code,
            state=second.state,
        )
        outcome = dataclasses.replace(second, requests=outcome.requests + second.requests)
    await _settle(deps, claim.campaign_id, outcome)


async def send_notice(deps: Dependencies, recipient_id: int, kind: str, reason: str) -> None:
    """Tell the recipient their video failed or timed out, if the campaign has a text for it."""
    target = await deps.db(video_ledger.notice_target, recipient_id)
    if target is None:
        return
    template = target.message.get("message", {}).get(f"{kind}_notice")
    sender = deps.senders.get(target.account)
    if template is None or sender is None:
        return
    timeout_min = round(deps.settings.video.timeout_s / 60, 1)
    values = {
        **(target.vars or {}),
        "reason": reason,
        "timeout_min": f"{timeout_min:g}",
    }
    notice = OutboundMessage(target.id, target.phone, TextBody(fill(template, values)))
    outcome = await _send(deps, sender, notice, 0)
    state = "sent" if outcome.state == "sent" else f"{outcome.state}: {outcome.error_code}"
    await deps.db(video_ledger.record_notice, target.id, state)
    log.info("video_notice", recipient=target.id, kind=kind, state=state)


async def _send(
    deps: Dependencies, sender: Sender, message: OutboundMessage, attempts: int
) -> Outcome:
    async with sender.slots:
        await sender.wait_turn(None)
        (outcome,) = await sender.deliver(
            Delivery([message], [attempts]), None, lambda: deps.is_draining
        )
    sender.metrics.count_recipients([outcome])
    return outcome


async def _settle(deps: Dependencies, campaign_id: str, outcome: Outcome) -> None:
    """Write the outcome. One not sent (released by a drain, deferred by a pair limit, held
    by a quality or credentials stop) keeps its video: back to 'rendered', never re-rendered."""
    if outcome.state == "pending":
        if (state := stop_state_of(outcome.error_class)) is not None:
            reason = f"{outcome.error_code}: {outcome.error_text}"
            await deps.db(ledger.set_campaign_state, campaign_id, state, reason)
            log.error("campaign_stopped", campaign_id=campaign_id, state=state, reason=reason)
        outcome = dataclasses.replace(outcome, state="rendered")
    await _record(deps, outcome)


async def _record(deps: Dependencies, outcome: Outcome) -> None:
    await deps.db(ledger.record_outcomes, [outcome])
