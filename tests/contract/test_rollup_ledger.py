"""Rollup through the real planner, and ledger reads, on every storage plugin."""

from __future__ import annotations

import asyncio
import itertools

from controlplane.interfaces import DirtyBacklog, LedgerCount, Storage
from controlplane.ledger import Reason, RowState
from tests.contract.conftest import Store
from tests.contract.helpers import (
    HOUR,
    NOW,
    UNIT,
    B,
    as_map,
    assert_chains_floor,
    chains,
    claim,
    entry,
    event,
    plan,
    pro,
    roll,
    settlement,
)


async def test_rollup_takes_only_closed_buckets(storage: Storage) -> None:
    await pro(storage, "a")
    await storage.insert_events(
        [
            event("e1", "a", B[0] + 10, 2 * UNIT),
            event("e2", "a", B[0] + 20, UNIT // 2),
            event("e3", "a", B[1] + 10, UNIT),
            event("e4", "a", B[2] + 10, UNIT),
        ],
        HOUR,
    )
    # B[0] ends at B[1]: closed at B[1], not a second before.
    assert await storage.rollup_step(B[1] - 1, HOUR, 100, plan) == (0, [])
    done, rows = await storage.rollup_step(B[1], HOUR, 100, plan)
    assert done == 1
    assert [(r.org_id, r.meter, r.bucket_start, r.revision) for r in rows] == [
        ("a", "gbs", B[0], 1)
    ]

    (row,) = await storage.ledger()
    assert row.identifier == f"a:gbs:{B[0]}:1" == rows[0].identifier
    assert (row.org_id, row.meter, row.bucket_start, row.bucket_end) == ("a", "gbs", B[0], B[1])
    assert (row.revision, row.value_micros, row.quantity) == (1, 2_500_000, 2)
    assert type(row.value_micros) is int and type(row.quantity) is int
    assert (row.state, row.reason, row.detail) == (RowState.PENDING, None, None)
    assert (row.attempts, row.first_attempt_at, row.provider_id, row.sent_at) == (
        0,
        None,
        None,
        None,
    )

    assert await storage.rollup_step(B[2] - 1, HOUR, 100, plan) == (0, [])
    done, rows = await storage.rollup_step(B[2], HOUR, 100, plan)
    assert done == 1 and [r.bucket_start for r in rows] == [B[1]]
    assert [r.bucket_start for r in await storage.ledger()] == [B[0], B[1]]  # B[2] still open


async def test_rollup_rerun_writes_nothing(storage: Storage) -> None:
    await pro(storage, "a", "b")
    batch = [event(f"e{i}", org, B[i % 3] + i, 333_333 * i) for i in range(1, 9) for org in "ab"]
    batch = [e for i, e in enumerate(batch) if i % 2 == 0] + [
        event(f"x{i}", "b", B[i], UNIT) for i in range(3)
    ]
    await storage.insert_events(batch, HOUR)
    first = await roll(storage)
    assert first
    ledger = await storage.ledger()
    assert await storage.rollup_step(NOW, HOUR, 100, plan) == (0, [])
    await storage.insert_events(batch, HOUR)  # a replayed batch: duplicates only
    assert await roll(storage) == []
    assert await storage.ledger() == ledger


async def test_a_late_event_adds_a_revision_for_the_difference(storage: Storage) -> None:
    await pro(storage, "a")
    await storage.insert_events([event("e1", "a", B[0], 2_500_000)], HOUR)
    await roll(storage)
    await storage.insert_events([event("late1", "a", B[0] + 5, UNIT)], HOUR)
    (second,) = await roll(storage)
    assert (second.revision, second.value_micros, second.quantity) == (2, UNIT, 1)
    await storage.insert_events([event("late2", "a", B[0] + 6, 700_000)], HOUR)
    (third,) = await roll(storage)
    assert (third.revision, third.value_micros, third.quantity) == (3, 700_000, 1)

    rows = await storage.ledger()
    assert [(r.revision, r.identifier) for r in rows] == [
        (n, f"a:gbs:{B[0]}:{n}") for n in (1, 2, 3)
    ]
    assert sum(r.value_micros for r in rows) == 4_200_000
    assert sum(r.quantity for r in rows) == 4  # floor(4.2)
    assert {r.state for r in rows} == {RowState.PENDING}


async def test_rounding_remainders_are_carried_per_org_and_meter(storage: Storage) -> None:
    await pro(storage, "a", "b")
    values = itertools.cycle([333_333, 1_500_001, 999_999, 10**15 + 7, 1, 250_000, 666_667])
    events = []
    for i in range(12):
        for org, meter in itertools.product("ab", ("gbs", "calls")):
            events.append(event(f"{org}{meter}{i}", org, B[i] + i, next(values), meter))
    await storage.insert_events(events, HOUR)
    # In several steps of two buckets, with late events in between.
    for closed in (B[3], B[6], B[12]):
        while (await storage.rollup_step(closed, HOUR, 2, plan))[0]:
            pass
        late = [event(f"late{closed}{i}", "a", B[i] + 1, 123_457) for i in range(0, 12, 5)]
        await storage.insert_events(late, HOUR)
    await roll(storage)

    rows = await storage.ledger()
    assert all(r.quantity >= 0 for r in rows)
    assert_chains_floor(rows)
    usage = as_map(await storage.usage(None, None, None, None))
    ledger_totals: dict[tuple[str, str, int], int] = {}
    for r in rows:
        key = (r.org_id, r.meter, r.bucket_start)
        ledger_totals[key] = ledger_totals.get(key, 0) + r.value_micros
    assert ledger_totals == usage
    assert set(chains(rows)) == {(o, m, "billable") for o in "ab" for m in ("gbs", "calls")}


async def test_free_plan_rows_are_excluded_with_a_carry_of_their_own(storage: Storage) -> None:
    # `p` is free for B[0], pro from B[1]; `f` was never stored: free.
    await storage.set_org(
        "p", customer="cus_p", plan="free", effective_from=0, at=NOW, audit=entry("org.set", "p")
    )
    await storage.set_org(
        "p", customer=None, plan="pro", effective_from=B[1], at=NOW, audit=entry("org.set", "p")
    )
    await storage.insert_events(
        [event(f"p{i}", "p", B[i], 600_000) for i in range(3)]
        + [event(f"f{i}", "f", B[i], 1_700_000) for i in range(2)],
        HOUR,
    )
    await roll(storage)
    rows = {(r.org_id, r.bucket_start): r for r in await storage.ledger()}
    assert (rows["p", B[0]].state, rows["p", B[0]].reason) == (RowState.EXCLUDED, "free_plan")
    assert rows["p", B[0]].quantity == 0
    # The billable chain starts from zero: 0.6 -> 0 units, 1.2 -> 1 unit.
    assert [rows["p", b].state for b in (B[1], B[2])] == [RowState.PENDING] * 2
    assert [rows["p", b].quantity for b in (B[1], B[2])] == [0, 1]
    assert [(rows["f", b].state, rows["f", b].reason) for b in (B[0], B[1])] == [
        (RowState.EXCLUDED, Reason.FREE_PLAN.value)
    ] * 2
    assert [rows["f", b].quantity for b in (B[0], B[1])] == [1, 2]
    assert_chains_floor(rows.values())
    pending = await storage.ledger(state=RowState.PENDING)
    assert {r.org_id for r in pending} == {"p"}


async def test_rollup_for_one_org_leaves_the_others_dirty(storage: Storage) -> None:
    await pro(storage, "a", "b")
    await storage.insert_events(
        [event("a0", "a", B[0], UNIT), event("a1", "a", B[1], UNIT), event("b0", "b", B[0], UNIT)],
        HOUR,
    )
    done, rows = await storage.rollup_step(NOW, HOUR, 100, plan, org_id="a")
    assert done == 2
    assert {r.org_id for r in rows} == {"a"}
    assert await storage.rollup_step(NOW, HOUR, 100, plan, org_id="a") == (0, [])
    assert {r.org_id for r in await storage.ledger()} == {"a"}
    done, rows = await storage.rollup_step(NOW, HOUR, 100, plan)
    assert done == 1 and [(r.org_id, r.bucket_start) for r in rows] == [("b", B[0])]


async def test_rollup_takes_at_most_limit_buckets_per_step(storage: Storage) -> None:
    await pro(storage, "a")
    await storage.insert_events([event(f"e{i}", "a", B[i], UNIT) for i in range(5)], HOUR)
    steps = []
    while True:
        done, rows = await storage.rollup_step(NOW, HOUR, 2, plan)
        if not done:
            break
        assert len(rows) == done
        steps.append(done)
    assert steps == [2, 2, 1]
    assert sorted(r.bucket_start for r in await storage.ledger()) == B[:5]


async def test_a_long_identifier_is_stored_as_the_rows_hash(storage: Storage) -> None:
    org = "o" * 120
    await pro(storage, org)
    await storage.insert_events([event("e1", org, B[0], UNIT)], HOUR)
    (written,) = await roll(storage)
    (row,) = await storage.ledger(org_id=org)
    assert row.identifier == written.identifier
    assert row.identifier.startswith("h:") and len(row.identifier) <= 100


async def test_ledger_filters_by_org_state_and_bucket_window(storage: Storage) -> None:
    await pro(storage, "a", "b")
    events = [
        event(f"{org}{i}", org, B[i], UNIT) for i in range(4) for org in ("a", "b", "free_org")
    ]
    await storage.insert_events(events, HOUR)
    await roll(storage)
    rows = await storage.ledger()
    assert len(rows) == 12
    ids = [r.id for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == 12  # oldest first

    def expect(org: str | None, state: RowState | None, start: int | None, end: int | None):
        return [
            r
            for r in rows
            if (org is None or r.org_id == org)
            and (state is None or r.state is state)
            and (start is None or r.bucket_start >= start)
            and (end is None or r.bucket_start < end)
        ]

    for org, state, start, end in [
        ("a", None, None, None),
        (None, RowState.EXCLUDED, None, None),
        (None, RowState.PENDING, None, None),
        (None, RowState.SENT, None, None),
        (None, None, B[1], B[3]),
        ("b", RowState.PENDING, B[2], None),
        ("free_org", RowState.PENDING, None, None),
        (None, None, None, B[1]),
    ]:
        got = await storage.ledger(org_id=org, state=state, start=start, end=end)
        assert got == expect(org, state, start, end), (org, state, start, end)
    assert await storage.ledger(limit=5) == rows[:5]
    assert await storage.ledger(org_id="a", limit=2) == expect("a", None, None, None)[:2]


async def test_dirty_backlog_counts_closed_buckets_waiting_for_the_rollup(
    storage: Storage,
) -> None:
    assert await storage.dirty_backlog(NOW, HOUR) == DirtyBacklog(buckets=0, oldest_start=None)
    await pro(storage, "a", "b")
    await storage.insert_events(
        [event(f"a{i}", "a", B[i], UNIT) for i in range(3)] + [event("b1", "b", B[1], UNIT)], HOUR
    )
    assert await storage.dirty_backlog(B[1] - 1, HOUR) == DirtyBacklog(0, None)
    assert await storage.dirty_backlog(B[1], HOUR) == DirtyBacklog(1, B[0])
    assert await storage.dirty_backlog(B[2], HOUR) == DirtyBacklog(3, B[0])  # B[2] still open
    assert await storage.dirty_backlog(NOW, HOUR) == DirtyBacklog(4, B[0])
    await storage.rollup_step(B[1], HOUR, 100, plan)
    assert await storage.dirty_backlog(NOW, HOUR) == DirtyBacklog(3, B[1])
    await roll(storage)
    assert await storage.dirty_backlog(NOW, HOUR) == DirtyBacklog(0, None)


async def test_ledger_counts_rows_per_state_and_reason(storage: Storage) -> None:
    assert await storage.ledger_counts() == []
    await pro(storage, "a")
    await pro(storage, "b", customer=False)
    await storage.insert_events(
        [event(f"{o}{i}", o, B[i], UNIT) for o in ("a", "b", "free") for i in range(4)], HOUR
    )
    await roll(storage)
    a0, a1, a2, _ = await storage.ledger(org_id="a")
    b0, b1, b2, _ = await storage.ledger(org_id="b")
    await storage.sendable(0, 100, claim=claim("s"))
    await storage.settle(
        [
            settlement(a0, RowState.SENT, customer="cus_a"),
            settlement(a1, RowState.SENT, customer="cus_a"),
            settlement(a2, RowState.HELD, Reason.PROVIDER_REJECTED),
            settlement(b0, RowState.EXCLUDED, Reason.BEFORE_BILL_FROM),
            settlement(b1, RowState.HELD, Reason.NO_CUSTOMER),
            settlement(b2, RowState.HELD, Reason.NO_CUSTOMER),
        ],
        NOW,
        "s",
    )
    counts = await storage.ledger_counts()
    assert all(type(c.rows) is int for c in counts)
    assert sorted(counts, key=lambda c: (c.state, c.reason or "")) == [
        LedgerCount("excluded", "before_bill_from", 1),
        LedgerCount("excluded", "free_plan", 4),
        LedgerCount("held", "no_customer", 2),
        LedgerCount("held", "provider_rejected", 1),
        LedgerCount("pending", None, 2),
        LedgerCount("sent", None, 2),
    ]


async def test_concurrent_ingest_and_rollup_lose_no_event(store: Store, storage: Storage) -> None:
    """Two ingesting replicas write into a bucket that is already closed while a third rolls
    it up again and again: after a last rollup, the ledger holds exactly the usage."""
    await pro(storage, "a", "b")
    ingest_a, ingest_b, roller = [await store.open() for _ in range(3)]
    finished = asyncio.Event()
    expected: dict[tuple[str, str, int], int] = {}

    async def ingest(handle: Storage, tag: str) -> None:
        for i in range(25):
            batch = [
                event(f"{tag}-{i}-{j}", "ab"[j % 2], B[0] + (i * 7 + j) % HOUR, 333_333 + j)
                for j in range(5)
            ]
            for e in batch:
                key = (e.org_id, "gbs", B[0])
                expected[key] = expected.get(key, 0) + e.values[0][1]
            await handle.insert_events(batch, HOUR)
            await asyncio.sleep(0.002)  # let the roller in between batches

    async def rollup_loop() -> int:
        steps = 0
        while not finished.is_set():
            await roller.rollup_step(B[1], HOUR, 100, plan)
            steps += 1
            await asyncio.sleep(0)
        return steps

    rolling = asyncio.create_task(rollup_loop())
    await asyncio.gather(ingest(ingest_a, "x"), ingest(ingest_b, "y"))
    finished.set()
    assert await rolling > 0
    await roll(storage, B[1])

    usage = as_map(await storage.usage(None, None, B[0], B[1]))
    assert usage == expected
    rows = await storage.ledger(start=B[0], end=B[1], limit=10_000)
    for (org, meter, bucket), total in usage.items():
        mine = [r for r in rows if (r.org_id, r.meter, r.bucket_start) == (org, meter, bucket)]
        assert sum(r.value_micros for r in mine) == total
        assert sorted(r.revision for r in mine) == list(range(1, len(mine) + 1))
    assert_chains_floor(rows)


async def test_unplanned_orgs_and_a_rollup_that_takes_only_answered_ones(
    storage: Storage,
) -> None:
    await pro(storage, "a", since=B[1])  # no stored plan covers a's first bucket
    await pro(storage, "b")
    events = [event(f"{o}{i}", o, B[i] + 1, UNIT) for o in "abc" for i in range(2)]
    await storage.insert_events(events, HOUR)
    assert await storage.unplanned_orgs(B[1], HOUR) == ["a", "c"]  # closed: B[0] only
    assert await storage.unplanned_orgs(B[2], HOUR) == ["a", "c"]
    # Only "c" was answered for: a's first bucket waits, a's second (planned) does not.
    done, rows = await storage.rollup_step(B[2], HOUR, 100, plan, unplanned_allowed=["c"])
    assert done == 5
    assert sorted((r.org_id, r.bucket_start) for r in rows) == [
        ("a", B[1]),
        ("b", B[0]),
        ("b", B[1]),
        ("c", B[0]),
        ("c", B[1]),
    ]
    assert await storage.unplanned_orgs(B[2], HOUR) == ["a"]  # still dirty
    await roll(storage, B[2])
    assert await storage.unplanned_orgs(B[2], HOUR) == []
