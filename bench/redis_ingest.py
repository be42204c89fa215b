"""Redis Streams ingest throughput: the plugin into SQLite against a raw consumer loop.

    python -m bench.redis_ingest [--events 100000] [--batch 1000] [--repeat 1] [--redis-url URL]

Setup (not timed): a throwaway redis-server on loopback (tests/harness.py; or `--redis-url`)
and one stream holding the workload (bench/_common.py), one event per entry as JSON in the
field `event`, as producers write it.

1. Raw: a consumer group of its own on that stream; a plain loop of redis-py ``XREADGROUP`` (COUNT
   `--batch`), ``msgspec`` decoding of each entry, the rows the product writes
   (``rows_for``), one ``BEGIN IMMEDIATE`` ... ``COMMIT`` with three ``executemany`` into a
   fresh SQLite file with the same migrations and PRAGMAs (WAL, synchronous FULL), then
   ``XACK``, until the stream is drained.
2. Product: another consumer group on the same stream; a ControlPlane on a fresh SQLite file
   (synchronous = "full") with a `redis_streams` source (`batch_size` = `--batch`), started as
   `serve` starts it; timed from starting the source until every entry is acknowledged.

Both databases must end up with identical content (checked by hash, ignoring primary keys and
commit order) and both groups with nothing pending. Prints both rates and the ratio; with
`--repeat N`, raw and product alternate N times (each run a new group and new databases) and
the best of each counts.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from bench._common import (
    BUCKET_SECONDS,
    METER_CONFIG,
    Stopwatch,
    Workload,
    apply_migrations,
    connect,
    digest,
    machine,
    ratio_line,
    rows_for,
)
from controlplane import config as config_mod
from controlplane.core import ControlPlane
from controlplane.logs import configure

TARGET = 0.5
STREAM = "bench-usage"
INSERT_EVENT = (
    "INSERT INTO usage_events (id, source, event_id, type, org_id, time_ms, data, received_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_VALUE = (
    "INSERT INTO meter_values (event_pk, meter, org_id, bucket_start, micros)"
    " VALUES (?, ?, ?, ?, ?)"
)
MARK_DIRTY = "INSERT OR IGNORE INTO dirty_buckets (org_id, bucket_start) VALUES (?, ?)"


class Progress:
    """`label: done/total` on stderr, redrawn at most every 0.5 s."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.last = label, total, 0.0
        self.started = time.perf_counter()

    def show(self, done: int, final: bool = False) -> None:
        now = time.perf_counter()
        if final or now - self.last >= 0.5:
            self.last = now
            rate = done / max(now - self.started, 1e-9)
            end = "\n" if final else ""
            print(
                f"\r  {self.label}: {done:,}/{self.total:,} entries ({rate:,.0f}/s)",
                end=end,
                file=sys.stderr,
                flush=True,
            )


def fill_stream(url: str, wl: Workload, chunk: int = 5000) -> None:
    import redis

    client: Any = redis.Redis.from_url(url)
    client.delete(STREAM)
    encode = msgspec.json.Encoder().encode
    progress = Progress("filling the stream", wl.events)
    for start in range(0, wl.events, chunk):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(start + chunk, wl.events)):
            pipe.xadd(STREAM, {"event": encode(wl.event(i))})
        pipe.execute()
        progress.show(min(start + chunk, wl.events))
    progress.show(wl.events, final=True)
    client.close()


def run_raw(url: str, db: Path, total: int, batch: int, group: str) -> tuple[float, float]:
    """Wall and CPU seconds of the raw consumer."""
    import redis

    client: Any = redis.Redis.from_url(url)
    client.xgroup_create(STREAM, group, id="0")
    conn = connect(db)
    apply_migrations(conn)
    decode = msgspec.json.Decoder().decode
    received_at = int(time.time())
    pk = 1
    done = 0
    progress = Progress("raw consumer", total)
    cpu = time.process_time()
    with Stopwatch() as sw:
        while True:
            reply = client.xreadgroup(group, "raw-1", {STREAM: ">"}, count=batch)
            if not reply:
                break
            entries = reply[0][1]
            events = [decode(fields[b"event"]) for _, fields in entries]
            event_rows, value_rows, dirty = rows_for(events, pk, received_at)
            pk += len(events)
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT_EVENT, event_rows)
            conn.executemany(INSERT_VALUE, value_rows)
            conn.executemany(MARK_DIRTY, dirty)
            conn.execute("COMMIT")
            client.xack(STREAM, group, *(entry_id for entry_id, _ in entries))
            done += len(entries)
            progress.show(done)
    cpu = time.process_time() - cpu
    progress.show(done, final=True)
    pending = client.xpending(STREAM, group)["pending"]
    conn.close()
    client.close()
    if done != total or pending:
        raise RuntimeError(f"raw consumer: {done:,} of {total:,} entries, {pending} pending")
    return sw.seconds, cpu


def _config(db: Path, url: str, batch: int, group: str) -> config_mod.Config:
    return config_mod.parse(
        {
            "storage": {"backend": "sqlite", "path": str(db), "synchronous": "full"},
            "rollup": {"bucket_seconds": BUCKET_SECONDS},
            "logging": {"level": "warning"},
            "meters": [METER_CONFIG],
            "ingest": [
                {
                    "backend": "redis_streams",
                    "url": url,
                    "stream": STREAM,
                    "group": group,
                    "consumer": "product-1",
                    "batch_size": batch,
                    "block_ms": 100,
                }
            ],
        }
    )


async def run_product(
    url: str, db: Path, total: int, batch: int, group: str
) -> tuple[float, float, Any]:
    """Wall and CPU seconds of the product's consumer, and its stats."""
    config = _config(db, url, batch, group)
    configure(config.logging)
    progress = Progress("plugin consumer", total)
    async with ControlPlane(config) as plane:  # opened and migrated before the clock starts
        cpu = time.process_time()
        with Stopwatch() as sw:
            [source] = await plane.start_ingest()
            stats = source.stats  # type: ignore[attr-defined]
            while stats.entries + stats.dead_lettered < total:
                await asyncio.sleep(0.005)
                progress.show(stats.entries)
        cpu = time.process_time() - cpu
        progress.show(stats.entries, final=True)
    return sw.seconds, cpu, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.redis_ingest", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000, help="entries per read (batch_size)")
    parser.add_argument("--orgs", type=int, default=1000)
    parser.add_argument("--buckets", type=int, default=24, help="hourly buckets spanned")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="alternate raw and product runs N times; the best of each counts",
    )
    parser.add_argument("--redis-url", help="use this Redis instead of starting one (DB 0 is used)")
    parser.add_argument("--dir", help="where to put the temporary databases (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)

    wl = Workload(events=args.events, orgs=args.orgs, buckets=args.buckets)
    print(f"redis streams ingest benchmark (sqlite, synchronous=full) on {machine()}")
    print(
        f"  {wl.events:,} entries of one event each, reads of {args.batch:,}, "
        f"{wl.orgs:,} orgs over {wl.buckets} hourly buckets, 1 meter"
    )
    server = None
    url = args.redis_url
    if url is None:
        from tests.harness import RedisServer

        server = RedisServer()
        url = server.start()
    work = Path(tempfile.mkdtemp(prefix="cp-bench-redis-", dir=args.dir))
    problems: list[str] = []
    stored: dict[str, Any] = {}
    raw_best = product_best = float("inf")
    try:
        fill_stream(url, wl)
        for rep in range(1, args.repeat + 1):
            run_dir = work / f"run{rep}"
            run_dir.mkdir()
            tag = f" (run {rep})" if args.repeat > 1 else ""
            raw_seconds, raw_cpu = run_raw(
                url, run_dir / "raw.db", wl.events, args.batch, f"raw{rep}"
            )
            raw_best = min(raw_best, raw_seconds)
            label = f"raw XREADGROUP + executemany + XACK{tag}"
            print(
                f"\n  {label:<46}{raw_seconds:8.2f} s {wl.events / raw_seconds:>10,.0f} events/s"
                f"  (CPU {raw_cpu:.1f} s = {raw_cpu / raw_seconds:.0%} of one core)"
            )
            group = f"product{rep}"
            seconds, cpu, stats = asyncio.run(
                run_product(url, run_dir / "product.db", wl.events, args.batch, group)
            )
            product_best = min(product_best, seconds)
            label = f"redis_streams plugin into the product{tag}"
            print(
                f"  {label:<46}{seconds:8.2f} s {wl.events / seconds:>10,.0f} events/s  "
                f"(CPU {cpu:.1f} s = {cpu / seconds:.0%} of one core; retries {stats.retries})"
            )
            found, stored = verify(url, run_dir, stats, wl.events, (f"raw{rep}", group))
            problems += found
            if not args.keep:
                shutil.rmtree(run_dir, ignore_errors=True)

        raw_rate, product_rate = wl.events / raw_best, wl.events / product_best
        print()
        if args.repeat > 1:
            print(
                f"  best of {args.repeat}: raw {raw_rate:,.0f} events/s, "
                f"plugin {product_rate:,.0f} events/s"
            )
        for p in problems:
            print(f"  VERIFY FAILED: {p}")
        if not problems:
            print(
                f"  verified: every entry acknowledged in both groups, none dead-lettered; the "
                f"product's database holds exactly the raw run's rows: "
                f"{stored['usage_events']:,} events, {stored['meter_values']:,} meter values, "
                f"{stored['dirty_buckets']:,} dirty buckets (content hash {stored['sha256']})"
            )
        print(ratio_line("plugin/raw events per second", product_rate / raw_rate, TARGET))
        return 1 if problems else 0
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"  kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def verify(
    url: str, work: Path, stats: Any, sent: int, groups: tuple[str, str]
) -> tuple[list[str], dict[str, Any]]:
    """Problems found, and the digest of what the product stored."""
    import redis

    problems = []
    if stats.accepted != sent or stats.duplicates or stats.dead_lettered:
        problems.append(
            f"accepted {stats.accepted:,} (duplicates {stats.duplicates}, dead-lettered "
            f"{stats.dead_lettered}) of {sent:,}"
        )
    client: Any = redis.Redis.from_url(url)
    for group in groups:
        pending = client.xpending(STREAM, group)["pending"]
        if pending:
            problems.append(f"group {group}: {pending} entries still pending")
    client.close()
    raw_db, product_db = connect(work / "raw.db"), connect(work / "product.db")
    want, got = digest(raw_db), digest(product_db)
    raw_db.close()
    product_db.close()
    if want != got:
        problems.append(f"stored rows differ: product {got} vs raw {want}")
    return problems, got


if __name__ == "__main__":
    sys.exit(main())
