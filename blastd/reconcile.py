"""Reconciliation: decides the fate of recipients in doubt once their receipts had time to come.

A recipient is 'uncertain' when its request may have reached the provider without our knowing
(the answer was lost, or the daemon died with the request in flight). Its status webhook, if
the provider took it, resolves it on its own (matched by message id or by our ledger id). What
is still in doubt after `reconcile_window_s` is decided by `uncertain_policy`: sent again once,
flagged possible_duplicate, or held for an operator. A campaign is not done while one of its
recipients waits for this decision.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from blastd import ledger, metrics

if TYPE_CHECKING:
    from blastd.resources import Dependencies
    from blastd.shutdown import Shutdown

log = structlog.get_logger()

BATCH = 1_000  # recipients decided per statement; a backlog takes several passes


async def run(deps: Dependencies, shutdown: Shutdown) -> None:
    """Decide the due doubts every `reconcile_interval_s` until shutdown is requested."""
    settings = deps.settings
    while not shutdown.is_requested:
        while await reconcile_once(deps) == BATCH and not shutdown.is_requested:
            pass  # a full batch: more may be due now
        await shutdown.wait(None, settings.reconcile_interval_s)


async def reconcile_once(deps: Dependencies) -> int:
    """One pass: decide what is due, wake the campaigns it concerns; return how many."""
    settings = deps.settings
    decisions = await deps.db(
        ledger.reconcile_doubts,
        settings.reconcile_window_s,
        resend=settings.uncertain_policy == "resend",
        limit=BATCH,
    )
    if not decisions:
        return 0
    counts: dict[str, int] = {}
    for decision in decisions:
        outcome = "held" if decision.state == "uncertain" else "resent"
        counts[outcome] = counts.get(outcome, 0) + 1
    for outcome, count in counts.items():
        metrics.RECONCILED.labels(outcome=outcome).inc(count)
    # Resent recipients are pending again, held ones no longer keep their campaign open:
    # either way the campaign scheduler has something to do now.
    deps.campaigns_changed.set()
    log.info(
        "doubts_reconciled",
        campaigns=len({d.campaign_id for d in decisions}),
        policy=settings.uncertain_policy,
        **counts,
    )
    return len(decisions)
