"""Rollup speed: the product's rollup against a plain GROUP BY over the same meter values.

    python -m bench.rollup [--events 1000000] [--orgs 10000] [--buckets 24]

1. Fill a fresh SQLite database (migrated by the product) with `--events` usage events over
   `--orgs` orgs and `--buckets` hourly buckets, written with sqlite3 `executemany` exactly
   as ingest writes them: usage_events, meter_values, one dirty_buckets mark per (org,
   bucket). Every org gets a customer and a plan (every tenth is on the free plan, so both
   `pending` and `excluded` rows are written).
2. Raw: ``SELECT org_id, meter, bucket_start, sum(micros) FROM meter_values GROUP BY ...``,
   all rows fetched, on a fresh connection with the plugin's PRAGMAs; run before and after
   the rollup, the faster run is the baseline.
   The raw floor with writes, the baseline of the ratio: on a copy, one transaction that runs
   the GROUP BY, inserts the same ledger rows and clears the dirty marks.
3. Rollup: ``ControlPlane(config).rollup(until=<end of the last bucket>)`` on the SQLite
   storage plugin, then once more with nothing dirty. The rollup reads the per-bucket totals
   that ingest keeps with the values (the triggers of migration 0002 fill them during step 1,
   untimed, as live ingest does); the GROUP BY baseline recomputes them from every value.

Checks that the ledger holds exactly the raw totals per (org, meter, bucket) and that the
whole units per (org, meter) are the floor of the exact usage. Prints the times, the ledger
write rate and, last, the ratio raw floor incl. writes / rollup (target 0.9); the GROUP BY
alone / rollup is printed for information.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import (
    BUCKET_SECONDS,
    METER_CONFIG,
    T0,
    Stopwatch,
    Workload,
    batches,
    connect,
    machine,
    ratio_line,
    rows_for,
)
from controlplane import config as config_mod
from controlplane.core import ControlPlane
from controlplane.logs import configure
from controlplane.rollup import RollupStats

TARGET = 0.9  # against the raw floor incl. writes (issue 22, P2)
RAW_GROUP_BY = (
    "SELECT org_id, meter, bucket_start, sum(micros) FROM meter_values"
    " GROUP BY org_id, bucket_start, meter"
)


def _config(db: Path, batch_buckets: int | None) -> config_mod.Config:
    rollup: dict[str, Any] = {"bucket_seconds": BUCKET_SECONDS}
    if batch_buckets:
        rollup["batch_buckets"] = batch_buckets
    return config_mod.parse(
        {
            "storage": {"backend": "sqlite", "path": str(db), "synchronous": "full"},
            "rollup": rollup,
            "logging": {"level": "warning"},
            "meters": [METER_CONFIG],
        }
    )


async def _migrate(config: config_mod.Config) -> None:
    async with ControlPlane(config):  # applies migrations and pins bucket_seconds
        pass


def fill(db: Path, wl: Workload, chunk: int = 50_000) -> tuple[int, int]:
    """Write the workload as ingest would; returns (events, dirty buckets)."""
    conn = connect(db, synchronous="OFF")  # only the fill; the file is the same either way
    now = int(time.time())
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO orgs (org_id, customer, updated_at) VALUES (?, ?, ?)",
        [(wl.org(i), f"cus_{i:05d}", now) for i in range(wl.orgs)],
    )
    conn.executemany(
        "INSERT INTO org_plans (org_id, effective_from, plan) VALUES (?, 0, ?)",
        [(wl.org(i), "free" if i % 10 == 0 else "pro") for i in range(wl.orgs)],
    )
    conn.execute("COMMIT")
    for r in batches(wl.events, chunk):
        event_rows, value_rows, dirty = rows_for([wl.event(i) for i in r], r.start + 1, now)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO usage_events (id, source, event_id, type, org_id, time_ms, data,"
            " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            event_rows,
        )
        conn.executemany(
            "INSERT INTO meter_values (event_pk, meter, org_id, bucket_start, micros)"
            " VALUES (?, ?, ?, ?, ?)",
            value_rows,
        )
        conn.executemany(
            "INSERT OR IGNORE INTO dirty_buckets (org_id, bucket_start) VALUES (?, ?)", dirty
        )
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    events = conn.execute("SELECT count(*) FROM usage_events").fetchone()[0]
    dirty_count = conn.execute("SELECT count(*) FROM dirty_buckets").fetchone()[0]
    conn.close()
    return events, dirty_count


def raw_group_by(db: Path) -> tuple[float, dict[tuple[str, str, int], int]]:
    conn = connect(db)
    with Stopwatch() as sw:
        rows = conn.execute(RAW_GROUP_BY).fetchall()
    conn.close()
    return sw.seconds, {(o, m, b): v for o, m, b, v in rows}


def raw_floor(db: Path, copy: Path) -> float | str:
    """The SQLite work any rollup of this data must do, on a copy: one transaction that reads
    the totals, inserts one ledger row per (org, meter, bucket) and clears the dirty marks.
    Informational, not the ratio's baseline; returns the seconds, or why it could not run."""
    shutil.copyfile(db, copy)
    conn = connect(copy)
    now = int(time.time())
    try:
        with Stopwatch() as sw:
            conn.execute("BEGIN IMMEDIATE")
            totals = conn.execute(RAW_GROUP_BY).fetchall()
            plans = dict(conn.execute("SELECT org_id, plan FROM org_plans").fetchall())
            rows: list[tuple[Any, ...]] = []
            carries: dict[tuple[str, str], tuple[int, int]] = {}
            for org, meter, bucket, micros in sorted(totals):
                exact, whole = carries.get((org, meter), (0, 0))
                exact += micros
                free = plans.get(org, "free") == "free"
                rows.append(
                    (
                        f"{org}:{meter}:{bucket}:1",
                        org,
                        meter,
                        bucket,
                        bucket + BUCKET_SECONDS,
                        1,
                        micros,
                        exact // 1_000_000 - whole,
                        "excluded" if free else "pending",
                        "free_plan" if free else None,
                        now,
                        now,
                    )
                )
                carries[(org, meter)] = (exact, exact // 1_000_000)
            conn.executemany(
                "INSERT INTO ledger (identifier, org_id, meter, bucket_start, bucket_end,"
                " revision, value_micros, quantity, state, reason, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            conn.execute("DELETE FROM dirty_buckets")
            conn.execute("COMMIT")
    except sqlite3.Error as exc:  # the ledger's schema moved on: report, do not fail the run
        return f"skipped ({exc})"
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{copy}{suffix}").unlink(missing_ok=True)
    return sw.seconds


async def run_rollup(config: config_mod.Config, until: int) -> list[tuple[float, RollupStats]]:
    out = []
    async with ControlPlane(config, migrate=False) as cp:
        for _ in range(2):
            with Stopwatch() as sw:
                stats = await cp.rollup(until=until)
            out.append((sw.seconds, stats))
    return out


def verify(
    db: Path, totals: dict[tuple[str, str, int], int], dirty: int, stats: RollupStats
) -> list[str]:
    conn = connect(db)
    problems = []
    ledger = {
        (o, m, b): v
        for o, m, b, v in conn.execute(
            "SELECT org_id, meter, bucket_start, sum(value_micros) FROM ledger"
            " GROUP BY org_id, meter, bucket_start"
        )
    }
    if ledger != totals:
        wrong = sum(1 for k in totals.keys() | ledger.keys() if totals.get(k) != ledger.get(k))
        problems.append(f"ledger totals differ from the raw GROUP BY in {wrong:,} groups")
    units = conn.execute(
        "SELECT count(*) FROM (SELECT sum(quantity) q, sum(value_micros) v"
        " FROM ledger GROUP BY org_id, meter, state) WHERE q != v / 1000000"
    ).fetchone()[0]
    if units:
        problems.append(f"{units} (org, meter, state) chains whose units are not floor(usage)")
    left = conn.execute("SELECT count(*) FROM dirty_buckets").fetchone()[0]
    if left:
        problems.append(f"{left:,} dirty buckets left after the rollup")
    if stats.buckets != dirty or stats.rows != len(totals):
        problems.append(
            f"rollup folded {stats.buckets:,} buckets into {stats.rows:,} rows; "
            f"expected {dirty:,} and {len(totals):,}"
        )
    conn.close()
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rollup", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--orgs", type=int, default=10_000)
    parser.add_argument("--buckets", type=int, default=24, help="hourly buckets spanned")
    parser.add_argument(
        "--batch-buckets", type=int, help="rollup.batch_buckets (default: the config default)"
    )
    parser.add_argument("--dir", help="where to put the temporary database (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)

    configure(config_mod.LoggingConfig(level="warning"))
    wl = Workload(events=args.events, orgs=args.orgs, buckets=args.buckets)
    work = Path(tempfile.mkdtemp(prefix="cp-bench-rollup-", dir=args.dir))
    db = work / "rollup.db"
    config = _config(db, args.batch_buckets)
    until = T0 + wl.buckets * BUCKET_SECONDS
    print(f"rollup benchmark (sqlite, synchronous=full) on {machine()}")
    print(
        f"  {wl.events:,} events, {wl.orgs:,} orgs x {wl.buckets} hourly buckets, 1 meter, "
        f"rollup.batch_buckets = {config.rollup.batch_buckets:,}"
    )
    try:
        asyncio.run(_migrate(config))
        with Stopwatch() as sw:
            events, dirty = fill(db, wl)
        size = sum(p.stat().st_size for p in work.glob("rollup.db*")) / 2**20
        print(
            f"  filled {events:,} events and {dirty:,} dirty buckets in {sw.seconds:.1f} s "
            f"(not part of the comparison; database {size:,.0f} MiB)\n"
        )

        raw_before, totals = raw_group_by(db)
        floor_s = raw_floor(db, work / "floor.db")
        (rollup_s, stats), (again_s, again) = asyncio.run(run_rollup(config, until))
        raw_after, _ = raw_group_by(db)
        raw_s = min(raw_before, raw_after)

        print(
            f"  raw GROUP BY (fetch all)  {raw_s:8.2f} s  {len(totals):>10,} groups  "
            f"(runs: {raw_before:.2f} s before, {raw_after:.2f} s after the rollup)"
        )
        print(
            f"  rollup                    {rollup_s:8.2f} s  {stats.rows:>10,} ledger rows  "
            f"{stats.rows / rollup_s:>10,.0f} rows/s  ({stats.buckets:,} buckets, "
            f"{stats.pending:,} pending, {stats.excluded:,} excluded)"
        )
        if isinstance(floor_s, float):
            print(
                f"  raw floor incl. writes    {floor_s:8.2f} s  {len(totals):>10,} ledger rows  "
                f"{len(totals) / floor_s:>10,.0f} rows/s  (GROUP BY + the same ledger "
                f"INSERTs, one transaction; rollup takes {rollup_s / floor_s:.1f}x this)"
            )
            writes = floor_s - raw_s
            if writes > 0:
                print(
                    f"  of which ledger writes   ~{writes:8.2f} s  (the floor less its GROUP BY): "
                    f"a rollup that writes these rows cannot pass a ratio of {raw_s / writes:.2f}"
                )
        else:
            print(f"  raw floor incl. writes    {floor_s}")
        print(
            f"  rollup again (no dirty)   {again_s:8.3f} s  {again.rows:>10,} ledger rows  "
            f"({again.buckets} buckets)"
        )

        problems = verify(db, totals, dirty, stats)
        if again.buckets or again.rows:
            problems.append(f"second rollup was not a no-op: {again}")
        print()
        if problems:
            for p in problems:
                print(f"  VERIFY FAILED: {p}")
        else:
            print(
                f"  verified: ledger sums equal the raw GROUP BY in all {len(totals):,} groups; "
                "whole units = floor(usage) per (org, meter, state); nothing left dirty"
            )
        print(f"  (raw GROUP BY alone / rollup = {raw_s / rollup_s:.2f}, for information)")
        if not isinstance(floor_s, float):
            print(f"  RATIO not computed: the raw floor incl. writes was {floor_s}")
            return 1
        print(ratio_line("raw floor incl. writes / rollup", floor_s / rollup_s, TARGET))
        return 1 if problems else 0
    finally:
        if args.keep:
            print(f"  kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
