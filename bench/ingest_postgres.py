"""`python -m bench.ingest --storage postgres`: the server on PostgreSQL against raw asyncpg.

Both runs get a fresh database on the same server. Raw: per batch, one transaction with
`copy_records_to_table` into usage_events and meter_values (ids chosen by the client, as the
SQLite baseline does) and one multi-row upsert each (`unnest`) of the batch's per-bucket
totals and dirty marks: the rows the product writes, without HTTP, validation or meter evaluation.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
import uuid
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench._common import ROOT, Stopwatch, Workload, batches, machine, ratio_line, rows_for
from bench.ingest import TARGET, prepare, run_server

CHECK = (
    ("usage_events", "SELECT count(*) FROM usage_events"),
    ("meter_values", "SELECT count(*) FROM meter_values"),
    ("sum_micros", "SELECT coalesce(sum(micros), 0)::bigint FROM meter_values"),
    ("bucket_totals", "SELECT count(*) FROM bucket_totals"),
    ("total_micros", "SELECT coalesce(sum(micros), 0)::bigint FROM bucket_totals"),
    ("dirty_buckets", "SELECT count(*) FROM dirty_buckets"),
    (
        "content",
        "SELECT md5(string_agg(e.source || e.event_id || e.type || e.org_id || e.time_ms"
        " || e.data || v.meter || v.bucket_start || v.micros, ',' ORDER BY e.source, e.event_id))"
        " FROM usage_events e JOIN meter_values v ON v.event_pk = e.id",
    ),
)


async def _create_database(server_dsn: str) -> str:
    import asyncpg

    name = f"cp_bench_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"{server_dsn.rpartition('/')[0]}/{name}"


async def _raw(dsn: str, events: list[dict[str, Any]], batch: int) -> float:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        for path in sorted((ROOT / "migrations" / "postgres").glob("*.sql")):
            await conn.execute(path.read_text())
        received_at = int(time.time())
        prepared = []
        pk = 1
        for r in batches(len(events), batch):
            event_rows, value_rows, dirty = rows_for(events[r.start : r.stop], pk, received_at)
            totals: dict[tuple[str, int, str], int] = defaultdict(int)
            for _, meter, org, bucket, micros in value_rows:
                totals[(org, bucket, meter)] += micros
            prepared.append((event_rows, value_rows, sorted(totals.items()), dirty))
            pk += len(r)
        with Stopwatch() as sw:
            for event_rows, value_rows, totals_rows, dirty in prepared:
                async with conn.transaction():
                    await conn.copy_records_to_table(
                        "usage_events",
                        records=event_rows,
                        columns=[
                            "id", "source", "event_id", "type", "org_id", "time_ms", "data",
                            "received_at",
                        ],
                    )  # fmt: skip
                    await conn.copy_records_to_table(
                        "meter_values",
                        records=value_rows,
                        columns=["event_pk", "meter", "org_id", "bucket_start", "micros"],
                    )
                    await conn.execute(
                        "INSERT INTO bucket_totals (org_id, bucket_start, meter, micros)"
                        " SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[])"
                        " ON CONFLICT (org_id, bucket_start, meter)"
                        " DO UPDATE SET micros = bucket_totals.micros + excluded.micros",
                        *zip(*[(o, b, m, v) for (o, b, m), v in totals_rows], strict=True),
                    )
                    await conn.execute(
                        "INSERT INTO dirty_buckets (org_id, bucket_start, mark)"
                        " SELECT o, b, nextval('dirty_marks')"
                        " FROM unnest($1::text[], $2::bigint[]) AS t(o, b)"
                        " ON CONFLICT (org_id, bucket_start) DO UPDATE SET mark = excluded.mark",
                        *zip(*dirty, strict=True),
                    )
        return sw.seconds
    finally:
        await conn.close()


async def _check(dsn: str) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return {name: await conn.fetchval(query) for name, query in CHECK}
    finally:
        await conn.close()


def main(args: argparse.Namespace, wl: Workload) -> int:
    with ExitStack() as stack:
        server_dsn = args.dsn
        if not server_dsn:
            from tests.harness import PostgresServer

            pg = PostgresServer("bench")
            server_dsn = pg.start()
            stack.callback(pg.stop)
        print(f"ingest benchmark (postgres) on {machine()}")
        events, bodies, sizes = prepare(wl, args)
        work = Path(tempfile.mkdtemp(prefix="cp-bench-ingest-pg-", dir=args.dir))
        stack.callback(shutil.rmtree, work, True)
        raw_best = server_best = float("inf")
        problems: list[str] = []
        for rep in range(1, args.repeat + 1):
            tag = f" (run {rep})" if args.repeat > 1 else ""
            raw_dsn = asyncio.run(_create_database(server_dsn))
            raw_seconds = asyncio.run(_raw(raw_dsn, events, args.batch))
            raw_best = min(raw_best, raw_seconds)
            label = f"raw asyncpg copy + upserts{tag}"
            print(f"\n  {label:<34}{raw_seconds:8.2f} s {wl.events / raw_seconds:>10,.0f} events/s")
            server_dsn_db = asyncio.run(_create_database(server_dsn))
            run_dir = work / f"run{rep}"
            run_dir.mkdir()
            storage = f'backend = "postgres"\ndsn = "{server_dsn_db}"\nmax_connections = 8'
            server = run_server(run_dir, bodies, sizes, args.clients, storage)
            server_best = min(server_best, server.seconds)
            label = f"server HTTP end to end{tag}"
            print(
                f"  {label:<34}{server.seconds:8.2f} s "
                f"{server.accepted / server.seconds:>10,.0f} events/s"
            )
            want, got = asyncio.run(_check(raw_dsn)), asyncio.run(_check(server_dsn_db))
            if server.accepted != wl.events or want != got:
                problems.append(f"server stored {got}, raw {want}, accepted {server.accepted}")
        for p in problems:
            print(f"  VERIFY FAILED: {p}")
        if not problems:
            print(f"\n  verified: both databases hold the same rows: {got}")
        ratio = (wl.events / server_best) / (wl.events / raw_best)
        print(ratio_line("server/raw events per second", ratio, TARGET))
        return 1 if problems else 0
