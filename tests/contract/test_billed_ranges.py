"""The seam a legacy biller reads: per org, the runs of consecutive buckets with a row in state
`sent` (of any meter), as [start, end) ranges bounded by the window asked for."""

from __future__ import annotations

from controlplane.interfaces import BilledRange, Storage
from controlplane.ledger import LedgerRow, RowState
from tests.contract.helpers import HOUR, NOW, UNIT, B, claim, event, pro, roll, settlement


async def rows_of(
    storage: Storage, org: str, buckets: list[int], meter: str = "gbs"
) -> list[LedgerRow]:
    """One unit of `meter` in each of the buckets B[i], rolled up: the rows, by bucket."""
    await storage.insert_events(
        [event(f"{org}{meter}{i}", org, B[i] + 1, UNIT, meter) for i in buckets], HOUR
    )
    await roll(storage)
    found = {r.bucket_start: r for r in await storage.ledger(org_id=org) if r.meter == meter}
    return [found[B[i]] for i in buckets]


async def test_sent_buckets_are_grouped_into_ranges_per_org(storage: Storage) -> None:
    await pro(storage, "a", "b", "c")
    a = await rows_of(storage, "a", list(range(9)))
    b_gbs, b_more = await rows_of(storage, "b", [1, 2])
    (b_calls,) = await rows_of(storage, "b", [1], meter="calls")
    await rows_of(storage, "c", [0, 1])  # nothing of c's is sent
    await storage.sendable(0, 1000, claim=claim("s"))
    sent = [a[i] for i in (0, 1, 2, 4, 5, 6, 8)] + [b_calls]
    await storage.settle(
        [settlement(r, RowState.SENT, customer=f"cus_{r.org_id}") for r in sent]
        + [settlement(a[7], RowState.HELD, "provider_rejected")],
        NOW,
        "s",
    )
    await storage.release_claims("s")
    # a rollback cancelled a[6]; a[3] is still pending; a[7] held: none of them billed here
    assert await storage.cancel_rows([a[6].id], NOW, "ops", "rolled_back") == 1
    assert (b_gbs.state, b_more.state) == (RowState.PENDING, RowState.PENDING)

    everything = await storage.billed_ranges(B[0], B[20], HOUR)
    assert everything == [
        BilledRange("a", B[0], B[3]),
        BilledRange("a", B[4], B[6]),
        BilledRange("a", B[8], B[9]),
        BilledRange("b", B[1], B[2]),  # one meter sent is enough: the bucket is billed here
    ]
    # bounded by the window: a range is cut at its edges
    assert await storage.billed_ranges(B[1], B[5], HOUR) == [
        BilledRange("a", B[1], B[3]),
        BilledRange("a", B[4], B[5]),
        BilledRange("b", B[1], B[2]),
    ]
    assert await storage.billed_ranges(B[1], B[5], HOUR, "b") == [BilledRange("b", B[1], B[2])]
    assert await storage.billed_ranges(B[0], B[20], HOUR, "c") == []
    assert await storage.billed_ranges(B[9], B[20], HOUR) == []


async def test_a_bucket_billed_on_several_meters_and_revisions_is_one_bucket(
    storage: Storage,
) -> None:
    await pro(storage, "a")
    gbs = await rows_of(storage, "a", [0, 1])
    calls = await rows_of(storage, "a", [0, 1], meter="calls")
    await storage.insert_events([event("late", "a", B[1] + 9, UNIT)], HOUR)  # a revision 2
    await roll(storage)
    (late,) = [r for r in await storage.ledger(org_id="a") if r.revision == 2]
    await storage.sendable(0, 1000, claim=claim("s"))
    await storage.settle(
        [settlement(r, RowState.SENT, customer="cus_a") for r in (*gbs, *calls, late)], NOW, "s"
    )
    assert await storage.billed_ranges(B[0], B[2], HOUR) == [BilledRange("a", B[0], B[2])]
    # the original of bucket 1 cancelled, its correction still sent: still billed here
    assert await storage.cancel_rows([gbs[1].id, calls[1].id], NOW, "ops", "rolled_back") == 2
    assert await storage.billed_ranges(B[0], B[2], HOUR) == [BilledRange("a", B[0], B[2])]
    assert await storage.cancel_rows([late.id], NOW, "ops", "rolled_back") == 1
    assert await storage.billed_ranges(B[0], B[2], HOUR) == [BilledRange("a", B[0], B[1])]
