"""Ingest and usage: batches stored once, deduplicated by (source, event_id), summed exactly."""

from __future__ import annotations

from controlplane.interfaces import IngestResult, Storage
from tests.contract.helpers import HOUR, B, as_map, event


async def test_a_batch_is_stored_and_counted(storage: Storage) -> None:
    result = await storage.insert_events(
        [
            event("e1", "a", B[0] + 10, 1_500_000),
            event("e2", "a", B[0] + HOUR - 1, 250_000),  # last second of the bucket
            event("e3", "a", B[1], 7),  # first second of the next one
            event("e4", "b", B[1] + 5, 4_000_000, "calls"),
        ],
        HOUR,
    )
    assert result == IngestResult(accepted=4, duplicates=0)
    assert as_map(await storage.usage(None, None, None, None)) == {
        ("a", "gbs", B[0]): 1_750_000,
        ("a", "gbs", B[1]): 7,
        ("b", "calls", B[1]): 4_000_000,
    }


async def test_an_event_feeding_several_meters_counts_for_each(storage: Storage) -> None:
    multi = event("e1", "a", B[0], 3, "gbs", more=(("calls", 1_000_000),))
    assert await storage.insert_events([multi], HOUR) == IngestResult(1, 0)
    assert as_map(await storage.usage("a", None, None, None)) == {
        ("a", "gbs", B[0]): 3,
        ("a", "calls", B[0]): 1_000_000,
    }


async def test_a_replayed_batch_is_all_duplicates_and_stored_once(storage: Storage) -> None:
    batch = [event(f"e{i}", "a", B[0] + i, 1_000 + i) for i in range(5)]
    assert await storage.insert_events(batch, HOUR) == IngestResult(accepted=5, duplicates=0)
    before = await storage.usage(None, None, None, None)

    assert await storage.insert_events(batch, HOUR) == IngestResult(accepted=0, duplicates=5)
    assert await storage.usage(None, None, None, None) == before
    assert as_map(before) == {("a", "gbs", B[0]): 5 * 1_000 + 10}


async def test_duplicates_across_batches_keep_the_first_event(storage: Storage) -> None:
    await storage.insert_events([event("e1", "a", B[0], 10)], HOUR)
    # Same (source, id), different content: a duplicate, never an update.
    changed = event("e1", "a", B[1], 999_999)
    mixed = [changed, event("e2", "a", B[0], 20)]
    assert await storage.insert_events(mixed, HOUR) == IngestResult(accepted=1, duplicates=1)
    # Same id from another source: a different event.
    other_source = event("e1", "a", B[0], 300, source="other")
    assert await storage.insert_events([other_source], HOUR) == IngestResult(1, 0)
    assert as_map(await storage.usage(None, None, None, None)) == {("a", "gbs", B[0]): 330}


async def test_a_pair_repeated_inside_a_batch_is_stored_once(storage: Storage) -> None:
    """events.ingest removes in-batch repeats before storage sees them; a plugin given one
    anyway skips it and counts it as a duplicate, never counting the usage twice."""
    batch = [event("e1", "a", B[0], 10), event("e2", "a", B[0], 20), event("e1", "a", B[0], 10)]
    assert await storage.insert_events(batch, HOUR) == IngestResult(accepted=2, duplicates=1)
    assert as_map(await storage.usage(None, None, None, None)) == {("a", "gbs", B[0]): 30}


async def test_usage_sums_big_values_exactly(storage: Storage) -> None:
    big = [10**15 + 1, 10**15 + 2, 3 * 10**15 + 3, 1]
    events = [event(f"e{i}", "a", B[0] + i, v) for i, v in enumerate(big)]
    events += [event(f"n{i}", "b", B[0] + i, 9 * 10**15) for i in range(100)]
    assert await storage.insert_events(events, HOUR) == IngestResult(104, 0)
    totals = as_map(await storage.usage(None, "gbs", None, None))
    assert totals == {("a", "gbs", B[0]): 5 * 10**15 + 7, ("b", "gbs", B[0]): 9 * 10**17}


async def test_usage_filters_by_org_meter_and_bucket_window(storage: Storage) -> None:
    events = []
    for i in range(4):
        for org in ("a", "b"):
            events.append(event(f"{org}{i}g", org, B[i] + 60, (i + 1) * 100))
            events.append(event(f"{org}{i}c", org, B[i] + 60, (i + 1) * 7, "calls"))
    await storage.insert_events(events, HOUR)
    everything = as_map(await storage.usage(None, None, None, None))
    assert len(everything) == 16

    def expect(org: str | None, meter: str | None, start: int | None, end: int | None) -> dict:
        return {
            k: v
            for k, v in everything.items()
            if (org is None or k[0] == org)
            and (meter is None or k[1] == meter)
            and (start is None or k[2] >= start)
            and (end is None or k[2] < end)
        }

    for query in [
        ("a", None, None, None),
        (None, "calls", None, None),
        ("b", "gbs", None, None),
        (None, None, B[1], None),
        (None, None, None, B[2]),
        ("a", "gbs", B[1], B[3]),  # [start, end): B[3] is out
        (None, None, B[1] + 1, B[3] + 1),  # buckets *starting* in the window
        ("nobody", None, None, None),
        (None, None, B[10], B[20]),
    ]:
        assert as_map(await storage.usage(*query)) == expect(*query), query


async def test_events_without_a_capability_token_are_counted_by_type_and_time(
    storage: Storage,
) -> None:
    import msgspec

    plain = event("e1", "a", B[0] + 1, 1)
    tokened = msgspec.structs.replace(
        event("e2", "a", B[0] + 2, 1), plan="pro", plan_issued_at=B[0]
    )
    other = msgspec.structs.replace(event("e3", "a", B[0] + 3, 1), type="other")
    late = event("e4", "a", B[1] + 1, 1)
    assert (await storage.insert_events([plain, tokened, other, late], HOUR)).accepted == 4
    gbs = plain.type
    assert await storage.untokened_events([gbs], B[0] * 1000) == 2  # e1, e4
    assert await storage.untokened_events([gbs], B[1] * 1000) == 1  # e4 only
    assert await storage.untokened_events([gbs, "other"], 0) == 3
    assert await storage.untokened_events([], 0) == 0
