"""The ledger's statements, called directly against the real PostgreSQL of the test session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

from blastd import ledger
from blastd.ledger import Outcome, Receipt, StagedRecipient

CAMPAIGN = "ledger-test"


def new_campaign(campaign_id: str = CAMPAIGN) -> ledger.NewCampaign:
    return ledger.NewCampaign(campaign_id, "blast", "cloud-main", {"text": "hi"}, {})


async def pages_of(
    *pages: Sequence[StagedRecipient],
) -> AsyncIterator[Sequence[StagedRecipient]]:
    for page in pages:
        yield page


def staged(phones: Sequence[str], first_seq: int = 0) -> list[StagedRecipient]:
    return [StagedRecipient(first_seq + i, p, None, None) for i, p in enumerate(phones)]


def phones(count: int, first: int = 10_000_000) -> list[str]:
    return [f"+62812{n:08d}" for n in range(first, first + count)]


async def insert(
    pool: ledger.Pool, numbers: Sequence[str], campaign_id: str = CAMPAIGN
) -> list[int]:
    """A running campaign with these pending recipients; their ledger ids in producer order."""
    async with ledger.transaction(pool) as conn:
        counts = await ledger.insert_campaign(
            conn, new_campaign(campaign_id), pages_of(staged(numbers))
        )
    assert counts == ledger.CampaignCounts(pending=len(numbers), skipped=0)
    rows = await pool.fetch(
        "SELECT id FROM recipients WHERE campaign_id = $1 ORDER BY seq", campaign_id
    )
    return [r["id"] for r in rows]


async def state_of(pool: ledger.Pool, recipient_id: int) -> str:
    state: str = await pool.fetchval("SELECT state FROM recipients WHERE id = $1", recipient_id)
    return state


async def sent(pool: ledger.Pool, ids: Sequence[int]) -> None:
    """Take the recipients through a claim and a successful answer, as a send does."""
    claimed = await ledger.claim_recipients(pool, CAMPAIGN, "owner-a", len(ids) + 100)
    assert {r.id for r in claimed} >= set(ids)
    await ledger.record_outcomes(pool, [Outcome(i, "sent", f"wamid.{i}", requests=1) for i in ids])
    back = [r.id for r in claimed if r.id not in ids]
    await ledger.record_outcomes(pool, [Outcome(i, "pending") for i in back])


async def test_insert_campaign_skips_duplicates_and_keeps_producer_order(
    pool: ledger.Pool,
) -> None:
    a, b, c = phones(3)
    first_page = [
        StagedRecipient(0, b, {"name": "B"}, None),
        StagedRecipient(1, a, None, None),
        StagedRecipient(2, b, {"name": "B again"}, None),
    ]
    second_page = [
        StagedRecipient(3, "12", None, "invalid number: too short"),
        StagedRecipient(4, a, None, None),  # a duplicate across pages
        StagedRecipient(5, c, None, None),
    ]
    async with ledger.transaction(pool) as conn:
        counts = await ledger.insert_campaign(
            conn, new_campaign(), pages_of(first_page, second_page)
        )
    assert counts == ledger.CampaignCounts(pending=3, skipped=3)
    rows = await pool.fetch("SELECT id, seq, phone, vars, state, error_text FROM recipients")
    rows = sorted(rows, key=lambda r: r["id"])
    assert [r["seq"] for r in rows] == [0, 1, 2, 3, 4, 5], "ledger ids follow producer order"
    assert [(r["phone"], r["state"], r["error_text"]) for r in rows] == [
        (b, "pending", None),
        (a, "pending", None),
        (b, "skipped", "duplicate"),
        ("12", "skipped", "invalid number: too short"),
        (a, "skipped", "duplicate"),
        (c, "pending", None),
    ]
    assert rows[0]["vars"] == {"name": "B"}, "the first occurrence is the one sent"
    campaign = await ledger.load_campaign(pool, CAMPAIGN)
    assert campaign is not None
    assert (campaign.state, campaign.total) == ("running", 6)


async def test_job_id_is_an_idempotency_key(pool: ledger.Pool) -> None:
    await insert(pool, phones(2))
    async with ledger.transaction(pool) as conn:
        again = await ledger.insert_campaign(conn, new_campaign(), pages_of(staged(phones(5))))
    assert again is None
    assert await pool.fetchval("SELECT count(*) FROM campaigns") == 1
    assert await ledger.count_states(pool, CAMPAIGN) == {"pending": 2}


async def test_claim_by_two_owners_at_once_never_returns_a_row_twice(pool: ledger.Pool) -> None:
    ids = await insert(pool, phones(300))

    async def claim_all(owner: str) -> list[int]:
        mine: list[int] = []
        while claimed := await ledger.claim_recipients(pool, CAMPAIGN, owner, 7):
            assert [r.id for r in claimed] == sorted(r.id for r in claimed)
            mine.extend(r.id for r in claimed)
        return mine

    owners = ["owner-a", "owner-b", "owner-c", "owner-d"]
    claims = await asyncio.gather(*(claim_all(owner) for owner in owners))
    every_claim = [i for claim in claims for i in claim]
    assert sorted(every_claim) == ids, "each row claimed exactly once"
    for owner, claim in zip(owners, claims, strict=True):
        rows = await pool.fetch(
            "SELECT DISTINCT owner, state FROM recipients WHERE id = ANY($1::bigint[])", claim
        )
        assert [tuple(r) for r in rows] in ([(owner, "sending")], []), owner


async def test_claim_takes_due_recipients_in_producer_order_only(pool: ledger.Pool) -> None:
    ids = await insert(pool, phones(5))
    later = datetime.now(UTC) + timedelta(hours=1)
    await ledger.record_outcomes(pool, [Outcome(ids[0], "pending", next_attempt_at=later)])
    claimed = await ledger.claim_recipients(pool, CAMPAIGN, "owner-a", 3)
    assert [r.id for r in claimed] == ids[1:4]
    assert await ledger.next_retry_at(pool, CAMPAIGN) == later


async def test_claim_after_an_id_starts_its_scan_above_it(pool: ledger.Pool) -> None:
    ids = await insert(pool, phones(6))
    await ledger.record_outcomes(pool, [Outcome(ids[0], "pending")])
    claimed = await ledger.claim_recipients(pool, CAMPAIGN, "owner-a", 2, after=ids[2])
    assert [r.id for r in claimed] == ids[3:5]
    # From the start again, what is still pending below comes first.
    claimed = await ledger.claim_recipients(pool, CAMPAIGN, "owner-a", 10)
    assert [r.id for r in claimed] == [*ids[:3], ids[5]]


async def test_claim_takes_nothing_from_a_campaign_that_is_not_running(pool: ledger.Pool) -> None:
    await insert(pool, phones(3))
    await ledger.set_campaign_state(pool, CAMPAIGN, "paused", "operator")
    assert await ledger.claim_recipients(pool, CAMPAIGN, "owner-a", 10) == []
    assert await ledger.count_states(pool, CAMPAIGN) == {"pending": 3}


async def test_recovery_turns_a_dead_owners_sending_recipients_uncertain(
    pool: ledger.Pool,
) -> None:
    await insert(pool, phones(6))
    await ledger.claim_recipients(pool, CAMPAIGN, "dead-owner", 2)
    await ledger.claim_recipients(pool, CAMPAIGN, "live-owner", 2)

    assert await ledger.recover_owned(pool, "dead-owner") == 2

    rows = await pool.fetch(
        "SELECT state, owner, attempts, error_class FROM recipients ORDER BY id"
    )
    assert [(r["state"], r["owner"], r["attempts"], r["error_class"]) for r in rows] == [
        ("uncertain", None, 0, "uncertain"),
        ("uncertain", None, 0, "uncertain"),
        ("sending", "live-owner", 0, None),
        ("sending", "live-owner", 0, None),
        ("pending", None, 0, None),
        ("pending", None, 0, None),
    ]
    assert await ledger.recover_owned(pool, "dead-owner") == 0, (
        "recovery is idempotent: uncertain rows have no owner any more"
    )


async def test_recovery_never_resends_it_leaves_the_doubt_to_reconciliation(
    pool: ledger.Pool,
) -> None:
    ids = await insert(pool, phones(3))
    claimed = await ledger.claim_recipients(pool, CAMPAIGN, "owner-a", 3)
    await ledger.record_outcomes(pool, [Outcome(ids[0], "pending", requests=2)])
    await ledger.claim_recipients(pool, CAMPAIGN, "dead-owner", 3)

    assert await ledger.recover_owned(pool, "dead-owner") == 1

    assert len(claimed) == 3
    assert await ledger.count_states(pool, CAMPAIGN) == {"uncertain": 1, "sending": 2}
    row = await pool.fetchrow("SELECT attempts, doubt_since FROM recipients WHERE id = $1", ids[0])
    assert row["attempts"] == 2, "earlier requests stay counted"
    assert row["doubt_since"] is not None, "it waits for reconciliation"


async def test_receipts_never_move_a_recipient_backwards(pool: ledger.Pool) -> None:
    read_first, delivered_first, repeated = await insert(pool, phones(3))
    await sent(pool, [read_first, delivered_first, repeated])

    await ledger.apply_receipts(pool, [Receipt(read_first, "read", "wamid.x")])
    await ledger.apply_receipts(pool, [Receipt(read_first, "delivered", "wamid.x")])
    await ledger.apply_receipts(pool, [Receipt(read_first, "sent", "wamid.x")])
    await ledger.apply_receipts(pool, [Receipt(delivered_first, "delivered", None)])
    await ledger.apply_receipts(pool, [Receipt(delivered_first, "sent", None)])
    assert await ledger.apply_receipts(pool, [Receipt(repeated, "delivered", None)]) == 1
    assert await ledger.apply_receipts(pool, [Receipt(repeated, "delivered", None)]) == 0

    assert await state_of(pool, read_first) == "read"
    assert await state_of(pool, delivered_first) == "delivered"
    assert await state_of(pool, repeated) == "delivered"


async def test_one_batch_with_several_receipts_for_a_recipient_keeps_the_furthest(
    pool: ledger.Pool,
) -> None:
    out_of_order, sent_then_failed, delivered_and_failed = await insert(pool, phones(3))
    await sent(pool, [out_of_order, sent_then_failed, delivered_and_failed])
    batch = [
        Receipt(out_of_order, "read", None),
        Receipt(out_of_order, "sent", None),
        Receipt(out_of_order, "delivered", None),
        Receipt(out_of_order, "read", None),
        Receipt(sent_then_failed, "sent", None),
        Receipt(sent_then_failed, "failed", None, "131026", "Message undeliverable"),
        Receipt(delivered_and_failed, "failed", None, "131026", "Message undeliverable"),
        Receipt(delivered_and_failed, "delivered", None),
    ]
    assert await ledger.apply_receipts(pool, batch) == 3
    assert await state_of(pool, out_of_order) == "read"
    assert await state_of(pool, sent_then_failed) == "failed"
    assert await state_of(pool, delivered_and_failed) == "delivered"


async def test_failed_receipt_applies_after_sent_but_not_after_delivery(pool: ledger.Pool) -> None:
    only_sent, delivered, read = await insert(pool, phones(3))
    await sent(pool, [only_sent, delivered, read])
    await ledger.apply_receipts(pool, [Receipt(delivered, "delivered", None)])
    await ledger.apply_receipts(pool, [Receipt(read, "read", None)])

    failures = [
        Receipt(i, "failed", None, "131026", "Message undeliverable")
        for i in (only_sent, delivered, read)
    ]
    assert await ledger.apply_receipts(pool, failures) == 1

    rows = await pool.fetch(
        "SELECT id, state, error_class, error_code, error_text, provider_message_id "
        "FROM recipients ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [
        (only_sent, "failed", "permanent", "131026", "Message undeliverable", f"wamid.{only_sent}"),
        (delivered, "delivered", None, None, None, f"wamid.{delivered}"),
        (read, "read", None, None, None, f"wamid.{read}"),
    ]


async def test_a_receipt_resolves_an_uncertain_recipient(pool: ledger.Pool) -> None:
    resolved, failed_later, _untouched = await insert(pool, phones(3))
    await ledger.claim_recipients(pool, CAMPAIGN, "dead-owner", 3)
    await ledger.recover_owned(pool, "dead-owner")

    receipts = [
        Receipt(resolved, "delivered", "wamid.late"),
        Receipt(failed_later, "failed", "wamid.f", "131026", "Message undeliverable"),
    ]
    assert await ledger.apply_receipts(pool, receipts) == 2

    rows = await pool.fetch("SELECT state, provider_message_id FROM recipients ORDER BY id")
    assert [tuple(r) for r in rows] == [
        ("delivered", "wamid.late"),
        ("failed", "wamid.f"),
        ("uncertain", None),
    ]


async def test_receipts_do_not_touch_pending_recipients_but_overrule_a_local_failure(
    pool: ledger.Pool,
) -> None:
    """Evidence of delivery wins over a failure we recorded (a timeout, a 5xx): it is kept,
    flagged, and the error of the failure no longer stands."""
    pending, failed = await insert(pool, phones(2))
    await ledger.claim_recipients(pool, CAMPAIGN, "owner-a", 2)
    await ledger.record_outcomes(
        pool,
        [
            Outcome(pending, "pending"),
            Outcome(failed, "failed", None, "transient", "timeout", "no answer within 10 s"),
        ],
    )
    receipts = [Receipt(pending, "delivered", "wamid.p"), Receipt(failed, "read", "wamid.f")]
    assert await ledger.apply_receipts(pool, receipts) == 1
    rows = await pool.fetch(
        "SELECT state, flags, error_class, error_code, error_text FROM recipients ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [
        ("pending", [], None, None, None),
        ("read", ["delivered_after_failure"], None, None, None),
    ]


async def test_record_outcomes_does_not_downgrade_a_receipt_to_sent(pool: ledger.Pool) -> None:
    """The webhook can be faster than the batched outcome writer."""
    delivered, read, failed = await insert(pool, phones(3))
    await ledger.claim_recipients(pool, CAMPAIGN, "owner-a", 3)
    await ledger.apply_receipts(
        pool,
        [
            Receipt(delivered, "delivered", "wamid.d"),
            Receipt(read, "read", "wamid.r"),
            Receipt(failed, "failed", "wamid.f", "131026", "Message undeliverable"),
        ],
    )

    await ledger.record_outcomes(
        pool,
        [
            Outcome(i, "sent", f"wamid.{n}")
            for i, n in ((delivered, "d"), (read, "r"), (failed, "f"))
        ],
    )

    rows = await pool.fetch(
        "SELECT state, owner, error_class, error_code FROM recipients ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [
        ("delivered", None, None, None),
        ("read", None, None, None),
        ("failed", None, "permanent", "131026"),
    ]


async def test_campaign_is_finished_only_when_nothing_is_left_to_send(pool: ledger.Pool) -> None:
    first, second, third = await insert(pool, phones(3))
    assert not await ledger.finish_campaign_if_done(pool, CAMPAIGN), "all pending"

    await ledger.claim_recipients(pool, CAMPAIGN, "owner-a", 3)
    assert not await ledger.finish_campaign_if_done(pool, CAMPAIGN), "all sending"

    await ledger.record_outcomes(
        pool,
        [
            Outcome(first, "sent", "wamid.1"),
            Outcome(second, "failed", None, "permanent", "131026", "undeliverable"),
        ],
    )
    assert not await ledger.finish_campaign_if_done(pool, CAMPAIGN), "one still sending"

    await ledger.record_outcomes(pool, [Outcome(third, "uncertain", None, "uncertain")])
    assert not await ledger.finish_campaign_if_done(pool, CAMPAIGN), "waits for reconciliation"
    await pool.execute("UPDATE recipients SET doubt_since = NULL WHERE id = $1", third)  # held
    assert await ledger.finish_campaign_if_done(pool, CAMPAIGN)
    campaign = await ledger.load_campaign(pool, CAMPAIGN)
    assert campaign is not None
    assert campaign.state == "done"
    assert campaign.finished_at is not None
    assert not await ledger.finish_campaign_if_done(pool, CAMPAIGN), "done only once"


async def test_a_paused_campaign_is_not_finished(pool: ledger.Pool) -> None:
    await insert(pool, phones(1))
    await ledger.set_campaign_state(pool, CAMPAIGN, "paused", "131048: spam rate limit")
    await pool.execute("UPDATE recipients SET state = 'sending'")
    await pool.execute("UPDATE recipients SET state = 'sent'")
    assert not await ledger.finish_campaign_if_done(pool, CAMPAIGN)
    assert (await ledger.load_campaign(pool, CAMPAIGN)).state == "paused"  # type: ignore[union-attr]


async def test_an_answer_of_any_kind_keeps_a_receipt_that_came_first(pool: ledger.Pool) -> None:
    """A 5xx may still have been delivered: its 'failed' or not-sent answer must not undo that."""
    failed_answer, not_sent_answer = await insert(pool, phones(2))
    await ledger.claim_recipients(pool, CAMPAIGN, "owner-a", 2)
    await ledger.apply_receipts(
        pool,
        [
            Receipt(failed_answer, "delivered", "wamid.a"),
            Receipt(not_sent_answer, "read", "wamid.b"),
        ],
    )

    await ledger.record_outcomes(
        pool,
        [
            Outcome(failed_answer, "failed", None, "transient", "131000", "Something went wrong"),
            Outcome(not_sent_answer, "pending"),
        ],
    )

    rows = await pool.fetch("SELECT state, owner, error_class FROM recipients ORDER BY id")
    assert [tuple(r) for r in rows] == [("delivered", None, None), ("read", None, None)]
    assert await ledger.claim_recipients(pool, CAMPAIGN, "owner-b", 2) == []


async def test_an_opted_out_failure_puts_the_number_on_the_opt_out_list(pool: ledger.Pool) -> None:
    stopped, other = await insert(pool, phones(2, first=30_000_000))
    await ledger.claim_recipients(pool, CAMPAIGN, "owner-a", 2)
    await ledger.record_outcomes(
        pool,
        [
            Outcome(stopped, "failed", None, "opted_out", "131050", "user stopped marketing"),
            Outcome(other, "failed", None, "permanent", "131026", "undeliverable"),
        ],
    )
    rows = await pool.fetch("SELECT phone, source, reason FROM optouts")
    assert [tuple(r) for r in rows] == [
        (phones(1, first=30_000_000)[0], "provider", "user stopped marketing")
    ]
    assert await state_of(pool, stopped) == "failed"


async def test_a_recipient_meets_the_marketing_cap_once_then_fails(pool: ledger.Pool) -> None:
    (capped,) = await insert(pool, phones(1, first=31_000_000))
    later = datetime.now(UTC) + timedelta(hours=24)
    cap = Outcome(capped, "pending", None, "marketing_cap", "131049", "cap", later, 1)
    await ledger.claim_recipients(pool, CAMPAIGN, "owner-a", 1)
    await ledger.record_outcomes(pool, [cap])
    row = await pool.fetchrow("SELECT state, next_attempt_at FROM recipients")
    assert (row["state"], row["next_attempt_at"]) == ("pending", later)
    await pool.execute("UPDATE recipients SET next_attempt_at = NULL")  # the 24 h have passed
    assert len(await ledger.claim_recipients(pool, CAMPAIGN, "owner-a", 1)) == 1
    await ledger.record_outcomes(pool, [cap])
    row = await pool.fetchrow("SELECT state, error_class, next_attempt_at FROM recipients")
    assert tuple(row) == ("failed", "marketing_cap", None)


async def add_page(
    pool: ledger.Pool, page: Sequence[StagedRecipient], *, last: bool = False
) -> ledger.CampaignCounts | None:
    async with ledger.transaction(pool) as conn:
        return await ledger.insert_recipient_page(
            conn, CAMPAIGN, page, skip_opted_out=False, last=last
        )


async def test_a_page_taken_in_twice_or_cut_differently_commits_each_entry_once(
    pool: ledger.Pool,
) -> None:
    numbers = phones(6)
    async with ledger.transaction(pool) as conn:
        assert await ledger.insert_campaign_head(conn, new_campaign(), 6)
        assert not await ledger.insert_campaign_head(conn, new_campaign(), 6)
    assert await add_page(pool, staged(numbers[:3])) == ledger.CampaignCounts(3, 0)
    assert await add_page(pool, staged(numbers[:3])) is None  # another take's, again
    # A take paging by 4 from seq 2: only seq 3 onwards is new; a repeat of seq 0's number is
    # a duplicate of it.
    page = staged([*numbers[2:5], numbers[0]], first_seq=2)
    assert await add_page(pool, page, last=True) == ledger.CampaignCounts(2, 1)
    intake = await ledger.load_intake(pool, CAMPAIGN)
    rows = await pool.fetch("SELECT seq, state, error_text FROM recipients ORDER BY seq")
    assert intake == ledger.Intake(complete=True, next_seq=6, length=6, state="running")
    assert [(r["seq"], r["state"], r["error_text"]) for r in rows] == [
        *((seq, "pending", None) for seq in range(5)),
        (5, "skipped", "duplicate"),
    ]
    assert await add_page(pool, staged(numbers[5:], first_seq=6)) is None  # the intake is over


async def test_a_campaign_still_taken_in_is_not_finished_even_with_nothing_pending(
    pool: ledger.Pool,
) -> None:
    async with ledger.transaction(pool) as conn:
        assert await ledger.insert_campaign_head(conn, new_campaign(), 4)
    await add_page(pool, staged(phones(2)))
    rows = await pool.fetch("SELECT id FROM recipients ORDER BY seq")
    await sent(pool, [r["id"] for r in rows])
    assert not await ledger.finish_campaign_if_done(pool, CAMPAIGN)
    await add_page(
        pool, [StagedRecipient(2, "x", None, "bad"), *staged(phones(1, 20_000_000), 3)], last=True
    )
    assert not await ledger.finish_campaign_if_done(pool, CAMPAIGN)  # one is pending
    await sent(pool, [await pool.fetchval("SELECT id FROM recipients WHERE seq = 3")])
    assert await ledger.finish_campaign_if_done(pool, CAMPAIGN)
