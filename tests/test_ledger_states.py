"""The recipient state machine of sql/006_recipient_fate.sql, as properties: every (from, to)
pair of states against the real database, and the statements that filter with the same rule."""

from __future__ import annotations

import itertools

import asyncpg
import pytest

from blastd import controls, ledger
from blastd.ledger import Outcome, Receipt
from tests.test_ledger import CAMPAIGN, insert, phones

STATES = (
    "pending",
    "sending",
    "sent",
    "delivered",
    "read",
    "failed",
    "skipped",
    "cancelled",
    "expired",
    "uncertain",
    "rendering",
    "rendered",
    "video_failed",
)
# The moves the product allows, written out independently of the SQL that enforces them.
ALLOWED = {
    ("pending", "sending"),
    ("pending", "rendering"),
    ("pending", "expired"),
    ("pending", "cancelled"),
    *(("sending", to) for to in ("pending", "sent", "delivered", "read", "failed", "uncertain")),
    ("sent", "delivered"),
    ("sent", "read"),
    ("sent", "failed"),
    ("delivered", "read"),
    *(("failed", to) for to in ("pending", "rendered", "sent", "delivered", "read")),
    *(("uncertain", to) for to in ("pending", "rendered", "sent", "delivered", "read", "failed")),
    *(("rendering", to) for to in ("pending", "rendered", "video_failed", "cancelled")),
    ("rendered", "sending"),
    ("rendered", "cancelled"),
    ("video_failed", "pending"),
}
BACKWARDS = [
    (a, b)
    for a in ("sent", "delivered", "read")
    for b in ("pending", "sending", "uncertain", "rendering", "rendered")
]


async def _row_in(pool: ledger.Pool, state: str) -> int:
    """A recipient placed in `state` directly (the trigger guards updates, not inserts)."""
    (recipient_id,) = await insert(pool, phones(1))
    await pool.execute("DELETE FROM recipients WHERE id = $1", recipient_id)
    row_id: int = await pool.fetchval(
        "INSERT INTO recipients (campaign_id, seq, phone, state, error_class, error_code) "
        "VALUES ($1, 0, '+6281200000001', $2, 'pair_limit', '131056') RETURNING id",
        CAMPAIGN,
        state,
    )
    return row_id


async def test_every_pair_of_states_moves_only_as_the_rule_allows(pool: ledger.Pool) -> None:
    assert not any(pair in ALLOWED for pair in BACKWARDS), "the spec itself goes forward"
    row_id = await _row_in(pool, "pending")
    for from_state, to_state in itertools.product(STATES, STATES):
        if from_state == to_state:
            continue
        # Put the row in from_state behind the trigger's back, then try the move.
        await pool.execute("ALTER TABLE recipients DISABLE TRIGGER recipients_forward_only")
        await pool.execute(
            "UPDATE recipients SET state = $2, flags = '{}', error_class = 'pair_limit', "
            "error_code = '131056' WHERE id = $1",
            row_id,
            from_state,
        )
        await pool.execute("ALTER TABLE recipients ENABLE TRIGGER recipients_forward_only")
        may = await pool.fetchval("SELECT blastd_may_move($1, $2)", from_state, to_state)
        assert may == ((from_state, to_state) in ALLOWED), (from_state, to_state)
        if (from_state, to_state) in ALLOWED:
            await pool.execute("UPDATE recipients SET state = $2 WHERE id = $1", row_id, to_state)
        else:
            with pytest.raises(asyncpg.CheckViolationError):
                await pool.execute(
                    "UPDATE recipients SET state = $2 WHERE id = $1", row_id, to_state
                )
        row = await pool.fetchrow(
            "SELECT state, error_code, flags FROM recipients WHERE id = $1", row_id
        )
        expected_state = to_state if (from_state, to_state) in ALLOWED else from_state
        assert row["state"] == expected_state, (from_state, to_state)
        if (from_state, to_state) in ALLOWED and to_state in ("sent", "delivered", "read"):
            assert row["error_code"] is None, "no earlier error is left on a sent row"
            evidence = from_state in ("failed", "uncertain")
            assert ("delivered_after_failure" in row["flags"]) == evidence, (from_state, to_state)


async def test_the_statements_filter_with_the_rule_instead_of_tripping_it(
    pool: ledger.Pool,
) -> None:
    """Late answers and stale receipts meet rows that moved on: nothing raises, nothing moves
    back, and the error of an earlier attempt does not survive on a read row."""
    first, second = await insert(pool, phones(2))
    await ledger.claim_recipients(pool, CAMPAIGN, "owner-a", 2)
    await ledger.record_outcomes(
        pool,
        [Outcome(first, "pending", None, "pair_limit", "131056", "pair rate limit")],
    )
    await ledger.claim_recipients(pool, CAMPAIGN, "owner-a", 2)
    await ledger.apply_receipts(pool, [Receipt(first, "read", "wamid.1")])
    await ledger.apply_receipts(pool, [Receipt(second, "delivered", "wamid.2")])

    for state in ("pending", "uncertain", "failed", "sent"):
        await ledger.record_outcomes(
            pool, [Outcome(i, state, None, "transient", "timeout", "late") for i in (first, second)]
        )
    await ledger.apply_receipts(pool, [Receipt(first, "sent", None), Receipt(second, "sent", None)])
    assert await ledger.recover_owned(pool, "owner-a") == 0

    rows = await pool.fetch("SELECT state, error_class, error_code FROM recipients ORDER BY id")
    assert [tuple(r) for r in rows] == [("read", None, None), ("delivered", None, None)]


async def test_retry_never_resends_a_recipient_with_evidence_of_a_send(pool: ledger.Pool) -> None:
    with_id, with_receipt, unsure, never_left = await insert(pool, phones(4))
    await ledger.claim_recipients(pool, CAMPAIGN, "owner-a", 4)
    await ledger.record_outcomes(
        pool,
        [
            Outcome(with_id, "sent", "wamid.a"),
            Outcome(with_receipt, "uncertain", None, "uncertain", "http_200", "no id"),
            Outcome(unsure, "uncertain", None, "uncertain", "timeout", "answer lost"),
            Outcome(never_left, "failed", None, "transient", "network", "refused"),
        ],
    )
    # The provider says it could not deliver what it had accepted: its word, not ours.
    await ledger.apply_receipts(pool, [Receipt(with_id, "failed", "wamid.a", "131026", "x")])
    await ledger.apply_receipts(pool, [Receipt(with_receipt, "failed", None, "131026", "x")])
    await ledger.set_campaign_state(pool, CAMPAIGN, "done", None)

    result = await controls.apply_control(
        pool, CAMPAIGN, "retry_failed", ["permanent", "transient", "uncertain"]
    )

    assert result is not None
    assert result.recipients == 2
    rows = await pool.fetch("SELECT id, state, flags FROM recipients ORDER BY id")
    assert [(r["state"], r["flags"]) for r in rows] == [
        ("failed", []),
        ("failed", []),
        ("pending", ["possible_duplicate"]),
        ("pending", []),
    ]
