"""Gauge (`time_weighted`) meters: a level held over time, integrated exactly per bucket.

Each series (an org's repository, volume, seat pool) has a timeline: its points, ordered by
time and then by `(source, event id)`, so any arrival order gives the same timeline. A
`level` point sets the level (a snapshot: authoritative, it resets whatever the deltas before
it added up to), a `delta` point changes it, a `state` point only updates the state fields,
and an `end` point sets it to zero and clears the state. A level below zero (deltas that add
up to less than nothing before a snapshot sets it right) bills nothing. State fields carry
over from the last point that set them; the meter's `where` is read on them, and while it
does not hold (or reads a field no point has set yet) the series bills nothing. A level holds
until the next point, across buckets without events.

Usage of a bucket is the integral of the billed level over it: level (integer pico-units)
times milliseconds, summed exactly, then rounded once, half-even, to micro-units per series
and bucket (as a `sum` meter rounds each event's value). Every bucket is integrated whole in
one derivation, so what the bucket totals hold for a series is always the rounding of its
timeline's integral over the points folded so far.

Derivation (:func:`derive`) is pure. A series whose new points all lie at or after the point
it was derived to continues from its stored state; one with a late point is replayed from
its first point twice, over the points folded before and over all of them, and the bucket
totals take the difference: corrections from the late point's bucket on, never a recount.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any

import msgspec
import structlog

from controlplane.interfaces import (
    GaugeBatch,
    GaugePlan,
    GaugeSeries,
    GaugeStore,
    SeriesPoint,
    SeriesUpdate,
    UsageTotal,
)
from controlplane.meters import Evaluator, ExpressionError, Meter

_fields = msgspec.json.Decoder(dict[str, Any], float_hook=Decimal)
_encode = msgspec.json.Encoder(decimal_format="number").encode

log = structlog.get_logger("gauge")

Acc = dict[int, int]  # bucket start (s) -> pico-unit milliseconds


class Timeline:
    """A series' state at one instant: its level, whether a level was set (a snapshot that
    disagrees with it resets it), whether deltas moved it since the last snapshot, its state
    fields, and the snapshot resets counted on the way."""

    __slots__ = ("deltas", "fields", "known", "level", "resets", "where")

    def __init__(self, where: Evaluator | None, level: int = 0, fields: str = "{}") -> None:
        self.where = where
        self.level = level
        self.known = level != 0
        self.deltas = False
        self.fields: dict[str, Any] = _fields.decode(fields)
        self.resets = 0


def billed(level: int, fields: Mapping[str, Any], where: Evaluator | None) -> int:
    """The level billed: none below zero (deltas before any snapshot that add up to less),
    none while `where` does not hold or reads a state field no point has set yet."""
    if level <= 0:
        return 0
    if where is None:
        return level
    try:
        return level if where(fields) else 0
    except ExpressionError:
        return 0


def integrate(
    timeline: Timeline,
    points: Iterable[SeriesPoint],
    start_ms: int,
    end_ms: int,
    bucket_seconds: int,
    counted: Callable[[SeriesPoint], bool] | None = None,
) -> Acc:
    """The billed level of `timeline`, from `start_ms`, through `points` (in timeline order,
    inside [start_ms, end_ms)), to `end_ms`: pico-unit milliseconds per bucket touched;
    `timeline` is left at `end_ms`. `counted(point)` says whether a snapshot's disagreement
    counts (default: all). One loop with local state: it runs once per point."""
    acc: Acc = {}
    get = acc.get
    bucket_ms = bucket_seconds * 1000
    where = timeline.where
    level, known, deltas, fields = timeline.level, timeline.known, timeline.deltas, timeline.fields
    resets = 0
    held = billed(level, fields, where)
    at = start_ms
    for point in [*points, None]:
        upto = end_ms if point is None else point.time_ms
        if upto > at:
            if held:  # the level held over [at, upto), spread over the buckets it covers
                bucket = at - at % bucket_ms
                while bucket < upto:
                    end = bucket + bucket_ms
                    key = bucket // 1000
                    acc[key] = get(key, 0) + held * (
                        (end if end < upto else upto) - (bucket if bucket > at else at)
                    )
                    bucket = end
            at = upto
        if point is None:
            break
        mode, value = point.mode, point.value
        if mode == "level" and value is not None:
            new = int(value)
            if deltas and known and new != level and (counted is None or counted(point)):
                resets += 1
            level, known, deltas = new, True, False
        elif mode == "delta" and value is not None:
            level += int(value)
            known = deltas = True
        elif mode == "end":
            level, known, deltas, fields, held = 0, False, False, {}, 0
            continue
        if point.fields != "{}":
            fields = {**fields, **_fields.decode(point.fields)}
        held = billed(level, fields, where)
    timeline.level, timeline.known, timeline.deltas, timeline.fields = level, known, deltas, fields
    timeline.resets += resets
    return acc


def to_micros(acc: Acc, time_unit_seconds: int) -> dict[int, int]:
    """Pico-unit milliseconds per bucket as micro-units of (level x time unit), rounded
    half-even once per bucket (:func:`controlplane.units.div_half_even`, inlined: it runs
    once per series and bucket)."""
    per = 10**9 * time_unit_seconds  # 10^12 picos x 10^3 ms / 10^6 micros x the time unit
    out: dict[int, int] = {}
    for bucket, v in acc.items():
        quotient, remainder = divmod(v, per)
        twice = 2 * remainder
        if twice > per or (twice == per and quotient % 2):
            quotient += 1
        out[bucket] = quotient
    return out


def derive_series(
    series: GaugeSeries, meter: Meter, until: int, bucket_seconds: int
) -> tuple[dict[int, int], SeriesUpdate, int]:
    """One series derived to `until`: micro-units to add per bucket (zeros included), its
    new state, and how many snapshots folded now reset a level the deltas before them
    disagreed with."""
    where = meter.state_filter
    unit = meter.config.time_unit_seconds
    target = max(until, series.derived_to)
    target_ms, derived_ms = target * 1000, series.derived_to * 1000
    points = series.points  # in timeline order (the store's contract)
    if points and points[-1].time_ms >= target_ms:
        points = [p for p in points if p.time_ms < target_ms]
    if series.late:

        def folded(p: SeriesPoint) -> bool:
            return p.seq <= series.folded_seq and p.time_ms < derived_ms

        first = points[0].time_ms if points else derived_ms
        old = to_micros(
            integrate(
                Timeline(where),
                [p for p in points if folded(p)],
                first,
                derived_ms,
                bucket_seconds,
                lambda p: False,
            ),
            unit,
        )
        timeline = Timeline(where)
        new = to_micros(
            integrate(timeline, points, first, target_ms, bucket_seconds, lambda p: not folded(p)),
            unit,
        )
        diff = {b: new.get(b, 0) - old.get(b, 0) for b in new.keys() | old.keys()}
    else:
        timeline = Timeline(where, int(series.level), series.fields)
        diff = to_micros(integrate(timeline, points, derived_ms, target_ms, bucket_seconds), unit)
    seq = max([series.folded_seq, *(p.seq for p in points)])
    update = SeriesUpdate(
        meter=series.meter,
        org_id=series.org_id,
        series=series.series,
        derived_to=target,
        folded_seq=seq,
        level=str(timeline.level),
        fields=_encode(timeline.fields).decode(),
        active=timeline.level != 0,
    )
    return diff, update, timeline.resets


def derive(batch: GaugeBatch, meters: Mapping[str, Meter], bucket_seconds: int) -> GaugePlan:
    """Derive every series of `batch` up to `batch.until` (pure): the micro-units each (org,
    meter, bucket) gains, the series' new states and the snapshot resets counted."""
    totals: defaultdict[tuple[str, str, int], int] = defaultdict(int)
    updates: list[SeriesUpdate] = []
    resets = 0
    for series in batch.series:
        meter = meters.get(series.meter)
        if meter is None:  # a meter removed from config: its series stay as they are
            continue
        diff, update, reset = derive_series(series, meter, batch.until, bucket_seconds)
        for bucket, micros in diff.items():
            if micros:
                totals[(series.org_id, series.meter, bucket)] += micros
        updates.append(update)
        resets += reset
    return GaugePlan(
        totals=[UsageTotal(o, m, b, v) for (o, m, b), v in sorted(totals.items()) if v],
        series=updates,
        resets=resets,
    )


class GaugeStats(msgspec.Struct):
    """One derivation pass: series derived, and snapshots that reset a level."""

    series: int = 0
    resets: int = 0


async def run(
    storage: GaugeStore,
    meters: Mapping[str, Meter],
    *,
    bucket_seconds: int,
    closed_before: int,
    org_id: str | None = None,
    batch_series: int = 5000,
) -> GaugeStats:
    """Derive every due series of the gauge meters up to the last bucket closed before
    `closed_before`, `batch_series` series per transaction. Runs before the rollup's bucket
    steps, which then fold the buckets it marked dirty like any other."""
    stats = GaugeStats()
    if not meters:
        return stats
    until = closed_before - closed_before % bucket_seconds

    def planner(batch: GaugeBatch) -> GaugePlan:
        return derive(batch, meters, bucket_seconds)

    after: tuple[str, str, str] | None = None
    while True:
        keys, plan = await storage.gauge_step(until, batch_series, planner, org_id, after)
        if not keys:
            break
        stats.series += len(plan.series)
        stats.resets += plan.resets
        after = keys[-1]
        if len(keys) < batch_series:
            break
    if stats.resets:
        log.warning("gauge.snapshot_resets", resets=stats.resets)
    return stats
