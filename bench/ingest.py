"""Ingest throughput: the real server over HTTP against raw inserts of the same rows.

    python -m bench.ingest [--events 200000] [--clients 4] [--batch 1000] [--storage sqlite]
    python -m bench.ingest --storage postgres [--dsn postgresql://user@host/postgres]

With `--storage postgres` both runs use fresh databases on one PostgreSQL server (`--dsn`
names a database to connect to for creating them; without it a throwaway server is started
from the machine's PostgreSQL binaries, as the tests do). The raw baseline there is asyncpg:
`copy_records_to_table` for events and meter values, one multi-row upsert each for the
per-bucket totals and dirty marks, one transaction per batch.

1. Server: `controlplane serve --no-scheduler` in a subprocess on a temporary SQLite file;
   `--clients` httpx.AsyncClient tasks post pre-encoded JSON arrays of `--batch` events to
   /v1/events until all are sent. Timed from the first request to the last response; every
   response must be 200 with `accepted` equal to the batch size.
2. Raw: a fresh SQLite file with the same migrations and PRAGMAs (WAL, synchronous FULL);
   the same usage_events, meter_values and dirty_buckets rows, one `BEGIN IMMEDIATE` ...
   `COMMIT` per batch with `executemany`.

Both databases must end up with identical content (checked by hash, ignoring primary keys
and commit order). Prints both rates and the ratio server/raw.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec

from bench._common import (
    METER_TOML,
    Stopwatch,
    Workload,
    apply_migrations,
    batches,
    connect,
    digest,
    machine,
    process_cpu_seconds,
    ratio_line,
    rows_for,
    stop_server,
)

TARGET = 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(db: Path, port: int, token: str, storage: str | None = None) -> str:
    storage = storage or f'backend = "sqlite"\npath = "{db}"\nsynchronous = "full"'
    return f"""
[server]
host = "127.0.0.1"
port = {port}

[storage]
{storage}

[[auth.tokens]]
name = "bench"
sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"
scopes = ["ingest", "read"]

[logging]
level = "info"
format = "json"
{METER_TOML}"""


class ServerRun(msgspec.Struct):
    seconds: float
    accepted: int
    duplicates: int
    latencies: list[float]
    cpu_seconds: float | None
    client_cpu_seconds: float


async def _post_all(
    base: str,
    token: str,
    bodies: list[bytes],
    sizes: list[int],
    clients: int,
    on_done: Callable[[int], None] | None = None,
) -> tuple[int, int, list[float]]:
    queue = iter(range(len(bodies)))
    accepted = duplicates = 0
    latencies: list[float] = []

    async def client() -> None:
        nonlocal accepted, duplicates
        headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as http:
            for n in queue:
                started = time.perf_counter()
                resp = await http.post("/v1/events", content=bodies[n])
                latencies.append(time.perf_counter() - started)
                if resp.status_code != 200:
                    raise RuntimeError(f"batch {n}: HTTP {resp.status_code}: {resp.text[:300]}")
                body = resp.json()
                if body["accepted"] != sizes[n]:
                    raise RuntimeError(f"batch {n}: accepted {body} of {sizes[n]}")
                accepted += body["accepted"]
                duplicates += body["duplicates"]
                if on_done is not None:
                    on_done(body["accepted"])

    await asyncio.gather(*(client() for _ in range(clients)))
    return accepted, duplicates, latencies


def prepare(
    wl: Workload, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[bytes], list[int]]:
    """Print the workload line; the events, each request's JSON body and its event count."""
    print(
        f"  {wl.events:,} events, batches of {args.batch:,}, {args.clients} clients, "
        f"{wl.orgs:,} orgs over {wl.buckets} hourly buckets, 1 meter"
    )
    events = [wl.event(i) for i in range(wl.events)]
    encode = msgspec.json.Encoder().encode
    bodies = [encode(events[r.start : r.stop]) for r in batches(wl.events, args.batch)]
    sizes = [len(r) for r in batches(wl.events, args.batch)]
    return events, bodies, sizes


def run_server(
    work: Path, bodies: list[bytes], sizes: list[int], clients: int, storage: str | None = None
) -> ServerRun:
    """`storage`: the [storage] table's body (default: SQLite in `work`)."""
    token = "cp_bench_" + secrets.token_urlsafe(16)
    port = _free_port()
    config = work / "server.toml"
    config.write_text(_config(work / "server.db", port, token, storage))
    log = (work / "server.log").open("wb")
    serve = ["serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane", *serve, "--no-scheduler"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, base, work / "server.log")
        cpu_before = process_cpu_seconds(proc.pid)
        client_before = time.process_time()
        with Stopwatch() as sw:
            accepted, duplicates, latencies = asyncio.run(
                _post_all(base, token, bodies, sizes, clients)
            )
        client_cpu = time.process_time() - client_before
        cpu_after = process_cpu_seconds(proc.pid)
    finally:
        stop_server(proc)
        log.close()
    cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    return ServerRun(sw.seconds, accepted, duplicates, latencies, cpu, client_cpu)


def _wait_ready(proc: subprocess.Popen[bytes], base: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                ready = httpx.get(f"{base}/readyz", timeout=5)  # storage opened, migrated
                if ready.status_code == 200:
                    return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after 60 s:\n{log.read_text()[-2000:]}")


def run_raw(db: Path, events: list[dict[str, Any]], batch: int) -> float:
    conn = connect(db)
    apply_migrations(conn)
    received_at = int(time.time())
    prepared = []
    pk = 1
    for r in batches(len(events), batch):
        prepared.append(rows_for(events[r.start : r.stop], pk, received_at))
        pk += len(r)
    insert_event = (
        "INSERT INTO usage_events (id, source, event_id, type, org_id, time_ms, data, received_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    )
    insert_value = (
        "INSERT INTO meter_values (event_pk, meter, org_id, bucket_start, micros)"
        " VALUES (?, ?, ?, ?, ?)"
    )
    mark_dirty = "INSERT OR IGNORE INTO dirty_buckets (org_id, bucket_start) VALUES (?, ?)"
    with Stopwatch() as sw:
        for event_rows, value_rows, dirty in prepared:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(insert_event, event_rows)
            conn.executemany(insert_value, value_rows)
            conn.executemany(mark_dirty, dirty)
            conn.execute("COMMIT")
    conn.close()
    return sw.seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--storage", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--dsn", help="postgres: an existing server (default: start one)")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000, help="events per request")
    parser.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    parser.add_argument("--orgs", type=int, default=1000)
    parser.add_argument("--buckets", type=int, default=24, help="hourly buckets spanned")
    parser.add_argument("--dir", help="where to put the temporary databases (default: system temp)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="alternate raw and server runs N times; the best of each counts",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)

    wl = Workload(events=args.events, orgs=args.orgs, buckets=args.buckets)
    if args.storage == "postgres":
        from bench.ingest_postgres import main as postgres_main

        return postgres_main(args, wl)
    print(f"ingest benchmark ({args.storage}, synchronous=full) on {machine()}")
    events, bodies, sizes = prepare(wl, args)
    print(f"  {len(bodies)} requests, {sum(map(len, bodies)) / len(bodies) / 1024:,.0f} KiB each")

    work = Path(tempfile.mkdtemp(prefix="cp-bench-ingest-", dir=args.dir))
    problems: list[str] = []
    stored: dict[str, Any] = {}
    raw_best = server_best = float("inf")
    try:
        for rep in range(1, args.repeat + 1):
            run_dir = work / f"run{rep}"
            run_dir.mkdir()
            tag = f" (run {rep})" if args.repeat > 1 else ""
            raw_seconds = run_raw(run_dir / "raw.db", events, args.batch)
            raw_best = min(raw_best, raw_seconds)
            label = f"raw sqlite3 executemany{tag}"
            print(
                f"\n  {label:<34}{raw_seconds:8.2f} s "
                f"{wl.events / raw_seconds:>10,.0f} events/s  "
                f"({raw_seconds / len(bodies) * 1000:.1f} ms per batch transaction)"
            )

            server = run_server(run_dir, bodies, sizes, args.clients)
            server_best = min(server_best, server.seconds)
            lat = sorted(server.latencies)
            p95 = lat[min(len(lat) - 1, int(len(lat) * 0.95))]
            cpu = (
                f", server CPU {server.cpu_seconds:.1f} s "
                f"= {server.cpu_seconds / server.seconds:.0%} of one core"
                if server.cpu_seconds is not None
                else ""
            ) + f"; client CPU {server.client_cpu_seconds:.1f} s"
            label = f"server HTTP end to end{tag}"
            print(
                f"  {label:<34}{server.seconds:8.2f} s "
                f"{server.accepted / server.seconds:>10,.0f} events/s  "
                f"(request p50 {statistics.median(lat) * 1000:.0f} ms, "
                f"p95 {p95 * 1000:.0f} ms{cpu})"
            )
            found, stored = verify(run_dir, server, wl.events)
            problems += found
            if not args.keep:
                shutil.rmtree(run_dir, ignore_errors=True)

        raw_rate, server_rate = wl.events / raw_best, wl.events / server_best
        print()
        if args.repeat > 1:
            print(
                f"  best of {args.repeat}: raw {raw_rate:,.0f} events/s, "
                f"server {server_rate:,.0f} events/s"
            )
        for p in problems:
            print(f"  VERIFY FAILED: {p}")
        if not problems:
            print(
                f"  verified: every response 200 with accepted = batch size; the server's "
                f"database holds exactly the raw run's rows: {stored['usage_events']:,} events, "
                f"{stored['meter_values']:,} meter values, {stored['dirty_buckets']:,} dirty "
                f"buckets (content hash {stored['sha256']})"
            )
        print(ratio_line("server/raw events per second", server_rate / raw_rate, TARGET))
        return 1 if problems else 0
    finally:
        if args.keep:
            print(f"  kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def verify(run_dir: Path, server: ServerRun, sent: int) -> tuple[list[str], dict[str, Any]]:
    """Problems found, and the digest of what the server stored."""
    problems = []
    if server.accepted != sent or server.duplicates:
        problems.append(
            f"accepted {server.accepted:,} (duplicates {server.duplicates}) of {sent:,} sent"
        )
    raw_db, server_db = connect(run_dir / "raw.db"), connect(run_dir / "server.db")
    want, got = digest(raw_db), digest(server_db)
    raw_db.close()
    server_db.close()
    if want != got:
        problems.append(f"stored rows differ: server {got} vs raw {want}")
    return problems, got


if __name__ == "__main__":
    sys.exit(main())
