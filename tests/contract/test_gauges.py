"""Gauge meters' series on every storage plugin: points stored with their events, derivation
steps, late points, the state across a restart."""

from __future__ import annotations

import asyncio
from typing import Any

from controlplane import gauges
from controlplane.interfaces import GaugeBatch, GaugePlan, GaugePoint, Storage, StoredEvent
from controlplane.meters import Meter, MeterConfig
from tests.contract.conftest import Store
from tests.contract.helpers import HOUR, UNIT, B, as_map, pro, roll
from tests.gauge_helpers import METER, STORAGE_METER

METERS = {METER: Meter(MeterConfig(**STORAGE_METER))}
PRIVATE = '{"visibility":"private"}'
PICO = 10**12


def point(
    ident: str, org: str, at: int, mode: str, units: int | None, series: str = "r1"
) -> StoredEvent:
    """An event whose one gauge point sets (`level`) or changes (`delta`) a series."""
    value = None if units is None else str(units * PICO)
    return StoredEvent(
        source="test",
        event_id=ident,
        type="repo.snapshot",
        org_id=org,
        time_ms=at * 1000,
        data=b"{}",
        values=(),
        points=(GaugePoint(METER, series, mode, value, PRIVATE),),
    )


async def derive(storage: Storage, until: int, org: str | None = None, batch: int = 1000) -> int:
    stats = await gauges.run(
        storage, METERS, bucket_seconds=HOUR, closed_before=until, org_id=org, batch_series=batch
    )
    return stats.series


async def test_levels_hold_across_buckets_and_survive_a_restart(store: Store) -> None:
    storage = await store.open(migrate=True)
    await pro(storage, "a")
    await storage.insert_events(
        [point("s1", "a", B[0] + 1800, "level", 2), point("p1", "a", B[1], "delta", 1)], HOUR
    )
    assert await derive(storage, B[3]) == 1
    usage = as_map(await storage.usage("a", METER, None, None))
    assert usage == {
        ("a", METER, B[0]): UNIT,
        ("a", METER, B[1]): 3 * UNIT,
        ("a", METER, B[2]): 3 * UNIT,
    }
    (state,) = await storage.gauge_series(METER)
    assert (state.derived_to, state.level, state.active) == (B[3], str(3 * PICO), True)
    # the derivation marked the buckets dirty: the rollup folds them into the ledger
    rows = await roll(storage, B[3])
    assert sorted((r.bucket_start, r.value_micros) for r in rows) == [
        (B[0], UNIT),
        (B[1], 3 * UNIT),
        (B[2], 3 * UNIT),
    ]
    await store.close()

    storage = await store.open()  # a restart: the state is stored, not held in memory
    assert await derive(storage, B[5]) == 1
    assert as_map(await storage.usage("a", METER, B[3], None)) == {
        ("a", METER, B[3]): 3 * UNIT,
        ("a", METER, B[4]): 3 * UNIT,
    }
    assert await derive(storage, B[5]) == 0  # nothing due until the watermark moves


async def test_a_late_point_rederives_from_its_bucket_on(storage: Storage) -> None:
    await storage.insert_events([point("s1", "a", B[0], "level", 1)], HOUR)
    await derive(storage, B[4])
    await roll(storage, B[4])
    await storage.insert_events([point("late", "a", B[1] + 900, "delta", 4)], HOUR)
    before = as_map(await storage.usage("a", METER, None, None))
    assert before[("a", METER, B[2])] == UNIT  # gauge usage moves at derivation, not ingest
    assert await derive(storage, B[4]) == 1
    usage = as_map(await storage.usage("a", METER, None, None))
    assert usage == {
        ("a", METER, B[0]): UNIT,
        ("a", METER, B[1]): UNIT // 4 + 5 * UNIT * 3 // 4,
        ("a", METER, B[2]): 5 * UNIT,
        ("a", METER, B[3]): 5 * UNIT,
    }
    rows = await roll(storage, B[4])
    assert sorted((r.bucket_start, r.revision, r.value_micros) for r in rows) == [
        (B[1], 2, 4 * UNIT * 3 // 4),
        (B[2], 2, 4 * UNIT),
        (B[3], 2, 4 * UNIT),
    ]


async def test_duplicates_store_no_second_point(storage: Storage) -> None:
    batch = [point("s1", "a", B[0], "delta", 2)]
    await storage.insert_events(batch, HOUR)
    result = await storage.insert_events(batch, HOUR)
    assert result.duplicates == 1
    await derive(storage, B[1])
    assert as_map(await storage.usage("a", METER, None, None)) == {("a", METER, B[0]): 2 * UNIT}


async def test_steps_page_through_series_and_filter_by_org(storage: Storage) -> None:
    await storage.insert_events(
        [
            point(f"e{i}", org, B[0], "level", 1, series=f"r{i}")
            for i, org in enumerate(["a", "a", "b", "c", "c"])
        ],
        HOUR,
    )
    assert await derive(storage, B[1], org="c") == 2
    assert await derive(storage, B[1], batch=2) == 3  # a's two and b's, two per step
    totals = as_map(await storage.usage(None, METER, None, None))
    assert totals == {
        ("a", METER, B[0]): 2 * UNIT,
        ("b", METER, B[0]): UNIT,
        ("c", METER, B[0]): 2 * UNIT,
    }
    assert await derive(storage, B[2], batch=1) == 5  # every active series, one per step


async def test_a_point_stored_while_a_derivation_runs_is_derived_next(store: Store) -> None:
    """Ingest racing a derivation of the same series (another handle, as another replica):
    the point is neither lost nor counted twice, whichever commits first."""
    storage = await store.open(migrate=True)
    other = await store.open()
    await storage.insert_events([point("s1", "a", B[0], "level", 1)], HOUR)
    racing: list[asyncio.Task[Any]] = []

    def planner(batch: GaugeBatch) -> GaugePlan:
        late = [point("late", "a", B[1], "delta", 2), point("next", "a", B[3] + 1800, "delta", 1)]
        racing.append(asyncio.get_running_loop().create_task(other.insert_events(late, HOUR)))
        return gauges.derive(batch, METERS, HOUR)

    await storage.gauge_step(B[3], 100, planner)
    await racing[0]
    await derive(storage, B[5])
    assert as_map(await storage.usage("a", METER, None, None)) == {
        ("a", METER, B[0]): UNIT,
        ("a", METER, B[1]): 3 * UNIT,
        ("a", METER, B[2]): 3 * UNIT,
        ("a", METER, B[3]): 3 * UNIT + UNIT // 2,
        ("a", METER, B[4]): 4 * UNIT,
    }
