"""What the reconciler relies on: the units sent per hour of the timestamp sent, an hour's
rows called for a customer, and rows moved by what the provider's books show (only from the
state they were read in, each audited)."""

from __future__ import annotations

from controlplane.interfaces import (
    Attempt,
    AuditEntry,
    RollupBatch,
    RollupPlan,
    RowMove,
    SentCell,
    Storage,
)
from controlplane.ledger import LedgerRow, Reason, RowState
from tests.contract.helpers import (
    HOUR,
    NOW,
    UNIT,
    B,
    by_id,
    claim,
    entry,
    event,
    plan,
    pro,
    roll,
    settlement,
)


async def sent_rows(storage: Storage, stamps: dict[int, int]) -> list[LedgerRow]:
    """Org `a`'s rows of one bucket each (value 1 unit, then 2...), every one called for
    `cus_a` with the timestamp `stamps[i]` and sent except those whose stamp is negative."""
    await pro(storage, "a")
    await storage.insert_events(
        [event(f"e{i}", "a", B[i] + 1, (i + 1) * UNIT) for i in range(len(stamps))], HOUR
    )
    await roll(storage)
    rows = await storage.ledger(org_id="a")
    await storage.sendable(0, 100, claim=claim("s"))
    for row in rows:
        stamp = abs(stamps[row.bucket_start])
        series = {row.id: Attempt("cus_a", stamp, row.identifier)}
        await storage.record_attempts([row.id], NOW, claim("s"), series=series)
    sent = [r for r in rows if stamps[r.bucket_start] >= 0]
    await storage.settle([settlement(r, RowState.SENT, customer="cus_a") for r in sent], NOW, "s")
    await storage.release_claims("s")
    return await storage.ledger(org_id="a")


def move(row: LedgerRow, state: RowState, reason: str | None) -> RowMove:
    detail = "by the provider's books"
    audit = AuditEntry(
        action=f"ledger.{state.value}", subject=row.identifier, actor="t", reason=detail
    )
    return RowMove(row.id, row.state.value, row.reason, state.value, reason, detail, audit)


async def test_sent_units_are_summed_per_hour_of_the_timestamp_sent(storage: Storage) -> None:
    # bucket 1's row was stamped into bucket 0's hour (a correction), bucket 3's never sent
    stamps = {B[0]: B[0], B[1]: B[0] + 120, B[2]: B[2] + 59, B[3]: -B[3]}
    await sent_rows(storage, stamps)
    cells = await storage.sent_cells(B[0], B[3] + HOUR, None)
    assert sorted(cells, key=lambda c: c.hour) == [
        SentCell("a", "cus_a", "gbs", B[0], 3, last_attempt_at=NOW),
        SentCell("a", "cus_a", "gbs", B[2], 3, last_attempt_at=NOW),
    ]
    assert await storage.sent_cells(B[1], B[2], None) == []  # [start, end) of the stamps
    assert await storage.sent_cells(B[0], B[4], "b") == []
    assert len(await storage.sent_cells(B[0], B[4], "a")) == 2


async def test_stamped_rows_are_an_hours_rows_in_any_state(storage: Storage) -> None:
    stamps = {B[0]: B[0], B[1]: B[0] + 120, B[2]: B[2], B[3]: -(B[0] + 5)}
    rows = await sent_rows(storage, stamps)
    hour = await storage.stamped_rows("a", "gbs", "cus_a", B[0], B[0] + HOUR)
    assert [r.bucket_start for r in hour] == [B[0], B[1], B[3]]
    assert [r.state for r in hour] == [RowState.SENT, RowState.SENT, RowState.PENDING]
    assert await storage.stamped_rows("a", "gbs", "cus_b", B[0], B[0] + HOUR) == []
    assert len(rows) == 4


async def test_rows_move_only_from_the_state_they_were_read_in(storage: Storage) -> None:
    r0, r1, r2 = await sent_rows(storage, {B[0]: B[0], B[1]: B[1], B[2]: B[2]})
    moved = await storage.move_rows(
        [move(r0, RowState.HELD, Reason.PROVIDER_MISSING), move(r1, RowState.HELD, "x")], NOW
    )
    assert moved == [r0.id, r1.id]
    rows = by_id(await storage.ledger())
    assert (rows[r0.id].state, rows[r0.id].reason) == (RowState.HELD, "provider_missing")
    assert rows[r0.id].quantity == r0.quantity and rows[r0.id].detail == "by the provider's books"
    # read before the move: its expected state is gone, nothing happens (nor any audit)
    assert await storage.move_rows([move(r0, RowState.HELD, Reason.AMBIGUOUS)], NOW) == []
    back = await storage.move_rows([move(rows[r0.id], RowState.SENT, None)], NOW + 5)
    assert back == [r0.id]
    assert by_id(await storage.ledger())[r0.id].state is RowState.SENT
    audit = await storage.audit_log(action_prefix="ledger.", limit=20)
    assert [(a.action, a.subject) for a in audit if a.actor == "t"] == [
        ("ledger.sent", r0.identifier),
        ("ledger.held", r1.identifier),
        ("ledger.held", r0.identifier),
    ]
    assert r2.state is RowState.SENT


async def test_rows_held_as_provider_missing_are_reissued_not_resent(storage: Storage) -> None:
    (r0,) = await sent_rows(storage, {B[0]: B[0]})
    await storage.move_rows([move(r0, RowState.HELD, Reason.PROVIDER_MISSING)], NOW)
    # never picked by a sender, never settled by a late answer
    assert await storage.sendable(0, 100, claim=claim("s2")) == []
    await storage.settle([settlement(r0, RowState.SENT)], NOW, "s2")
    assert by_id(await storage.ledger())[r0.id].state is RowState.HELD
    (new,) = await storage.reissue_rows([r0.id], NOW, "t", "missing at the provider")
    rows = by_id(await storage.ledger())
    assert (rows[r0.id].state, rows[r0.id].reason) == (RowState.CANCELLED, Reason.REISSUED)
    assert (new.quantity, new.revision, new.state) == (r0.quantity, 2, RowState.PENDING)
    (stored,) = [r for r in await storage.ledger() if r.identifier == new.identifier]
    assert stored.plan_source == r0.plan_source is not None  # the plan it was billed under


async def test_offsetting_a_sent_row_appends_its_negative_and_moves_no_usage(
    storage: Storage,
) -> None:
    r0, r1 = await sent_rows(storage, {B[0]: B[0] + 60, B[1]: B[1]})
    (offset,) = await storage.offset_rows([r0.id, r0.id], NOW, "t", "rolled back")
    assert (offset.offsets_id, offset.revision, offset.state) == (r0.id, 2, RowState.PENDING)
    assert (offset.value_micros, offset.quantity) == (-r0.value_micros, -r0.quantity)
    # called as its row was: the same customer and timestamp, under its own identifier
    assert (offset.attempt_customer, offset.attempt_timestamp, offset.attempt_key) == (
        "cus_a",
        B[0] + 60,
        offset.identifier,
    )
    assert by_id(await storage.ledger())[r0.id].state is RowState.SENT  # until Stripe takes it
    assert await storage.offset_rows([r0.id, offset.id], NOW, "t", "again") == []  # one offset
    assert [r.id for r in await storage.unsent_offsets()] == [offset.id]
    # only a rollback sends an offset (and completes it): never a sender
    assert offset.id not in [i.row.id for i in await storage.sendable(0, 100, claim=claim("x"))]
    await storage.release_claims("x")
    # the bucket's usage is unchanged: a late event adds only its own value
    await storage.insert_events([event("late", "a", B[0] + 9, UNIT)], HOUR)
    await roll(storage)
    late = [r for r in await storage.ledger() if r.id > offset.id]
    assert [(r.bucket_start, r.value_micros, r.revision) for r in late] == [(B[0], UNIT, 3)]

    taken = settlement(offset, RowState.SENT, customer="cus_a", provider_id="mev_o")
    assert await storage.complete_offsets([taken], NOW, "t") == 1
    assert await storage.complete_offsets([taken], NOW, "t") == 0  # once
    rows = by_id(await storage.ledger())
    assert (rows[r0.id].state, rows[r0.id].reason) == (RowState.CANCELLED, Reason.OFFSET)
    assert (rows[offset.id].state, rows[offset.id].quantity) == (RowState.SENT, -r0.quantity)
    assert rows[r1.id].state is RowState.SENT and await storage.unsent_offsets() == []
    # the provider holds both the row and its offset: the hour nets to zero
    assert [c.units for c in await storage.sent_cells(B[0], B[0] + HOUR, "a")] == [0]
    # an offset is never cancelled (that would bill its row again)
    assert await storage.cancel_rows([offset.id], NOW, "t", "rolled_back") == 0
    audit = await storage.audit_log(action_prefix="ledger.offset")
    assert [(a.action, a.subject) for a in audit] == [
        ("ledger.offset", r0.identifier),
        ("ledger.offset_appended", offset.identifier),
    ]


async def test_an_offset_undone_by_its_own_offset_bills_its_row_again(storage: Storage) -> None:
    (r0,) = await sent_rows(storage, {B[0]: B[0] + 60})
    (offset,) = await storage.offset_rows([r0.id], NOW, "t", "rolled back")
    await storage.record_attempts([offset.id], NOW)
    taken = settlement(offset, RowState.SENT, customer="cus_a", provider_id="mev_o")
    assert await storage.complete_offsets([taken], NOW, "t") == 1
    (undo,) = await storage.offset_rows([offset.id], NOW, "t", "its bucket stays")
    assert (undo.offsets_id, undo.quantity, undo.revision) == (offset.id, r0.quantity, 3)
    assert (undo.attempt_customer, undo.attempt_timestamp) == ("cus_a", B[0] + 60)
    done = settlement(undo, RowState.SENT, customer="cus_a", provider_id="mev_u")
    assert await storage.complete_offsets([done], NOW, "t") == 1
    rows = by_id(await storage.ledger())
    assert (rows[r0.id].state, rows[r0.id].reason) == (RowState.SENT, None)  # billed here again
    assert (rows[offset.id].state, rows[offset.id].reason) == (RowState.CANCELLED, Reason.OFFSET)
    assert rows[undo.id].state is RowState.SENT
    # the provider holds the row, its offset and the offset's: the hour holds the row's units
    assert [c.units for c in await storage.sent_cells(B[0], B[0] + HOUR, "a")] == [r0.quantity]
    # the bucket's usage is unchanged (a late event adds only its own value) ...
    await storage.insert_events([event("late", "a", B[0] + 9, UNIT)], HOUR)
    await roll(storage)
    late = [r for r in await storage.ledger() if r.id > undo.id]
    assert [(r.value_micros, r.revision) for r in late] == [(UNIT, 4)]
    # ... and a later rollback can offset the row again
    (again,) = await storage.offset_rows([r0.id], NOW, "t", "rolled back again")
    assert again.quantity == -r0.quantity
    (undone,) = await storage.audit_log(action_prefix="ledger.offset_undone")
    assert undone.subject == offset.identifier


async def test_a_row_a_rollback_cancelled_can_be_reissued(storage: Storage) -> None:
    """Cancelled at the provider by a rollback whose bucket then stayed billed here: its
    units are billed again under the bucket's next revision. Rows credited stay as they
    are (the provider still counts them)."""
    r0, r1 = await sent_rows(storage, {B[0]: B[0], B[1]: B[1]})
    await storage.cancel_rows([r0.id], NOW, "t", Reason.ROLLED_BACK.value, "cancelled")
    await storage.cancel_rows([r1.id], NOW, "t", Reason.CREDITED.value, "credit note")
    # only when asked: a repair or a late invoice never re-issues what a rollback handed back
    assert await storage.reissue_rows([r0.id, r1.id], NOW, "t", "missing") == []
    (new,) = await storage.reissue_rows(
        [r0.id, r1.id], NOW, "t", "its bucket stays", handed_back=True
    )
    assert (new.bucket_start, new.quantity, new.revision) == (B[0], r0.quantity, 2)
    rows = by_id(await storage.ledger())
    assert (rows[r0.id].state, rows[r0.id].reason) == (RowState.CANCELLED, Reason.REISSUED)
    assert (rows[r1.id].state, rows[r1.id].reason) == (RowState.CANCELLED, Reason.CREDITED)
    assert await storage.reissue_rows([r0.id], NOW, "t", "again", handed_back=True) == []


async def test_two_rows_of_one_bucket_are_offset_in_one_call(storage: Storage) -> None:
    (r0,) = await sent_rows(storage, {B[0]: B[0]})
    await storage.insert_events([event("late", "a", B[0] + 9, UNIT)], HOUR)
    await roll(storage)
    (r1,) = [r for r in await storage.ledger() if r.id != r0.id]
    await storage.sendable(0, 100, claim=claim("s"))
    series = {r1.id: Attempt("cus_a", B[0], r1.identifier)}
    await storage.record_attempts([r1.id], NOW, claim("s"), series=series)
    await storage.settle([settlement(r1, RowState.SENT, customer="cus_a")], NOW, "s")
    offsets = await storage.offset_rows([r0.id, r1.id], NOW, "t", "rolled back")
    assert sorted(o.revision for o in offsets) == [3, 4]
    assert sorted(o.offsets_id or 0 for o in offsets) == [r0.id, r1.id]


async def test_the_rollup_reads_what_a_bucket_holds_per_rounding_chain(storage: Storage) -> None:
    """Usage taken back leaves the chains that hold it (billed, free, handed back): the
    rollup step is given the bucket's ledger value per chain, offsets moving none."""
    (r0,) = await sent_rows(storage, {B[0]: B[0]})  # 1 unit, billed
    await storage.set_org(
        "a", customer=None, plan="free", effective_from=0, at=NOW, audit=entry("org.set", "a")
    )
    await storage.insert_events([event("f", "a", B[0] + 2, 2 * UNIT)], HOUR)
    await roll(storage)  # 2 units written free
    (offset,) = await storage.offset_rows([r0.id], NOW, "t", "rolled back")
    seen: list[RollupBatch] = []

    def spy(batch: RollupBatch) -> RollupPlan:
        seen.append(batch)
        return plan(batch)

    await storage.insert_events([event("g", "a", B[0] + 3, UNIT)], HOUR)
    await storage.rollup_step(NOW, HOUR, 1000, spy)
    (batch,) = seen
    assert batch.ledger_chains[("a", "gbs", B[0])] == {"billable": UNIT, "free_plan": 2 * UNIT}
    assert batch.revisions[("a", "gbs", B[0])] == offset.revision
