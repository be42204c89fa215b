"""What the sender relies on: sendable rows and claims, settlements, attempts, the seam and
cancellations. Claims are taken through separate handles, as separate replicas would."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from controlplane.interfaces import Attempt, Claim, ClosedPeriod, SeamRows, SendItem, Storage
from controlplane.ledger import LedgerRow, Reason, RowState
from tests.contract.conftest import Store
from tests.contract.helpers import (
    HOUR,
    NOW,
    UNIT,
    B,
    assert_chains_floor,
    by_id,
    claim,
    entry,
    event,
    pro,
    roll,
    settlement,
)


async def lane_rows(
    storage: Storage, org: str, *values: int, meter: str = "gbs"
) -> list[LedgerRow]:
    """Roll up one bucket per value for (org, meter), from B[0] on; the rows, oldest first."""
    await storage.insert_events(
        [event(f"{org}{meter}{i}", org, B[i] + 1, v, meter) for i, v in enumerate(values)], HOUR
    )
    await roll(storage)
    return [r for r in await storage.ledger(org_id=org, limit=10_000) if r.meter == meter]


def ids(items: list[SendItem]) -> list[int]:
    return [i.row.id for i in items]


async def test_sendable_returns_pending_rows_oldest_first_with_the_customer(
    storage: Storage,
) -> None:
    await pro(storage, "a")
    await pro(storage, "b", customer=False)
    await storage.insert_events(
        [event(f"{o}{i}", o, B[i], UNIT) for i in range(3) for o in ("a", "b", "free")], HOUR
    )
    await roll(storage)
    pending = await storage.ledger(state=RowState.PENDING)
    assert len(pending) == 6  # `free` is excluded

    items = await storage.sendable(0, 100, claim=claim("s1"))
    assert [i.row for i in items] == pending
    assert {i.row.org_id: i.customer for i in items} == {"a": "cus_a", "b": None}
    # A sender reads its own claimed rows again.
    assert ids(await storage.sendable(0, 100, claim=claim("s1"))) == [r.id for r in pending]

    assert ids(await storage.sendable(pending[1].id, 2, claim=claim("s1"))) == [
        r.id for r in pending[2:4]
    ]
    assert ids(await storage.sendable(0, 100, "b", claim=claim("s1"))) == [
        r.id for r in pending if r.org_id == "b"
    ]
    assert ids(await storage.sendable(0, 100, until=B[1], claim=claim("s1"))) == [
        r.id for r in pending if r.bucket_start < B[1]
    ]
    assert ids(await storage.sendable(0, 100, "a", B[2], claim=claim("s1"))) == [
        r.id for r in pending if r.org_id == "a" and r.bucket_start < B[2]
    ]


async def test_held_rows_come_back_only_when_their_org_has_a_customer(storage: Storage) -> None:
    await pro(storage, "b", customer=False)
    await pro(storage, "c")
    b0, b1 = await lane_rows(storage, "b", UNIT, UNIT)
    (c0,) = await lane_rows(storage, "c", UNIT)
    await storage.sendable(0, 100, claim=claim("s1"))
    moved = await storage.settle(
        [
            settlement(b0, RowState.HELD, Reason.NO_CUSTOMER),
            settlement(b1, RowState.HELD, Reason.NO_CUSTOMER),
            settlement(c0, RowState.HELD, Reason.PROVIDER_REJECTED, detail="no such meter"),
        ],
        NOW,
        "s1",
    )
    assert moved == 3
    assert await storage.sendable(0, 100, claim=claim("s1")) == []

    await storage.set_org(
        "b", customer="cus_b", plan=None, effective_from=0, at=NOW, audit=entry("org.set", "b")
    )
    items = await storage.sendable(0, 100, claim=claim("s1"))
    assert ids(items) == [b0.id, b1.id]  # never c0: a rejected row waits for a person
    assert {(i.row.state, i.row.reason, i.customer) for i in items} == {
        (RowState.HELD, Reason.NO_CUSTOMER.value, "cus_b")
    }
    # A held row settles like a pending one.
    assert await storage.settle([settlement(b0, RowState.SENT, customer="cus_b")], NOW, "s1") == 1
    assert (await storage.ledger(org_id="b"))[0].state is RowState.SENT


async def test_a_second_sender_gets_neither_claimed_rows_nor_their_lanes(
    store: Store, storage: Storage
) -> None:
    await pro(storage, "a", "b")
    gbs = await lane_rows(storage, "a", UNIT, UNIT, UNIT)
    (calls,) = await lane_rows(storage, "a", UNIT, meter="calls")
    (b_row,) = await lane_rows(storage, "b", UNIT)
    other = await store.open()

    # The first sender claims only the first row of the (a, gbs) lane.
    first = await storage.sendable(gbs[0].id - 1, 1, claim=claim("A"))
    assert ids(first) == [gbs[0].id]
    # The second gets every other lane, and nothing of (a, gbs): not even unclaimed rows.
    second = await other.sendable(0, 100, claim=claim("B"))
    assert sorted(ids(second)) == sorted([calls.id, b_row.id])
    # The first keeps its lane, and gets nothing the second holds.
    again = await storage.sendable(0, 100, claim=claim("A"))
    assert ids(again) == [r.id for r in gbs]


async def test_released_claims_free_the_rows(store: Store, storage: Storage) -> None:
    await pro(storage, "a", "b")
    rows = await lane_rows(storage, "a", UNIT, UNIT) + await lane_rows(storage, "b", UNIT)
    other = await store.open()
    assert len(await storage.sendable(0, 100, claim=claim("A"))) == 3
    assert await other.sendable(0, 100, claim=claim("B")) == []
    await other.release_claims("B")  # releasing one's own (none) leaves others' claims alone
    assert await other.sendable(0, 100, claim=claim("B")) == []

    await storage.release_claims("A")
    taken = await other.sendable(0, 100, claim=claim("B"))
    assert sorted(ids(taken)) == sorted(r.id for r in rows)
    assert await storage.sendable(0, 100, claim=claim("A")) == []


async def test_a_dead_senders_claims_lapse_at_their_until(store: Store, storage: Storage) -> None:
    await pro(storage, "a")
    rows = await lane_rows(storage, "a", UNIT, UNIT)
    other = await store.open()
    assert len(await storage.sendable(0, 100, claim=Claim("A", NOW, NOW + 30))) == 2
    # ... and "A" dies without releasing them.
    assert await other.sendable(0, 100, claim=Claim("B", NOW + 29, NOW + 329)) == []
    taken = await other.sendable(0, 100, claim=Claim("B", NOW + 30, NOW + 330))
    assert ids(taken) == [r.id for r in rows]
    assert await storage.sendable(0, 100, claim=Claim("A", NOW + 31, NOW + 331)) == []


async def test_concurrent_senders_never_share_a_row_or_a_lane(
    store: Store, storage: Storage
) -> None:
    orgs = [f"o{i}" for i in range(6)]
    await pro(storage, *orgs)
    await storage.insert_events(
        [
            event(f"{o}{m}{i}", o, B[i], UNIT, m)
            for o in orgs
            for m in ("gbs", "calls")
            for i in range(3)
        ],
        HOUR,
    )
    await roll(storage)
    handles = [storage, await store.open(), await store.open()]

    async def sender(handle: Storage, name: str) -> list[SendItem]:
        got: list[SendItem] = []
        after = 0
        while items := await handle.sendable(after, 4, claim=claim(name)):
            got += items
            after = items[-1].row.id
            await asyncio.sleep(0)
        return got

    results = await asyncio.gather(*(sender(h, f"s{n}") for n, h in enumerate(handles)))
    all_ids = [i for items in results for i in ids(items)]
    assert all_ids and len(all_ids) == len(set(all_ids))
    lanes = [{(i.row.org_id, i.row.meter) for i in items} for items in results]
    for n, mine in enumerate(lanes):
        for theirs in lanes[n + 1 :]:
            assert not mine & theirs


async def test_settle_moves_rows_clears_claims_and_audits_sends(
    store: Store, storage: Storage
) -> None:
    await pro(storage, "a")
    r0, r1, r2 = await lane_rows(storage, "a", 2_500_000, UNIT, UNIT)
    other = await store.open()
    assert ids(await storage.sendable(0, 1, claim=claim("A"))) == [r0.id]
    assert await other.sendable(0, 100, claim=claim("B")) == []

    sent = settlement(r0, RowState.SENT, provider_id="mev_0", customer="cus_a")
    assert await storage.settle([sent], NOW, "A") == 1
    row = by_id(await storage.ledger())[r0.id]
    assert (row.state, row.reason, row.provider_id) == (RowState.SENT, None, "mev_0")
    assert (row.sent_at, row.updated_at, row.quantity) == (NOW, NOW, 2)
    (record,) = await storage.audit_log(action_prefix="ledger.sent")
    assert (record.subject, record.actor, record.at) == (r0.identifier, "sender", NOW)
    assert record.after == {"quantity": 2, "customer": "cus_a", "provider_id": "mev_0"}

    # Settling cleared A's claim: the lane's other rows are free for B.
    assert ids(await other.sendable(0, 100, claim=claim("B"))) == [r1.id, r2.id]
    rejected = settlement(r1, RowState.HELD, Reason.PROVIDER_REJECTED, detail="bad customer")
    assert await other.settle([rejected], NOW + 1, "B") == 1
    row = by_id(await storage.ledger())[r1.id]
    assert (row.state, row.reason, row.detail, row.sent_at) == (
        RowState.HELD,
        "provider_rejected",
        "bad customer",
        None,
    )
    assert len(await storage.audit_log(action_prefix="ledger.sent")) == 1

    # Rows already settled are left as they are; the others still move.
    late = [
        settlement(r0, RowState.HELD, Reason.AMBIGUOUS),
        settlement(r2, RowState.SENT, provider_id="mev_2", customer="cus_a"),
    ]
    assert await other.settle(late, NOW + 2, "B") == 1
    rows = by_id(await storage.ledger())
    assert (rows[r0.id].state, rows[r0.id].provider_id, rows[r0.id].sent_at) == (
        RowState.SENT,
        "mev_0",
        NOW,
    )
    assert (rows[r2.id].state, rows[r2.id].sent_at) == (RowState.SENT, NOW + 2)
    audit = await storage.audit_log(action_prefix="ledger.sent")
    assert [r.subject for r in audit] == [r2.identifier, r0.identifier]
    assert await storage.settle([sent], NOW + 3, "A") == 0
    assert len(await storage.audit_log(action_prefix="ledger.sent")) == 2
    assert await storage.sendable(0, 100, claim=claim("C")) == []


async def test_attempts_are_recorded_and_taken_back(storage: Storage) -> None:
    await pro(storage, "a")
    r0, r1 = await lane_rows(storage, "a", UNIT, UNIT)
    assert await storage.record_attempts([r0.id, r1.id], NOW) == {r0.id: 1, r1.id: 1}
    await storage.record_attempts([r0.id], NOW + 50)
    rows = by_id(await storage.ledger())
    assert (rows[r0.id].attempts, rows[r0.id].first_attempt_at) == (2, NOW)
    assert (rows[r1.id].attempts, rows[r1.id].first_attempt_at) == (1, NOW)
    (item, _) = await storage.sendable(0, 100, claim=claim("s"))
    assert (item.row.attempts, item.row.first_attempt_at) == (2, NOW)

    await storage.release_attempts([r0.id])
    rows = by_id(await storage.ledger())
    assert (rows[r0.id].attempts, rows[r0.id].first_attempt_at) == (1, NOW)
    await storage.release_attempts([r0.id, r1.id])
    await storage.release_attempts([r0.id])  # nothing left to take back: never below zero
    rows = by_id(await storage.ledger())
    for row in rows.values():
        assert (row.attempts, row.first_attempt_at) == (0, None)


async def test_seam_counts_rows_reached_and_excluded_before_bill_from(storage: Storage) -> None:
    await pro(storage, "a")
    a0, _, a2, a3 = await lane_rows(storage, "a", UNIT, UNIT, UNIT, UNIT)
    await lane_rows(storage, "free", UNIT, UNIT)  # excluded, but not before bill_from
    assert await storage.seam(B[0]) == SeamRows(reached=0, excluded_before_bill_from=0)
    await storage.sendable(0, 100, claim=claim("s"))
    await storage.settle(
        [
            settlement(a0, RowState.EXCLUDED, Reason.BEFORE_BILL_FROM),
            settlement(a2, RowState.SENT, customer="cus_a"),
        ],
        NOW,
        "s",
    )
    await storage.record_attempts([a3.id], NOW)
    assert await storage.seam(B[0] - HOUR) == SeamRows(2, 1)
    assert await storage.seam(B[0]) == SeamRows(2, 1)
    assert await storage.seam(B[1]) == SeamRows(2, 0)
    assert await storage.seam(B[3]) == SeamRows(1, 0)
    assert await storage.seam(B[4]) == SeamRows(0, 0)


async def test_cancel_rows_moves_sent_rows_and_audits_each(storage: Storage) -> None:
    await pro(storage, "a")
    r0, r1, r2 = await lane_rows(storage, "a", UNIT, 2 * UNIT, UNIT)
    await storage.sendable(0, 100, claim=claim("s"))
    await storage.settle(
        [
            settlement(r0, RowState.SENT, customer="cus_a", provider_id="mev_0"),
            settlement(r1, RowState.SENT, customer="cus_a", provider_id="mev_1"),
        ],
        NOW,
        "s",
    )
    await storage.release_claims("s")
    ids_ = [r0.id, r1.id, r2.id]
    moved = await storage.cancel_rows(ids_, NOW + 10, "ops", "rolled_back", "cutover rolled back")
    assert moved == 2
    rows = by_id(await storage.ledger())
    for r, provider_id in ((r0, "mev_0"), (r1, "mev_1")):
        row = rows[r.id]
        assert (row.state, row.reason, row.detail) == (
            RowState.CANCELLED,
            "rolled_back",
            "cutover rolled back",
        )
        assert (row.updated_at, row.provider_id) == (NOW + 10, provider_id)
    assert rows[r2.id].state is RowState.PENDING
    audit = await storage.audit_log(action_prefix="ledger.cancelled")
    assert sorted(a.subject for a in audit) == sorted([r0.identifier, r1.identifier])
    assert {(a.actor, a.reason, a.at) for a in audit} == {("ops", "rolled_back", NOW + 10)}

    assert await storage.cancel_rows(ids_, NOW + 20, "ops", "rolled_back") == 0
    assert len(await storage.audit_log(action_prefix="ledger.cancelled")) == 2
    assert ids(await storage.sendable(0, 100, claim=claim("s"))) == [r2.id]


async def test_attempts_under_a_claim_renew_it_and_skip_rows_taken_over(storage: Storage) -> None:
    await pro(storage, "a")
    r0, r1 = await lane_rows(storage, "a", UNIT, 2 * UNIT)
    assert len(await storage.sendable(0, 100, claim=claim("A", at=NOW, seconds=300))) == 2
    renewed = claim("A", at=NOW + 200, seconds=300)
    assert await storage.record_attempts([r0.id, r1.id], NOW, renewed) == {r0.id: 1, r1.id: 2}
    assert await storage.live_claims(NOW + 450) == 2  # held until NOW + 500 now
    # A's hold lapses; B takes the lane; A must not count (or send) those rows any more.
    assert len(await storage.sendable(0, 100, claim=claim("B", at=NOW + 600))) == 2
    assert await storage.record_attempts([r0.id, r1.id], NOW + 600, claim("A", NOW + 600)) == {}
    assert [r.attempts for r in await storage.ledger()] == [1, 1]


async def test_attempts_on_a_held_row_are_taken_back_too(storage: Storage) -> None:
    """A row held for `no_customer` is delivered once the org has one, still `held`: an
    attempt recorded for a call that was not made must not stay."""
    await pro(storage, "a", customer=False)
    (r0,) = await lane_rows(storage, "a", UNIT)
    await storage.sendable(0, 100, claim=claim("s"))
    await storage.settle([settlement(r0, RowState.HELD, Reason.NO_CUSTOMER)], NOW, "s")
    await storage.record_attempts([r0.id], NOW)
    await storage.release_attempts([r0.id])
    (row,) = await storage.ledger()
    assert (row.state, row.attempts, row.first_attempt_at) == (RowState.HELD, 0, None)


async def test_cancel_rows_also_moves_rows_attempted_without_an_answer(storage: Storage) -> None:
    await pro(storage, "a")
    r0, r1 = await lane_rows(storage, "a", UNIT, UNIT)
    await storage.record_attempts([r0.id], NOW)  # r0 may be at the provider, r1 is not
    assert await storage.cancel_rows([r0.id, r1.id], NOW + 1, "ops", "rolled_back") == 1
    rows = by_id(await storage.ledger())
    assert (rows[r0.id].state, rows[r1.id].state) == (RowState.CANCELLED, RowState.PENDING)
    (audit,) = await storage.audit_log(action_prefix="ledger.cancelled")
    assert (audit.subject, audit.before) == (r0.identifier, {"state": "pending"})


async def test_ledger_filters_attempted_rows_and_pages_by_id(storage: Storage) -> None:
    await pro(storage, "a")
    r0, r1, r2 = await lane_rows(storage, "a", UNIT, UNIT, UNIT)
    await storage.record_attempts([r1.id], NOW)
    assert [r.id for r in await storage.ledger(attempted=True)] == [r1.id]
    assert [r.id for r in await storage.ledger(attempted=False)] == [r0.id, r2.id]
    assert [r.id for r in await storage.ledger(after_id=r0.id, limit=1)] == [r1.id]
    assert await storage.ledger(after_id=r2.id) == []


async def test_live_claims_counts_claims_that_have_not_lapsed(storage: Storage) -> None:
    await pro(storage, "a", "b")
    await lane_rows(storage, "a", UNIT, UNIT)
    await lane_rows(storage, "b", UNIT)
    assert await storage.live_claims(NOW) == 0
    assert len(await storage.sendable(0, 100, claim=claim("s", at=NOW, seconds=300))) == 3
    assert await storage.live_claims(NOW) == 3
    assert await storage.live_claims(NOW + 300) == 0  # lapsed: a dead sender's claims
    await storage.release_claims("s")
    assert await storage.live_claims(NOW) == 0


async def test_an_exclusion_re_derives_its_chain_and_the_carry(storage: Storage) -> None:
    await pro(storage, "a")
    r0, r1, r2 = await lane_rows(storage, "a", 1_600_000, 600_000, 600_000)
    assert [r.quantity for r in (r0, r1, r2)] == [1, 1, 0]
    await storage.sendable(0, 100, claim=claim("A"))

    excluded = settlement(r0, RowState.EXCLUDED, Reason.BEFORE_BILL_FROM)
    assert await storage.settle([excluded], NOW, "A") == 1
    rows = by_id(await storage.ledger())
    assert (rows[r0.id].state, rows[r0.id].reason) == (RowState.EXCLUDED, "before_bill_from")
    # The billable chain is now 0.6, 1.2: 0 then 1 unit (it was 1 then 0).
    assert [rows[r.id].quantity for r in (r1, r2)] == [0, 1]
    assert_chains_floor(rows.values())

    # The carry moved with it: a later bucket continues the re-derived chain (1.8 -> 1 unit).
    await storage.release_claims("A")
    await storage.insert_events([event("late", "a", B[3], 600_000)], HOUR)
    (late,) = await roll(storage)
    assert late.quantity == 0
    assert_chains_floor(await storage.ledger())


async def test_an_exclusion_re_derives_rows_held_before_any_attempt(storage: Storage) -> None:
    """A row held for `no_customer` never reached the provider: when an earlier row of its
    chain is excluded, its quantity is re-derived. Kept as it was, the held row would bill the
    excluded row's fraction (one unit for 0.6 here) once the customer is set."""
    await pro(storage, "a", customer=False)
    r0, r1 = await lane_rows(storage, "a", 600_000, 600_000)
    assert [r.quantity for r in (r0, r1)] == [0, 1]
    await storage.sendable(0, 100, claim=claim("A"))
    held = settlement(r1, RowState.HELD, Reason.NO_CUSTOMER)
    assert await storage.settle([held], NOW, "A") == 1

    excluded = settlement(r0, RowState.EXCLUDED, Reason.BEFORE_BILL_FROM)
    assert await storage.settle([excluded], NOW, "A") == 1
    rows = by_id(await storage.ledger())
    assert (rows[r1.id].state, rows[r1.id].quantity) == (RowState.HELD, 0)
    assert_chains_floor(rows.values())


@pytest.mark.parametrize("lapsed", [False, True], ids=["live", "lapsed"])
async def test_an_exclusion_leaves_alone_rows_another_live_claimant_holds(
    store: Store, storage: Storage, lapsed: bool
) -> None:
    await pro(storage, "a")
    r0, r1, r2 = await lane_rows(storage, "a", 600_000, 600_000, 600_000)
    assert [r.quantity for r in (r0, r1, r2)] == [0, 1, 0]
    other = await store.open()
    assert ids(await other.sendable(r0.id, 1, claim=Claim("B", NOW, NOW + 60))) == [r1.id]

    at = NOW + 120 if lapsed else NOW + 30
    excluded = settlement(r0, RowState.EXCLUDED, Reason.BEFORE_BILL_FROM)
    assert await storage.settle([excluded], at, "A") == 1
    rows = by_id(await storage.ledger())
    if lapsed:  # B is gone: its row is re-derived like any other
        assert [rows[r.id].quantity for r in (r1, r2)] == [0, 1]
    else:  # B may be sending r1's 1 unit right now: r1 keeps it, r2 absorbs the difference
        assert [rows[r.id].quantity for r in (r1, r2)] == [1, 0]
    assert_chains_floor(rows.values())


@pytest.mark.parametrize("decided", ["sent", "attempted"])
async def test_an_exclusion_never_changes_a_sent_or_attempted_row(
    storage: Storage, decided: str
) -> None:
    """The provider may have that row's quantity: it is frozen, and later rows absorb the
    difference."""
    await pro(storage, "a")
    r0, r1, r2 = await lane_rows(storage, "a", 1_600_000, 600_000, 600_000)
    assert [r.quantity for r in (r0, r1, r2)] == [1, 1, 0]
    await storage.sendable(0, 100, claim=claim("A"))
    if decided == "sent":
        await storage.settle([settlement(r1, RowState.SENT, customer="cus_a")], NOW, "A")
    else:
        await storage.record_attempts([r1.id], NOW)

    excluded = settlement(r0, RowState.EXCLUDED, Reason.BEFORE_BILL_FROM)
    assert await storage.settle([excluded], NOW, "A") == 1
    rows = by_id(await storage.ledger())
    # Billable 0.6 (frozen at 1 unit), then 1.2 -> 1 - 1 = 0 (not 0, 1 as when free).
    assert [rows[r.id].quantity for r in (r1, r2)] == [1, 0]
    assert_chains_floor(rows.values())


async def test_an_attempt_records_what_its_call_is_made_with(storage: Storage) -> None:
    await pro(storage, "a")
    r0, r1 = await lane_rows(storage, "a", UNIT, UNIT)
    first = Attempt("cus_a", B[0], r0.identifier)
    await storage.record_attempts([r0.id, r1.id], NOW, series={r0.id: first})
    await storage.record_attempts([r0.id], NOW + 50)  # a retry: kept as it was
    rows = by_id(await storage.ledger())
    assert (
        rows[r0.id].attempt_customer,
        rows[r0.id].attempt_timestamp,
        rows[r0.id].attempt_key,
        rows[r0.id].last_attempt_at,
    ) == ("cus_a", B[0], r0.identifier, NOW + 50)
    assert (rows[r1.id].attempt_customer, rows[r1.id].last_attempt_at) == (None, NOW)
    (item, _) = await storage.sendable(0, 100, claim=claim("s"))
    assert item.row.attempt_key == r0.identifier and item.customer == "cus_a"
    restamped = Attempt("cus_b", B[5], f"{r0.identifier}@{B[5]}")
    await storage.record_attempts([r0.id], NOW + 60, series={r0.id: restamped})
    row = by_id(await storage.ledger())[r0.id]
    assert (row.attempt_customer, row.attempt_timestamp, row.attempt_key) == tuple(
        msgspec.structs.astuple(restamped)
    )
    await storage.release_attempts([r1.id])  # its only attempt: nothing of it is left
    row = by_id(await storage.ledger())[r1.id]
    assert (row.attempts, row.last_attempt_at, row.attempt_key) == (0, None, None)


async def test_rows_sent_after_the_invoice_was_finalized_are_found_and_re_issued(
    storage: Storage,
) -> None:
    await pro(storage, "a")
    r0, r1, r2 = await lane_rows(storage, "a", UNIT + UNIT // 2, UNIT, UNIT)
    # r0 went out before the invoice was finalized, r1 after it, r2 into the next period
    for row, at, stamp in ((r0, NOW - 100, B[0]), (r1, NOW + 10, B[1]), (r2, NOW + 10, B[2])):
        await storage.record_attempts([row.id], at, series={row.id: Attempt("cus_a", stamp, "k")})
        await storage.settle([settlement(row, RowState.SENT)], at)
    period = ClosedPeriod("in_1", "a", B[0], B[2], NOW)
    assert [r.id for r in await storage.late_rows(period)] == [r1.id]

    (new,) = await storage.reissue_rows([r1.id], NOW + 20, "webhooks", "missed in_1")
    assert (new.bucket_start, new.revision, new.value_micros) == (B[1], 2, UNIT)
    rows = await storage.ledger()
    old = by_id(rows)[r1.id]
    assert (old.state, old.reason) == (RowState.CANCELLED, "reissued")
    (reissued,) = [r for r in rows if r.revision == 2]
    assert (reissued.state, reissued.quantity, reissued.identifier) == (
        RowState.PENDING,
        1,
        new.identifier,
    )
    assert_chains_floor([r for r in rows if r.reason != "reissued"])
    assert await storage.reissue_rows([r1.id], NOW + 30, "webhooks", "again") == []  # once
    assert await storage.late_rows(period) == []
    # the bucket's ledger total excludes the re-issued row: a rollup finds nothing to add
    assert await roll(storage) == []
    (audit,) = await storage.audit_log(action_prefix="ledger.reissued")
    assert audit.subject == r1.identifier


async def test_two_late_rows_of_one_bucket_are_re_issued_as_two_new_revisions(
    storage: Storage,
) -> None:
    await pro(storage, "a")
    await storage.insert_events([event("a1", "a", B[1], UNIT)], HOUR)
    await roll(storage)
    await storage.insert_events([event("a2", "a", B[1] + 5, 2 * UNIT)], HOUR)  # a correction
    await roll(storage)
    first, correction = await storage.ledger()
    for row in (first, correction):
        await storage.record_attempts([row.id], NOW + 10, series={row.id: Attempt("c", B[1], "k")})
        await storage.settle([settlement(row, RowState.SENT)], NOW + 10)
    period = ClosedPeriod("in_1", "a", B[0], B[2], NOW)
    assert len(await storage.late_rows(period)) == 2
    new = await storage.reissue_rows([first.id, correction.id], NOW + 20, "webhooks", "late")
    assert [(r.revision, r.value_micros) for r in new] == [(3, UNIT), (4, 2 * UNIT)]
    assert await roll(storage) == []  # the bucket's ledger total is still its usage


async def test_a_hand_back_holds_the_buckets_billed_here_from_every_sender(
    storage: Storage,
) -> None:
    """While a rollback hands back, no sender takes a row of a bucket billed here, of any
    meter (a sent correction would split the bucket), nor of a lane it holds; other orgs'
    rows stay free; a second hold is refused while the first lives."""
    await pro(storage, "a", "b")
    (sent,) = await lane_rows(storage, "a", UNIT)
    await storage.sendable(0, 100, claim=claim("s"))
    await storage.record_attempts([sent.id], NOW, claim("s"))
    await storage.settle([settlement(sent, RowState.SENT)], NOW, "s")
    await storage.release_claims("s")
    await lane_rows(storage, "a", UNIT, meter="calls")  # the bucket's other meter, pending
    (free,) = await lane_rows(storage, "b", UNIT)
    assert await storage.hold_billed_buckets(Claim("rollback:1", NOW, NOW + HOUR))
    assert not await storage.hold_billed_buckets(Claim("rollback:2", NOW, NOW + HOUR))
    assert ids(await storage.sendable(0, 100, claim=claim("s"))) == [free.id]
    await storage.release_claims("s")
    await storage.release_claims("rollback:1")
    items = await storage.sendable(0, 100, claim=claim("s"), billed_only=True)
    assert [(i.row.meter, i.row.bucket_start, i.billed) for i in items] == [("calls", B[0], True)]
