"""Gauge meters' promises under random timelines (hypothesis), through the real ingest,
derivation, rollup and sender on SQLite, checked against an independent model: the level
walked through time in exact fractions, rounded half-even once per bucket.

- any arrival order of the same events, with rollups between the batches, gives the same
  usage per bucket, and the ledger holds exactly it;
- a stream of deltas bills what the stream of snapshots of the same levels bills;
- one event at the start of a month bills every hour of the month;
- a late event after sending becomes correction rows, and Σ sent = floor(Σ exact).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import defaultdict
from fractions import Fraction
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.core import ControlPlane
from controlplane.flags import FlagChange
from controlplane.ledger import RowState
from controlplane.units import MICROS
from tests.gauge_helpers import GB, HOUR, METER, at, ev, plane

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SPAN = 6 * HOUR

Event = tuple[str, int, int | None, str | None]  # kind, ms into the span, bytes, visibility
# any millisecond, or on a 20-minute grid, where events often share one
MS = st.one_of(
    st.integers(0, SPAN * 1000 - 1), st.integers(0, SPAN // 1200 - 1).map(lambda k: k * 1_200_000)
)

EVENT = st.one_of(
    st.tuples(
        st.just("snapshot"),
        MS,
        st.integers(0, 5 * GB),
        st.sampled_from(["private", "public"]),
    ),
    st.tuples(st.just("put"), MS, st.integers(-2 * GB, 3 * GB), st.none()),
    st.tuples(
        st.just("visibility"),
        MS,
        st.none(),
        st.sampled_from(["private", "public"]),
    ),
    st.tuples(st.just("deleted"), MS, st.none(), st.none()),
)


def as_events(start: int, events: list[Event]) -> list[dict[str, Any]]:
    out = []
    for i, (kind, ms, size, visibility) in enumerate(events):
        data: dict[str, Any] = {}
        if size is not None:
            data["bytes"] = size
        if visibility is not None:
            data["visibility"] = visibility
        if kind == "deleted":
            data["deleted"] = 1
        item = ev(f"e{i:03d}", kind, start, **data)
        item["ts"] = start * 1000 + ms
        out.append(item)
    return out


def model(start: int, events: list[Event], until: int) -> dict[int, int]:
    """Micro GB-hours per bucket, walked in exact fractions (independent of the code)."""
    timeline = sorted(
        ((e[1], f"e{i:03d}", e) for i, e in enumerate(events)), key=lambda t: (t[0], t[1])
    )
    level, visibility = Fraction(0), None
    acc: defaultdict[int, Fraction] = defaultdict(Fraction)
    now = start * 1000

    def hold(upto: int) -> None:
        nonlocal now
        billed = max(level, 0) if visibility == "private" else 0
        while now < upto:
            bucket_end = (now // (HOUR * 1000) + 1) * HOUR * 1000
            step = min(bucket_end, upto) - now
            if billed:
                acc[now // 1000 // HOUR * HOUR] += billed * step
            now += step

    for ms, _ident, (kind, _, size, vis) in timeline:
        hold(start * 1000 + ms)
        if kind == "snapshot":
            level = Fraction(size or 0, GB)
        elif kind == "put":
            level += Fraction(size or 0, GB)
        elif kind == "deleted":
            level, visibility = Fraction(0), None
        if vis is not None:
            visibility = vis
    hold(until * 1000)
    out = {b: round(v * MICROS / (HOUR * 1000)) for b, v in acc.items()}
    return {b: v for b, v in out.items() if v}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def ledger_totals(cp: ControlPlane) -> dict[int, int]:
    out: defaultdict[int, int] = defaultdict(int)
    for row in await cp.ledger(limit=100_000):
        out[row.bucket_start] += row.value_micros
    return {b: v for b, v in out.items() if v}


async def usage(cp: ControlPlane) -> dict[int, int]:
    return {u.bucket_start: u.value_micros for u in await cp.usage(meter=METER) if u.value_micros}


@SETTINGS
@given(
    events=st.lists(EVENT, min_size=1, max_size=12),
    order=st.randoms(use_true_random=False),
    cuts=st.lists(st.integers(0, SPAN), max_size=4),
)
def test_any_arrival_order_gives_the_same_usage(
    events: list[Event], order: Any, cuts: list[int]
) -> None:
    start = at("2026-06-01T00:00")
    end = start + SPAN + HOUR
    expected = model(start, events, end)
    items = as_events(start, events)
    order.shuffle(items)
    batches = [items[i::3] for i in range(3)]
    watermarks = sorted(start + c for c in cuts)[: len(batches)]
    with tempfile.TemporaryDirectory() as folder:
        clock = [end + HOUR]

        async def go() -> tuple[dict[int, int], dict[int, int]]:
            async with plane(Path(folder), clock) as cp:
                for i, batch in enumerate(batches):
                    if batch:
                        await cp.ingest(batch, "test")
                    if i < len(watermarks):  # rollups between batches: later ones are late
                        await cp.rollup(until=watermarks[i])
                await cp.rollup(until=end)
                assert (await cp.rollup(until=end)).rows == 0  # a rerun finds nothing
                return await usage(cp), await ledger_totals(cp)

        got_usage, got_ledger = run(go())
    assert got_usage == expected
    assert got_ledger == expected


@SETTINGS
@given(levels=st.lists(st.integers(0, 10 * GB), min_size=1, max_size=8), gap=st.integers(1, 5400))
def test_a_delta_stream_bills_what_the_snapshot_stream_bills(levels: list[int], gap: int) -> None:
    start = at("2026-06-01T00:00")
    end = start + len(levels) * gap + 2 * HOUR
    end -= end % HOUR
    snapshots: list[Event] = [
        ("snapshot", i * gap * 1000, lv, "private") for i, lv in enumerate(levels)
    ]
    deltas: list[Event] = [("visibility", 0, None, "private")] + [
        ("put", i * gap * 1000, lv - (levels[i - 1] if i else 0), None)
        for i, lv in enumerate(levels)
    ]
    results = []
    for events in (snapshots, deltas):
        with tempfile.TemporaryDirectory() as folder:

            async def go(events: list[Event] = events, folder: str = folder) -> dict[int, int]:
                async with plane(Path(folder), [end + HOUR]) as cp:
                    await cp.ingest(as_events(start, events), "test")
                    await cp.rollup(until=end)
                    return await ledger_totals(cp)

            results.append(run(go()))
    assert results[0] == results[1] == model(start, snapshots, end)


@settings(max_examples=6, deadline=None)
@given(
    gb=st.integers(1, 10**6),
    month=st.sampled_from(["2026-02-01", "2026-04-01", "2026-07-01"]),
)
def test_one_event_at_the_start_of_a_month_bills_every_hour_of_it(gb: int, month: str) -> None:
    start = at(f"{month}T00:00")
    year, mon = int(month[:4]), int(month[5:7])
    end = at(f"{year + mon // 12}-{mon % 12 + 1:02d}-01T00:00")
    with tempfile.TemporaryDirectory() as folder:
        clock = [end]

        async def go() -> dict[int, int]:
            async with plane(Path(folder), clock) as cp:
                await cp.ingest(
                    [ev("s", "snapshot", start, bytes=gb * GB, visibility="private")], "test"
                )
                await cp.rollup()
                return await ledger_totals(cp)

        got = run(go())
    hours = (end - start) // HOUR
    assert got == {start + h * HOUR: gb * MICROS for h in range(hours)}


@SETTINGS
@given(
    events=st.lists(EVENT, min_size=1, max_size=8),
    late=st.lists(EVENT, min_size=1, max_size=4),
)
def test_a_late_event_after_sending_corrects_and_keeps_the_floor(
    events: list[Event], late: list[Event]
) -> None:
    start = (int(time.time()) // HOUR - 10) * HOUR  # recent: the provider accepts it
    end = start + SPAN + HOUR
    every = events + late
    with tempfile.TemporaryDirectory() as folder:
        clock = [end + 60]

        async def go() -> tuple[list[Any], dict[int, int], list[Any]]:
            async with plane(Path(folder), clock) as cp:
                await cp.set_org(
                    "org-1", customer="cus_1", plan="pro", actor="t", effective_from=start
                )
                await cp.set_flags(
                    [
                        FlagChange("authority", "controlplane"),
                        FlagChange("bill_from", start),
                        FlagChange("shadow", False),
                    ],
                    actor="t",
                    reason="test",
                    force=True,
                )
                await cp.ingest(as_events(start, events), "test")
                await cp.rollup(until=end)
                await cp.send()
                first = await cp.ledger(limit=100_000)
                await cp.ingest(as_events(start, every)[len(events) :], "test")
                await cp.rollup(until=end)
                await cp.send()
                return first, await ledger_totals(cp), await cp.ledger(limit=100_000)

        first, totals, rows = run(go())
    assert totals == model(start, every, end)
    # corrections are appended: every row of the first pass is still there, unchanged
    now = {r.identifier: r for r in rows}
    assert all(now[r.identifier].value_micros == r.value_micros for r in first)
    assert not [r for r in rows if r.state in (RowState.PENDING, RowState.HELD)]
    billed = [r for r in rows if r.state is RowState.SENT]
    assert sum(r.quantity for r in billed) == sum(r.value_micros for r in billed) // MICROS
