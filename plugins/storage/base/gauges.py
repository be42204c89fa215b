"""Gauge meters' storage, shared by the SQL plugins: the series due, their points, and the
derivation's writes (bucket totals, dirty marks, series states) in one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from controlplane.events import bucket_of
from controlplane.interfaces import (
    GaugeBatch,
    GaugePlan,
    GaugePlanner,
    GaugeSeries,
    SeriesPoint,
    SeriesUpdate,
    StoredEvent,
)
from controlplane.interfaces.storage import GaugeStore
from controlplane.plugins.storage.base.driver import Connection, SQLDriver

Key = tuple[str, str, str]  # (meter, org, series)


def point_order(event: StoredEvent) -> str:
    """Same-millisecond points are ordered by this: the event's content, not its arrival."""
    return f"{event.source}\x1f{event.event_id}"


def gauge_touches(
    events: Sequence[StoredEvent], bucket_seconds: int
) -> list[tuple[str, str, str, int, int]]:
    """One row per series the events' points touch, in key order: (meter, org, series, the
    bucket of its earliest point here, the time of that point)."""
    earliest: dict[Key, int] = {}
    for e in events:
        for p in e.points:
            key = (p.meter, e.org_id, p.series)
            earliest[key] = min(earliest.get(key, e.time_ms), e.time_ms)
    return [(*key, bucket_of(at, bucket_seconds), at) for key, at in sorted(earliest.items())]


class SQLGauges(SQLDriver, GaugeStore):
    """Derivation steps over the series due; storing points is part of the dialect's ingest."""

    async def gauge_step(
        self,
        until: int,
        limit: int,
        planner: GaugePlanner,
        org_id: str | None = None,
        after: tuple[str, str, str] | None = None,
    ) -> tuple[list[tuple[str, str, str]], GaugePlan]:
        start = after or ("", "", "")

        async def work(conn: Connection) -> tuple[list[Key], GaugePlan]:
            due = await conn.fetch("due_gauge_series", until, until * 1000, org_id, *start, limit)
            if not due:
                return [], GaugePlan(totals=[], series=[])
            keys: list[Key] = [(r["meter"], r["org_id"], r["series"]) for r in due]
            # a series with a point stored before the point it was derived to is replayed
            # from its first point; the others go on from their state
            late = [
                r["pending_from"] is not None and r["pending_from"] < r["derived_to"] * 1000
                for r in due
            ]
            target = max(until, *(r["derived_to"] for r in due))
            columns: list[list[Any]] = [[], [], [], []]
            for key, r, replay in zip(keys, due, late, strict=True):
                first = -(2**62) if replay else r["derived_to"] * 1000
                for column, value in zip(columns, (*key, first), strict=True):
                    column.append(value)
            points: list[list[SeriesPoint]] = [[] for _ in due]
            for p in await conn.fetch(
                "gauge_batch_points", *self._series_keys(columns), target * 1000
            ):  # by position: this runs once per point
                points[p[0]].append(SeriesPoint(p[1], p[2], p[3], p[4], p[5], p[6]))
            batch = GaugeBatch(
                until=until,
                series=[
                    GaugeSeries(
                        meter=r["meter"],
                        org_id=r["org_id"],
                        series=r["series"],
                        derived_to=r["derived_to"],
                        folded_seq=r["folded_seq"],
                        level=str(r["level"]),
                        fields=r["fields"],
                        late=late[i],
                        points=points[i],
                    )
                    for i, r in enumerate(due)
                ],
            )
            plan = planner(batch)
            totals = sorted(plan.totals, key=lambda t: (t.org_id, t.bucket_start, t.meter))
            await conn.bulk(
                "add_gauge_totals",
                [(t.org_id, t.meter, t.bucket_start, t.value_micros) for t in totals],
            )
            dirty = sorted({(t.org_id, t.bucket_start) for t in totals})
            await conn.bulk("mark_dirty", dirty)
            await conn.bulk(
                "update_gauge_series",
                [
                    (
                        u.meter,
                        u.org_id,
                        u.series,
                        u.derived_to,
                        u.folded_seq,
                        u.level,
                        u.fields,
                        u.active,
                    )
                    for u in plan.series
                ],
            )
            return keys, plan

        return await self._tx("gauge derivation", work)

    def _series_keys(self, columns: list[list[Any]]) -> tuple[Any, ...]:
        """Series keys (meter, org, series, from ms) as `gauge_batch_points` takes them:
        here one list per column; a dialect may pass them otherwise."""
        return tuple(self._array(c) for c in columns)

    async def gauge_series(self, meter: str | None = None) -> list[SeriesUpdate]:
        rows = await self._all("gauge_series", meter)
        return [
            SeriesUpdate(
                meter=r["meter"],
                org_id=r["org_id"],
                series=r["series"],
                derived_to=r["derived_to"],
                folded_seq=r["folded_seq"],
                level=str(r["level"]),
                fields=r["fields"],
                active=bool(r["active"]),
            )
            for r in rows
        ]
