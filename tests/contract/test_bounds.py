"""Every running total stays inside storage integers (issue: one client's values stopping the
rollup): ingest refuses a batch that would take a bucket total past the bound, carries keep
only the fraction below a unit, window sums are exact past 2^63 - 1, and a bucket the rollup
cannot fold is held without stopping the others."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.errors import InvalidInput
from controlplane.interfaces import HeldBucket, RollupBatch, RollupPlan, Storage
from controlplane.units import MAX_MICROS
from tests.contract.helpers import (
    HOUR,
    NOW,
    UNIT,
    B,
    as_map,
    assert_chains_floor,
    event,
    plan,
    pro,
    roll,
)


async def test_a_batch_taking_a_bucket_total_past_the_bound_is_refused_whole(
    storage: Storage,
) -> None:
    await storage.insert_events([event("e1", "a", B[0], MAX_MICROS - UNIT)], HOUR)
    before = await storage.usage(None, None, None, None)
    batch = [event("e2", "a", B[1], UNIT), event("e3", "a", B[0] + 5, 2 * UNIT)]
    with pytest.raises(InvalidInput) as info:
        await storage.insert_events(batch, HOUR)
    (problem,) = info.value.problems
    assert "'e3'" in problem.message and "1000000000000" in problem.message
    assert await storage.usage(None, None, None, None) == before  # e2 was not stored either
    # up to the bound exactly is accepted
    assert (await storage.insert_events([event("e4", "a", B[0], UNIT)], HOUR)).accepted == 1
    assert as_map(await storage.usage("a", "gbs", B[0], B[1])) == {("a", "gbs", B[0]): MAX_MICROS}


@pytest.mark.parametrize("sign", [1, -1])
async def test_a_batch_past_the_bound_on_its_own_is_refused(storage: Storage, sign: int) -> None:
    half = sign * (MAX_MICROS // 2 + 1)
    batch = [event(f"e{i}", "a", B[0] + i, half) for i in range(3)]
    with pytest.raises(InvalidInput, match="'e1'"):
        await storage.insert_events(batch, HOUR)
    assert await storage.usage(None, None, None, None) == []


async def test_the_bound_is_checked_from_the_stored_total_event_by_event(
    storage: Storage,
) -> None:
    """A batch that on its own passes the bound is accepted when the stored total keeps every
    step inside; one whose total passes the bound on the way and comes back is refused."""
    await storage.insert_events([event("e1", "a", B[0], 1)], HOUR)
    back = [event("e2", "a", B[0], -2549), event("e3", "a", B[0] + 1, 2548 - MAX_MICROS)]
    assert (await storage.insert_events(back, HOUR)).accepted == 2
    assert as_map(await storage.usage("a", "gbs", B[0], B[1])) == {("a", "gbs", B[0]): -MAX_MICROS}
    there_and_back = [event("e4", "a", B[0], -1), event("e5", "a", B[0] + 1, 1)]
    with pytest.raises(InvalidInput, match="'e4'"):
        await storage.insert_events(there_and_back, HOUR)
    assert as_map(await storage.usage("a", "gbs", B[0], B[1])) == {("a", "gbs", B[0]): -MAX_MICROS}


async def test_rollup_carries_stay_small_over_a_history_past_storage_integers(
    storage: Storage,
) -> None:
    """Twelve buckets near the bound total about 1.2e19 micro-units: past 2^63 - 1 for a
    lifetime carry, which stopped the rollup for good."""
    await pro(storage, "a")
    value = MAX_MICROS - UNIT // 2  # a half unit carried from each bucket to the next
    await storage.insert_events([event(f"e{i}", "a", B[i], value) for i in range(12)], HOUR)
    rows = await roll(storage)
    assert len(rows) == 12
    assert sum(r.quantity for r in rows) == 12 * value // UNIT
    assert_chains_floor(await storage.ledger())
    # the parity window sum is exact past 2^63 - 1 as well
    assert await storage.usage_by_org("gbs", B[0], B[12]) == {"a": 12 * value}


def holding(org: str, bucket: int) -> object:
    def planner(batch: RollupBatch) -> RollupPlan:
        real = plan(batch)
        return RollupPlan(
            rows=[r for r in real.rows if (r.org_id, r.bucket_start) != (org, bucket)],
            carries=real.carries,
            held=[HeldBucket(org, bucket, "cannot fold")],
        )

    return planner


async def test_a_held_bucket_keeps_its_mark_out_of_the_way_until_an_event_releases_it(
    storage: Storage,
) -> None:
    await pro(storage, "a", "b")
    await storage.insert_events([event("a1", "a", B[0], UNIT), event("b1", "b", B[0], UNIT)], HOUR)
    done, rows = await storage.rollup_step(NOW, HOUR, 100, holding("a", B[0]))  # type: ignore[arg-type]
    assert done == 2 and [r.org_id for r in rows] == ["b"]
    backlog = await storage.dirty_backlog(NOW, HOUR)
    assert (backlog.buckets, backlog.held) == (0, 1)
    assert await storage.rollup_step(NOW, HOUR, 100, plan) == (0, [])  # passed by
    assert await storage.unplanned_orgs(NOW, HOUR) == []

    await storage.insert_events([event("a2", "a", B[0] + 9, UNIT)], HOUR)  # released
    assert (await storage.dirty_backlog(NOW, HOUR)).held == 0
    (row,) = await roll(storage)
    assert (row.org_id, row.bucket_start, row.value_micros) == ("a", B[0], 2 * UNIT)


VALUES = st.one_of(
    st.integers(-MAX_MICROS, MAX_MICROS),
    st.sampled_from([MAX_MICROS, -MAX_MICROS, MAX_MICROS // 2 + 1, UNIT // 2, 1, 0]),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    batches=st.lists(
        st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), VALUES), min_size=1, max_size=5),
        min_size=1,
        max_size=8,
    )
)
async def test_random_large_values_never_stop_the_rollup_nor_go_missing(
    storage: Storage, batches: list[list[tuple[int, int, int]]]
) -> None:
    """Random values up to the bound, either way, in batches: each batch is stored whole or
    refused whole (then nothing of it is stored), no total passes the bound, every rollup
    pass completes, and the ledger holds exactly what is stored."""
    run = uuid.uuid4().hex[:8]  # one store serves every example: orgs of their own
    orgs = [f"{run}-{i}" for i in range(3)]
    await pro(storage, *orgs)
    expected: dict[tuple[str, str, int], int] = {}
    for n, batch in enumerate(batches):
        events = [
            event(f"{run}-{n}-{i}", orgs[o], B[b] + i, v) for i, (o, b, v) in enumerate(batch)
        ]
        after = dict(expected)
        past = False  # does a running total pass the bound, event by event?
        for o, b, v in batch:
            key = (orgs[o], "gbs", B[b])
            after[key] = after.get(key, 0) + v
            past = past or abs(after[key]) > MAX_MICROS
        try:
            await storage.insert_events(events, HOUR)
        except InvalidInput:
            assert past, "refused a batch inside the bound"  # refused whole: `expected` stays
        else:
            assert not past, "stored a batch past the bound"
            expected = after
        stored = {k: v for k, v in as_map(await storage.usage(None, None, None, None)).items()}
        assert {k: v for k, v in stored.items() if k[0] in orgs} == {
            k: v for k, v in expected.items() if k in stored or v
        }
        assert all(abs(v) <= MAX_MICROS for v in stored.values())
        await roll(storage)
        ledger = [r for r in await storage.ledger(limit=100_000) if r.org_id in orgs]
        folded: dict[tuple[str, str, int], int] = {}
        for r in ledger:
            key = (r.org_id, r.meter, r.bucket_start)
            folded[key] = folded.get(key, 0) + r.value_micros
        assert {k: v for k, v in folded.items() if v} == {k: v for k, v in expected.items() if v}
        assert_chains_floor(ledger)
