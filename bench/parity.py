"""Parity endpoint latency: GET /internal/usage-parity over 10,000 orgs x 24 hourly buckets.

    python -m bench.parity [--orgs 10000] [--buckets 24] [--per-bucket 1] [--requests 200]

1. Product database (SQLite, migrated by the product): `--per-bucket` usage events per (org,
   bucket), written with sqlite3 `executemany` exactly as ingest writes them (usage_events,
   meter_values, whose triggers keep the per-bucket totals, dirty marks). Each event is one
   sandbox run inside its bucket: `memory_mb` (a multiple of 64) for `interval_s` seconds.
2. Legacy database (SQLite, the `sql` legacy plugin): a `sandbox_runs` table holding the same
   runs (org, memory_mb, started_at, ended_at), indexed on (org_id, started_at, ended_at,
   memory_mb); the configured query clips each run to the window at both ends.
3. `controlplane serve --no-scheduler` in a subprocess; one HTTP client asks for the whole
   window (every bucket, every org) `--requests` times in a row, after `--warmup` requests,
   and, for comparison, the same with `mismatches_only=true` (the summary alone, as the data
   agree), then one-bucket windows, each request the next of the buckets (what the checker
   and an hourly dashboard ask). Latency is from sending the request to having read and
   decoded the whole answer.

Also measured in this process, for scale: the product's per-org query and the legacy query
alone (sqlite3, the same SQL), and the GROUP BY over every meter value that the per-bucket
totals replace. Checks that every answer is `clean`, lists every org, and that both totals
equal the total computed here. Prints p50/p99/max and, last, the ratio of the legacy
query's p99 to the endpoint's (all buckets, every org; target >= 0.67: the endpoint within
1.5x the legacy query it has to run anyway).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec

from bench._common import (
    BUCKET_SECONDS,
    METER,
    METER_CONFIG,
    T0,
    Stopwatch,
    connect,
    machine,
    ratio_line,
    stop_server,
)
from controlplane import config as config_mod
from controlplane.core import ControlPlane
from controlplane.logs import configure
from controlplane.units import format_micros

TARGET_P99_MS = 100.0
PATH = "/internal/usage-parity"

LEGACY_QUERY = """
SELECT org_id,
       printf('%.6f', sum(memory_mb * (min(coalesce(ended_at, :end), :end)
                                       - max(started_at, :start))) / 1024.0)
FROM sandbox_runs
WHERE started_at < :end AND coalesce(ended_at, :end) > :start
GROUP BY org_id
"""

Run = tuple[str, int, int, int]  # org, memory_mb, started_at, ended_at


def runs(orgs: int, buckets: int, per_bucket: int) -> Iterator[Run]:
    """Deterministic sandbox runs, each inside one bucket."""
    for b in range(buckets):
        bucket = T0 + b * BUCKET_SECONDS
        for o in range(orgs):
            for k in range(per_bucket):
                offset = (o * 7 + k * 613) % 3000
                seconds = 1 + (o + b * 31 + k * 17) % 599
                yield (
                    f"org-{o:05d}",
                    64 * (1 + (o + b) % 64),
                    bucket + offset,
                    bucket + offset + seconds,
                )


def micros(mb: int, seconds: int) -> int:
    """mb * seconds / 1024 GB-seconds in micro-units; exact because mb is a multiple of 64."""
    return mb // 64 * seconds * 62_500


def _config(db: Path, legacy_db: Path, port: int, token: str) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"backend": "sqlite", "path": str(db), "synchronous": "full"},
        "auth": {
            "tokens": [
                {
                    "name": "bench",
                    "sha256": hashlib.sha256(token.encode()).hexdigest(),
                    "scopes": ["parity"],
                }
            ]
        },
        "rollup": {"bucket_seconds": BUCKET_SECONDS},
        "logging": {"level": "info", "format": "json"},
        "meters": [METER_CONFIG],
        "parity": {"meter": METER},
        "legacy": {"backend": "sql", "dsn": f"sqlite:///{legacy_db}", "query": LEGACY_QUERY},
    }


def _toml(config: dict[str, Any]) -> str:
    """The config dict as TOML (just the shapes used above)."""

    def value(v: Any) -> str:
        if isinstance(v, str):
            return '"""' + v + '"""' if "\n" in v else msgspec.json.encode(v).decode()
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return str(v)

    out: list[str] = []
    for section, body in config.items():
        if isinstance(body, list):
            for item in body:
                out.append(f"[[{section}]]")
                out.extend(f"{k} = {value(v)}" for k, v in item.items())
        elif "tokens" in body:
            for item in body["tokens"]:
                out.append(f"[[{section}.tokens]]")
                out.extend(f"{k} = {value(v)}" for k, v in item.items())
        else:
            out.append(f"[{section}]")
            out.extend(f"{k} = {value(v)}" for k, v in body.items())
        out.append("")
    return "\n".join(out)


async def _migrate(config: config_mod.Config) -> None:
    async with ControlPlane(config):
        pass


def fill(
    db: Path, legacy_db: Path, orgs: int, buckets: int, per_bucket: int
) -> tuple[int, dict[int, int]]:
    """Both databases; returns (events, micro-units per bucket)."""
    conn = connect(db, synchronous="OFF")
    legacy = sqlite3.connect(legacy_db, isolation_level=None)
    legacy.execute(
        "CREATE TABLE sandbox_runs (id INTEGER PRIMARY KEY, org_id TEXT NOT NULL,"
        " memory_mb INTEGER NOT NULL, started_at INTEGER NOT NULL, ended_at INTEGER)"
    )
    now = int(time.time())
    pk = 0
    totals: dict[int, int] = {}
    all_runs = list(runs(orgs, buckets, per_bucket))
    conn.execute("BEGIN IMMEDIATE")
    legacy.execute("BEGIN")
    for start in range(0, len(all_runs), 50_000):
        chunk = all_runs[start : start + 50_000]
        events, values, dirty = [], [], set()
        for org, mb, started, ended in chunk:
            pk += 1
            bucket = started - started % BUCKET_SECONDS
            value = micros(mb, ended - started)
            totals[bucket] = totals.get(bucket, 0) + value
            data = f'{{"memory_mb":{mb},"interval_s":{ended - started}}}'
            events.append((pk, "bench", f"run-{pk}", "usage_tick", org, started * 1000, data, now))
            values.append((pk, METER, org, bucket, value))
            dirty.add((org, bucket))
        conn.executemany(
            "INSERT INTO usage_events (id, source, event_id, type, org_id, time_ms, data,"
            " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            events,
        )
        conn.executemany(
            "INSERT INTO meter_values (event_pk, meter, org_id, bucket_start, micros)"
            " VALUES (?, ?, ?, ?, ?)",
            values,
        )
        conn.executemany(
            "INSERT OR IGNORE INTO dirty_buckets (org_id, bucket_start) VALUES (?, ?)",
            sorted(dirty),
        )
        legacy.executemany(
            "INSERT INTO sandbox_runs (org_id, memory_mb, started_at, ended_at)"
            " VALUES (?, ?, ?, ?)",
            chunk,
        )
    conn.execute("COMMIT")
    legacy.execute("COMMIT")
    legacy.execute(
        "CREATE INDEX sandbox_runs_by_org ON sandbox_runs (org_id, started_at, ended_at, memory_mb)"
    )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    legacy.close()
    return pk, totals


def _timed(conn: sqlite3.Connection, sql: str, params: dict[str, Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        with Stopwatch() as sw:
            conn.execute(sql, params).fetchall()
        out.append(sw.seconds)
    return out


def raw_queries(db: Path, legacy_db: Path, start: int, end: int, n: int) -> dict[str, list[float]]:
    from controlplane.plugins.storage.sqlite import Q

    conn = connect(db)
    legacy = sqlite3.connect(f"file:{legacy_db}?mode=ro", uri=True)
    window = {"meter": METER, "start": start, "end": end}
    out = {
        "product per-org query (bucket_totals)": _timed(conn, Q["usage_by_org"], window, n),
        "legacy query (sandbox_runs)": _timed(legacy, LEGACY_QUERY, window, n),
        "GROUP BY over meter_values instead": _timed(
            conn,
            "SELECT org_id, sum(micros) FROM meter_values WHERE meter = :meter"
            " AND bucket_start >= :start AND bucket_start < :end GROUP BY org_id",
            window,
            max(3, n // 4),
        ),
    }
    conn.close()
    legacy.close()
    return out


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(label: str, values: list[float]) -> str:
    return (
        f"  {label:<42} p50 {1000 * statistics.median(values):7.1f} ms   "
        f"p99 {_ms(values, 0.99):7.1f} ms   max {1000 * max(values):7.1f} ms   (n={len(values)})"
    )


def measure(
    base: str, token: str, params: Callable[[int], dict[str, Any]], requests: int, warmup: int
) -> tuple[list[float], list[dict[str, Any]]]:
    """Latencies of `requests` GETs in a row (after `warmup`), and the first and last answer."""
    latencies: list[float] = []
    bodies: list[dict[str, Any]] = []
    with httpx.Client(base_url=base, headers={"authorization": f"Bearer {token}"}) as http:
        for i in range(warmup + requests):
            started = time.perf_counter()
            response = http.get(PATH, params=params(i), timeout=60)
            body = msgspec.json.decode(response.content)
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
            if i >= warmup:
                latencies.append(elapsed)
                if i in (warmup, warmup + requests - 1):
                    bodies.append(body)
    return latencies, bodies


def _wait_ready(proc: subprocess.Popen[bytes], base: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after 60 s:\n{log.read_text()[-2000:]}")


def verify(
    body: dict[str, Any], orgs: int, total: int, listed: bool, legacy: bool = True
) -> list[str]:
    problems = []
    s = body["summary"]
    expected = format_micros(total)
    if s["status"] != ("clean" if legacy else "no_legacy") or s["mismatches"]:
        problems.append(f"status {s['status']} with {s['mismatches']} mismatches")
    if s["orgs"] != orgs or (listed and len(body["orgs"]) != orgs):
        problems.append(f"{s['orgs']} orgs in the summary, {len(body['orgs'])} listed")
    if s["totals"]["controlplane"] != expected or s["totals"]["legacy"] != (
        expected if legacy else None
    ):
        problems.append(f"totals {s['totals']} != {expected}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.parity", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--orgs", type=int, default=10_000)
    parser.add_argument("--buckets", type=int, default=24, help="hourly buckets, all queried")
    parser.add_argument("--per-bucket", type=int, default=1, help="events per (org, bucket)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--dir", help="where to put the temporary databases (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--without-legacy",
        action="store_true",
        help="configure no legacy source: the endpoint serves the control plane's side only",
    )
    args = parser.parse_args(argv)

    configure(config_mod.LoggingConfig(level="warning"))
    work = Path(tempfile.mkdtemp(prefix="cp-bench-parity-", dir=args.dir))
    db, legacy_db = work / "parity.db", work / "legacy.db"
    token = "cp_bench_" + secrets.token_urlsafe(16)
    port = _free_port()
    raw = _config(db, legacy_db, port, token)
    if args.without_legacy:
        del raw["legacy"]
    start, end = T0, T0 + args.buckets * BUCKET_SECONDS
    print(f"parity benchmark (sqlite) on {machine()}")
    print(
        f"  {args.orgs:,} orgs x {args.buckets} hourly buckets x {args.per_bucket} event(s); "
        + (
            "no legacy source configured"
            if args.without_legacy
            else "legacy table of the same runs"
        )
        + f"; window [{start}, {end}), every org listed"
    )
    proc: subprocess.Popen[bytes] | None = None
    try:
        asyncio.run(_migrate(config_mod.parse(raw)))
        with Stopwatch() as sw:
            events, totals = fill(db, legacy_db, args.orgs, args.buckets, args.per_bucket)
        total = sum(totals.values())
        print(f"  filled {events:,} events and {events:,} legacy runs in {sw.seconds:.1f} s\n")

        queries = raw_queries(db, legacy_db, start, end, 30)
        for label, values in queries.items():
            print(summary(label, values))
        legacy_runs = next(v for k, v in queries.items() if k.startswith("legacy query"))

        config_file = work / "server.toml"
        config_file.write_text(_toml(raw))
        log = work / "server.log"
        with log.open("wb") as out:
            serve = ["serve", "--config", str(config_file), "--no-scheduler"]
            proc = subprocess.Popen(
                [sys.executable, "-m", "controlplane", *serve],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        base = f"http://127.0.0.1:{port}"
        _wait_ready(proc, base, log)
        window = {"from": start, "to": end}
        full, bodies = measure(base, token, lambda i: window, args.requests, args.warmup)
        brief, brief_bodies = measure(
            base,
            token,
            lambda i: {**window, "mismatches_only": "true"},
            args.requests,
            args.warmup,
        )

        def one_bucket(i: int) -> dict[str, Any]:
            bucket = start + (i % args.buckets) * BUCKET_SECONDS
            return {"from": bucket, "to": bucket + BUCKET_SECONDS}

        hourly, hourly_bodies = measure(base, token, one_bucket, args.requests, args.warmup)
        size = len(msgspec.json.encode(bodies[0])) / 2**20
        print(summary(f"endpoint, all buckets, every org ({size:.1f} MiB)", full))
        print(summary("endpoint, all buckets, mismatches_only", brief))
        print(summary("endpoint, one bucket, every org", hourly))

        legacy = not args.without_legacy
        problems = [p for b in bodies for p in verify(b, args.orgs, total, True, legacy)]
        problems += [p for b in brief_bodies for p in verify(b, args.orgs, total, False, legacy)]
        for b in hourly_bodies:
            problems += verify(b, args.orgs, totals[b["from"]], True, legacy)
        print()
        if problems:
            for p in problems:
                print(f"  VERIFY FAILED: {p}")
        else:
            print(
                f"  verified: every answer {'clean' if legacy else 'no_legacy'}, "
                f"{args.orgs:,} orgs, {'both totals' if legacy else 'total'} "
                f"{format_micros(total)} GB-s as computed here"
            )
        p99 = _ms(full, 0.99)
        print(
            f"  endpoint p99 {p99:.1f} ms over all {args.buckets} buckets (the first round's "
            f"target <= {TARGET_P99_MS:.0f} ms: {'met' if p99 <= TARGET_P99_MS else 'MISSED'}), "
            f"{_ms(hourly, 0.99):.1f} ms for one bucket"
        )
        ratio = _ms(legacy_runs, 0.99) / p99
        print(ratio_line("legacy query p99 / endpoint p99 (all buckets, every org)", ratio, 0.67))
        return 1 if problems else 0
    finally:
        if proc is not None:
            stop_server(proc)
        if args.keep:
            print(f"  kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
