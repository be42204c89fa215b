"""Gauge (time_weighted) meters: config, readings at ingest, and the timeline maths
(`controlplane/gauges.py`), through the real ingest, derivation and rollup on SQLite."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from controlplane import gauges
from controlplane.errors import ConfigError, InvalidInput
from controlplane.interfaces import GaugeSeries, SeriesPoint
from controlplane.meters import ExpressionError, Meter, MeterConfig, MeterSet
from controlplane.units import MICROS, div_half_even
from tests.gauge_helpers import GB, HOUR, METER, STORAGE_METER, at, ev, plane


async def ledger_by_bucket(cp: object) -> dict[int, int]:
    """Σ ledger values (micro GB-hours) per bucket start."""
    out: dict[int, int] = defaultdict(int)
    for row in await cp.ledger(limit=100_000):  # type: ignore[attr-defined]
        out[row.bucket_start] += row.value_micros
    return {b: v for b, v in out.items() if v}


async def test_dolthub_timeline_bills_private_gb_hours_hour_by_hour(tmp_path: Path) -> None:
    """DoltHub's write-up: snapshots at 07:00 on June 1 (2 GB, public) and June 2 (4 GB,
    private); puts of 2 GB at 05:00 and 12:00 on June 1; private from 14:00 on June 1."""
    clock = [at("2026-06-02T12:00")]
    async with plane(tmp_path, clock) as cp:
        await cp.ingest(
            [
                ev("s1", "snapshot", at("2026-06-01T07:00"), bytes=2 * GB, visibility="public"),
                ev("p1", "put", at("2026-06-01T05:00"), bytes=2 * GB),
                ev("p2", "put", at("2026-06-01T12:00"), bytes=2 * GB),
                ev("v1", "visibility", at("2026-06-01T14:00"), visibility="private"),
                ev("s2", "snapshot", at("2026-06-02T07:00"), bytes=4 * GB, visibility="private"),
            ],
            "test",
        )
        stats = await cp.rollup()
        got = await ledger_by_bucket(cp)
    # By hand: 05:00 the put makes 2 GB, of unknown visibility (not billed); 07:00 the
    # snapshot agrees (2 GB, public); 12:00 the put makes 4 GB, still public; from 14:00 the
    # repository is private: 4 GB each hour, through June 2 (the 07:00 snapshot agrees).
    expected = {at("2026-06-01T00:00") + h * HOUR: 4 * MICROS for h in range(14, 24)}
    expected |= {at("2026-06-02T00:00") + h * HOUR: 4 * MICROS for h in range(12)}
    assert got == expected
    assert stats.gauge_resets == 0
    assert stats.gauge_series == 1


async def test_partial_hours_and_a_disagreeing_snapshot(tmp_path: Path) -> None:
    """Levels change inside hours: each hour gets level x the part of it the level held;
    a snapshot that disagrees with the deltas resets the level and is counted."""
    clock = [at("2026-06-01T04:00")]
    async with plane(tmp_path, clock) as cp:
        await cp.ingest(
            [
                ev("s1", "snapshot", at("2026-06-01T00:30"), bytes=2 * GB, visibility="private"),
                ev("p1", "put", at("2026-06-01T01:15"), bytes=1 * GB),  # 3 GB
                ev("s2", "snapshot", at("2026-06-01T02:45"), bytes=5 * GB),  # disagrees: 5
                ev("x", "deleted", at("2026-06-01T03:20"), deleted=1),  # ends the series
            ],
            "test",
        )
        stats = await cp.rollup()
        got = await ledger_by_bucket(cp)
        assert cp.metrics.gauge_resets._value.get() == 1
    h = at("2026-06-01T00:00")
    assert got == {
        h: 1 * MICROS,  # 2 GB x 30 min
        h + HOUR: 2 * MICROS // 4 + 3 * MICROS * 3 // 4,  # 2 GB x 15 min + 3 GB x 45 min
        h + 2 * HOUR: 3 * MICROS * 3 // 4 + 5 * MICROS // 4,  # 3 GB x 45 + 5 GB x 15
        h + 3 * HOUR: 1_666_667,  # 5 GB x 20 min (5/3, rounded once), then ended
    }
    assert stats.gauge_resets == 1


async def test_a_level_holds_across_empty_buckets_and_late_events_correct(tmp_path: Path) -> None:
    clock = [at("2026-06-01T03:00")]
    async with plane(tmp_path, clock) as cp:
        await cp.ingest(
            [ev("s1", "snapshot", at("2026-06-01T00:00"), bytes=GB, visibility="private")],
            "test",
        )
        await cp.rollup()
        h = at("2026-06-01T00:00")
        assert await ledger_by_bucket(cp) == {h + i * HOUR: MICROS for i in range(3)}
        clock[0] = at("2026-06-01T05:00")  # no events: the level goes on
        await cp.rollup()
        assert await ledger_by_bucket(cp) == {h + i * HOUR: MICROS for i in range(5)}
        # a late put at 01:30 changes every bucket from it to the next known point (none)
        await cp.ingest([ev("p1", "put", at("2026-06-01T01:30"), bytes=2 * GB)], "test")
        await cp.rollup()
        rows = await cp.ledger(limit=100)
        assert await ledger_by_bucket(cp) == {
            h: MICROS,
            h + HOUR: 2 * MICROS,  # 1 GB x 30 min + 3 GB x 30 min
            h + 2 * HOUR: 3 * MICROS,
            h + 3 * HOUR: 3 * MICROS,
            h + 4 * HOUR: 3 * MICROS,
        }
        corrections = [r for r in rows if r.revision == 2]
        assert sorted(r.bucket_start for r in corrections) == [h + i * HOUR for i in (1, 2, 3, 4)]
        assert await cp.rollup() and await ledger_by_bucket(cp)  # a rerun changes nothing
        assert len(await cp.ledger(limit=100)) == len(rows)


async def test_usage_api_shows_derived_gauge_buckets(tmp_path: Path) -> None:
    clock = [at("2026-06-01T02:00")]
    async with plane(tmp_path, clock) as cp:
        await cp.ingest(
            [ev("s1", "snapshot", at("2026-06-01T00:00"), bytes=3 * GB, visibility="private")],
            "test",
        )
        await cp.rollup()
        usage = await cp.usage(meter=METER)
    assert [(u.bucket_start, u.value_micros) for u in usage] == [
        (at("2026-06-01T00:00"), 3 * MICROS),
        (at("2026-06-01T01:00"), 3 * MICROS),
    ]


async def test_bad_gauge_events_are_refused_naming_the_field(tmp_path: Path) -> None:
    clock = [at("2026-06-01T02:00")]
    async with plane(tmp_path, clock) as cp:
        with pytest.raises(InvalidInput) as info:
            await cp.ingest(
                [
                    ev("ok", "snapshot", at("2026-06-01T00:00"), bytes=GB, visibility="private"),
                    {**ev("a", "put", at("2026-06-01T00:10")), "data": {"bytes": 5}},
                    ev("b", "put", at("2026-06-01T00:20"), bytes="many"),
                ],
                "test",
            )
        fields = {(p.index, p.field) for p in info.value.problems}
        assert fields == {(1, "data.repo"), (2, "data.bytes")}
        await cp.rollup()
        assert await cp.usage(meter=METER) == []  # nothing of the batch was stored


def test_config_errors_name_the_meter_and_setting() -> None:
    base = {k: v for k, v in STORAGE_METER.items() if k != "series"}
    with pytest.raises(ConfigError, match=r"meters\[0\] \(private_gb_hours\): `series`"):
        MeterSet([MeterConfig(**base)])
    with pytest.raises(ConfigError, match="only for aggregation 'time_weighted'"):
        MeterSet([MeterConfig(name="m", event_type="t", value="1", series="data.x")])
    with pytest.raises(ConfigError, match="time_unit_seconds"):
        MeterSet([MeterConfig(**{**STORAGE_METER, "time_unit_seconds": 0})])
    with pytest.raises(ConfigError, match="'state' is for event_modes"):
        MeterSet([MeterConfig(**{**STORAGE_METER, "mode": "state"})])
    with pytest.raises(ConfigError, match=r"'repo\.snapshot' is `event_type` already"):
        MeterSet([MeterConfig(**{**STORAGE_METER, "event_modes": {"repo.snapshot": "delta"}})])
    assert MeterConfig(**STORAGE_METER).provider_formula == "sum"


# the timeline maths, pure -----------------------------------------------------------------

METERS = {METER: Meter(MeterConfig(**STORAGE_METER))}


def pt(minute: int, mode: str, value: int | None, fields: str = "{}", seq: int = 1) -> SeriesPoint:
    return SeriesPoint(minute * 60_000, f"t\x1f{minute}", seq, mode, value and str(value), fields)


def test_a_delta_stream_equals_the_snapshot_stream_of_the_same_levels() -> None:
    private = '{"visibility":"private"}'
    levels = [3, 7, 2, 2, 9]
    snapshots = [pt(i * 37, "level", lv * 10**12, private) for i, lv in enumerate(levels)]
    deltas = [pt(0, "delta", levels[0] * 10**12, private)] + [
        pt(i * 37, "delta", (levels[i] - levels[i - 1]) * 10**12) for i in range(1, len(levels))
    ]

    def derive(points: list[SeriesPoint]) -> dict[int, int]:
        series = GaugeSeries(METER, "o", "r", 0, 0, "0", "{}", False, points)
        diff, update, _ = gauges.derive_series(series, METERS[METER], 4 * HOUR, HOUR)
        assert update.level == str(9 * 10**12) and update.active
        return diff

    assert derive(snapshots) == derive(deltas)


def test_rounding_is_half_even_once_per_bucket() -> None:
    assert div_half_even(5, 2) == 2 and div_half_even(7, 2) == 4 and div_half_even(-5, 2) == -2
    # 1 pico-unit held for one hour is 10^-12 unit-hours: 0 micro-units, not lost elsewhere
    acc = gauges.to_micros({0: 3_600_000}, HOUR)
    assert acc == {0: 0}


def test_a_level_is_bounded_so_one_bucket_of_it_stays_a_storage_integer() -> None:
    meters = MeterSet([MeterConfig(**{**STORAGE_METER, "time_unit_seconds": 1})], HOUR)
    data = {"repo": "r", "bytes": 10**9 * 10**9, "visibility": "private"}  # 10^9 GB
    with pytest.raises(ExpressionError, match=r"out of range: a level of at most 277777777\.7"):
        meters.read("repo.snapshot", data)
    (ok,) = meters.read("repo.snapshot", {**data, "bytes": 10**9 * 10**8})
    assert ok.value == 10**8
