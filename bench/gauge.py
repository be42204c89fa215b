"""Gauge rollup speed: the product's rollup of a time-weighted meter against a raw SQL
window-function computation of the same integrals.

    python -m bench.gauge [--series 10000] [--orgs 1000] [--buckets 24] [--repeat 1]

1. Fill a fresh SQLite database (migrated by the product) through the product's own ingest
   (untimed): `--series` series (org = series % orgs) of one gauge meter, each with one
   snapshot per hour at a minute of its own, for `--buckets` hours; levels up to 1 GB.
2. Raw: one query over `gauge_points`: ``LEAD()`` gives each level the time it holds until
   (the next point of its series, or the end), a join with the hours spreads it over the hours
   it covers, and a ``GROUP BY`` sums level x milliseconds per (series, hour), rounds half to
   even to micro GB-hours and sums per (org, hour); all rows fetched, on a fresh connection
   with the plugin's PRAGMAs. Run before and after the rollup: the faster run is the baseline.
3. Rollup: ``ControlPlane(config).rollup(until=<end of the last hour>)``: every series
   derived (points read, integrated, bucket totals and series states written) and every
   (org, hour) folded into the ledger; then once more with nothing due. Then, informational,
   one hour later with no new events: every series is derived from its stored state.

Checks that the ledger holds exactly the raw integrals per (org, hour), and that a second
rollup writes nothing. Prints both times and the ratio raw / rollup. With `--repeat N`, N
rounds of steps 2 and 3 on fresh copies of the filled database; the best of each counts.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench._common import BUCKET_SECONDS, T0, Stopwatch, connect, machine, ratio_line
from controlplane import config as config_mod
from controlplane.core import ControlPlane
from controlplane.logs import configure
from controlplane.rollup import RollupStats

TARGET = 0.5
METER = "storage_gb_hours"
GAUGE_CONFIG: dict[str, Any] = {
    "name": METER,
    "event_type": "volume.size",
    "aggregation": "time_weighted",
    "value": "data.bytes / 1000000000",
    "series": "data.volume",
    "time_unit_seconds": 3600,
    "unit": "GB-hour",
}
# Levels in pico-GB (bytes x 1000) times milliseconds, per (series, hour), rounded half to
# even to micro GB-hours (/ 3.6e12); then summed per (org, hour).
RAW_WINDOW = """
WITH RECURSIVE hours (h) AS (
    SELECT :t0 UNION ALL SELECT h + 3600 FROM hours WHERE h + 3600 < :end
),
segments AS (
    SELECT org_id, series, time_ms AS since, CAST(value AS INTEGER) AS level,
           lead(time_ms, 1, :end * 1000)
               OVER (PARTITION BY meter, org_id, series ORDER BY time_ms, ord) AS until
    FROM gauge_points WHERE meter = :meter
),
per_series AS (
    SELECT s.org_id, s.series, hours.h AS hour,
           sum(s.level * (min(s.until, (hours.h + 3600) * 1000)
                          - max(s.since, hours.h * 1000))) AS acc
    FROM segments s JOIN hours
      ON hours.h * 1000 < s.until AND (hours.h + 3600) * 1000 > s.since
    WHERE s.level != 0
    GROUP BY s.org_id, s.series, hours.h
)
SELECT org_id, hour,
       sum(acc / 3600000000000
           + CASE WHEN 2 * (acc % 3600000000000) > 3600000000000
                    OR (2 * (acc % 3600000000000) = 3600000000000
                        AND (acc / 3600000000000) % 2 = 1)
                  THEN 1 ELSE 0 END) AS micros
FROM per_series GROUP BY org_id, hour
"""


def _config(db: Path) -> config_mod.Config:
    return config_mod.parse(
        {
            "storage": {"backend": "sqlite", "path": str(db), "synchronous": "full"},
            "rollup": {"bucket_seconds": BUCKET_SECONDS},
            "logging": {"level": "warning"},
            "meters": [GAUGE_CONFIG],
        }
    )


def events(series: int, orgs: int, buckets: int) -> list[dict[str, Any]]:
    """One snapshot per series per hour, at the series' own second of the hour."""
    out = []
    for h in range(buckets):
        for s in range(series):
            out.append(
                {
                    "id": f"v{s:06d}-{h:03d}",
                    "type": "volume.size",
                    "subject": f"org-{s % orgs:05d}",
                    "ts": (T0 + h * BUCKET_SECONDS + (s * 37) % BUCKET_SECONDS) * 1000,
                    "data": {"volume": f"vol-{s:06d}", "bytes": (s * 7919 + h * 104729) % 10**9},
                }
            )
    return out


async def fill(config: config_mod.Config, items: list[dict[str, Any]], clock: float) -> int:
    async with ControlPlane(config, clock=lambda: clock) as cp:
        for i in range(0, len(items), 5000):
            await cp.ingest(items[i : i + 5000], "bench")
        # every org on a billable plan with a customer: rows are `pending`
        orgs = sorted({e["subject"] for e in items})
        for org in orgs:
            await cp.set_org(
                org, customer=f"cus_{org}", plan="pro", actor="bench", effective_from=0
            )
    return len(items)


def raw_window(db: Path, end: int) -> tuple[float, dict[tuple[str, int], int]]:
    conn = connect(db)
    with Stopwatch() as sw:
        rows = conn.execute(RAW_WINDOW, {"t0": T0, "end": end, "meter": METER}).fetchall()
    conn.close()
    return sw.seconds, {(o, h): v for o, h, v in rows if v}


async def run_rollup(config: config_mod.Config, until: int) -> list[tuple[float, RollupStats]]:
    out = []
    async with ControlPlane(config, migrate=False, clock=lambda: until + 60) as cp:
        for _ in range(2):
            with Stopwatch() as sw:
                stats = await cp.rollup(until=until)
            out.append((sw.seconds, stats))
    return out


def ledger(db: Path) -> dict[tuple[str, int], int]:
    conn = connect(db)
    rows = conn.execute(
        "SELECT org_id, bucket_start, sum(value_micros) FROM ledger GROUP BY org_id, bucket_start"
    ).fetchall()
    conn.close()
    return {(o, b): v for o, b, v in rows if v}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gauge", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--series", type=int, default=10_000)
    parser.add_argument("--orgs", type=int, default=1_000)
    parser.add_argument("--buckets", type=int, default=24, help="hourly buckets spanned")
    parser.add_argument("--dir", help="where to put the temporary database (default: system temp)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds on copies of the filled database; best counts"
    )
    args = parser.parse_args(argv)

    configure(config_mod.LoggingConfig(level="warning"))
    work = Path(tempfile.mkdtemp(prefix="cp-bench-gauge-", dir=args.dir))
    db = work / "gauge.db"
    config = _config(db)
    end = T0 + args.buckets * BUCKET_SECONDS
    print(f"gauge rollup benchmark (sqlite, synchronous=full) on {machine()}")
    print(
        f"  {args.series:,} series x {args.buckets} hourly buckets, one snapshot per series "
        f"per hour, {args.orgs:,} orgs, 1 time_weighted meter"
    )
    items = events(args.series, args.orgs, args.buckets)
    with Stopwatch() as sw:
        stored = asyncio.run(fill(config, items, end + 60))
    print(f"  ingested {stored:,} events in {sw.seconds:.1f} s (not part of the comparison)\n")

    filled = work / "filled"
    filled.mkdir()
    for path in work.glob("gauge.db*"):
        shutil.copy2(path, filled / path.name)
    raws: list[float] = []
    rollups: list[float] = []
    for round_ in range(max(args.repeat, 1)):
        if round_:  # the same filled database again, nothing rolled up
            for path in work.glob("gauge.db*"):
                path.unlink()
            for path in filled.iterdir():
                shutil.copy2(path, work / path.name)
        raw_before, totals = raw_window(db, end)
        (rollup_s, stats), (again_s, again) = asyncio.run(run_rollup(config, end))
        raw_after, _ = raw_window(db, end)
        raws += [raw_before, raw_after]
        rollups.append(rollup_s)
        print(
            f"  round {round_ + 1}: raw {raw_before:.2f} s and {raw_after:.2f} s, "
            f"rollup {rollup_s:.2f} s"
        )
    raw_s, rollup_s = min(raws), min(rollups)
    print(
        f"  raw window function     {raw_s:8.2f} s  {len(totals):>10,} (org, hour) integrals  "
        "(the best run)"
    )
    print(
        f"  rollup                  {rollup_s:8.2f} s  {stats.gauge_series:>10,} series derived, "
        f"{stats.rows:,} ledger rows (the best round)"
    )
    print(
        f"  rollup again            {again_s:8.3f} s  {again.gauge_series:>10,} series, "
        f"{again.rows} ledger rows"
    )
    problems = []
    got = ledger(db)  # before the next hour is rolled up
    if got != totals:
        wrong = sum(1 for k in got.keys() | totals.keys() if got.get(k) != totals.get(k))
        problems.append(f"ledger differs from the raw integrals in {wrong:,} (org, hour) pairs")
    if again.rows:
        problems.append(f"second rollup was not a no-op: {again}")
    with Stopwatch() as sw:
        (_, advanced), _ = asyncio.run(run_rollup(config, end + BUCKET_SECONDS))
    print(
        f"  one hour later, no events {sw.seconds:6.2f} s  {advanced.gauge_series:>10,} series "
        f"derived, {advanced.rows:,} ledger rows (informational: series x buckets, not events;"
        " includes opening the store)"
    )
    if advanced.rows != len({o for o, _ in totals}):
        problems.append(f"an hour without events wrote {advanced.rows} rows, not one per org")
    print()
    for p in problems:
        print(f"  VERIFY FAILED: {p}")
    if not problems:
        print(f"  verified: the ledger equals the raw integrals in all {len(totals):,} pairs")
    print(ratio_line("raw/rollup", raw_s / rollup_s, TARGET))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
