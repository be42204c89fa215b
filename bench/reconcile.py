"""Reconciliation at scale: 10,000 customers x 24 hours of sent usage against the Stripe
emulator's meter event summaries, the calls made against the minimum, and the wall time per
1,000 customers at the emulator and at Stripe's test-mode rate limit.

    python -m bench.reconcile [--customers 10000] [--hours 24] [--paced 100]

Setup (not timed). The emulator is built in this process and filled through its own request
handlers (``create_meter_event``, every Stripe rule applied, no HTTP: 240,000 events over HTTP
would take minutes), then served from a forked process, so it does not share this process's
core. The ledger is a fresh SQLite control plane, migrated, with one `sent` row per (customer,
hour) written by plain SQL, carrying the same identifier, customer, timestamp and units as the
emulator's event. Two differences are planted: every 1,000th customer's event of hour 3 never
reached Stripe (short), and the customer after it has 5 extra units in hour 5 from elsewhere
(over).

Timed: one ``Reconciler.run`` over the window, rate limit out of the way. The emulator's
request counter gives the calls made; the minimum is one summaries read per (customer, meter)
(24 hourly summaries fit one page of 100) plus the one meter lookup. Checks: the findings are
exactly the planted cells with their units. Then a run over ``--paced`` customers with the
plugin's rate limit at Stripe's test-mode 25/s shows the reads stay inside it (calls per
second measured). The time at 25/s per 1,000 customers is computed from the calls: the
provider's limit, not this machine, bounds it.

The last line is the ratio of minimum calls to calls made (1.00: no call more than needed).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import socket
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench._common import BUCKET_SECONDS, METER, METER_CONFIG, connect, machine, ratio_line
from controlplane import config as config_mod
from controlplane.core import ControlPlane
from controlplane.logs import configure
from stripe_emulator import StripeEmulator, serve_emulator
from stripe_emulator.params import ApiRequest

API_KEY = "sk_test_bench_reconcile"
HOUR = 3600
TEST_MODE_RATE = 25.0  # Stripe's test-mode limit, calls per second
SHORT_HOUR, OVER_HOUR, EXTRA = 3, 5, 5


def units(customer: int, hour: int) -> int:
    return (customer * 7 + hour) % 50 + 1


def customer_id(i: int) -> str:
    return f"cus_bench{i:06d}"


def identifier(i: int, t: int) -> str:
    return f"o{i}:{METER}:{t}:1"


def planted(customers: int, hours: int, start: int) -> set[tuple[str, int, int, int, str]]:
    """The findings the run must report: (org, hour, ledger, provider, status)."""
    out = set()
    for i in range(0, customers, 1000):
        t = start + SHORT_HOUR * HOUR
        out.add((f"o{i}", t, units(i, SHORT_HOUR), 0, "short"))
        if i + 1 < customers and hours > OVER_HOUR:
            t = start + OVER_HOUR * HOUR
            q = units(i + 1, OVER_HOUR)
            out.add((f"o{i + 1}", t, q, q + EXTRA, "over"))
    return out


def fill_emulator(customers: int, hours: int, start: int) -> StripeEmulator:
    emulator = StripeEmulator(seed=22)
    emulator.add_meter(METER, display_name="GB-seconds")
    for i in range(customers):
        emulator.add_customer(id=customer_id(i))

    def record(i: int, t: int, value: int, ident: str) -> None:
        payload = {"stripe_customer_id": customer_id(i), "value": str(value)}
        params = {"event_name": METER, "payload": payload, "timestamp": str(t), "identifier": ident}
        emulator.create_meter_event(ApiRequest("POST", "/v1/billing/meter_events", params, {}, {}))

    for i in range(customers):
        for h in range(hours):
            if i % 1000 == 0 and h == SHORT_HOUR:
                continue  # never reached Stripe
            record(i, start + h * HOUR, units(i, h), identifier(i, start + h * HOUR))
        if i % 1000 == 1 and hours > OVER_HOUR:
            record(i, start + OVER_HOUR * HOUR + 60, EXTRA, f"elsewhere-{i}")
    return emulator


def fill_ledger(db: Path, customers: int, hours: int, start: int) -> None:
    sent_at = int(time.time()) - 2 * HOUR  # called longer ago than the settle period
    rows = [
        (
            identifier(i, t),
            f"o{i}",
            METER,
            t,
            t + HOUR,
            1,
            units(i, h) * 1_000_000,
            units(i, h),
            sent_at,
            customer_id(i),
            t,
            identifier(i, t),
        )
        for i in range(customers)
        for h in range(hours)
        for t in [start + h * HOUR]
    ]
    conn = connect(db)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO ledger (identifier, org_id, meter, bucket_start, bucket_end, revision,"
        " value_micros, quantity, state, attempts, first_attempt_at, last_attempt_at, sent_at,"
        " created_at, updated_at, attempt_customer, attempt_timestamp, attempt_key)"
        " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'sent', 1, ?9, ?9, ?9, ?9, ?9, ?10, ?11, ?12)",
        rows,
    )
    conn.execute("COMMIT")
    conn.close()


def _serve(emulator: StripeEmulator, port: int) -> None:
    async def forever() -> None:
        async with serve_emulator(emulator, port=port):
            await asyncio.Event().wait()

    asyncio.run(forever())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _state(url: str) -> dict[str, Any]:
    state: dict[str, Any] = httpx.get(f"{url}/_emulator/state", timeout=10).json()
    return state


def requests_made(url: str) -> int:
    return int(_state(url)["requests"])


def _config(db: Path, url: str, rate: float) -> config_mod.Config:
    return config_mod.parse(
        {
            "storage": {"backend": "sqlite", "path": str(db)},
            "rollup": {"bucket_seconds": BUCKET_SECONDS},
            "billing": {
                "backend": "stripe",
                "api_key": API_KEY,
                "api_base": url,
                "rate_limit": rate,
            },
            "reconcile": {"settle_seconds": HOUR},
            "logging": {"level": "error"},
            "meters": [METER_CONFIG],
        }
    )


async def reconcile(
    db: Path, url: str, rate: float, start: int, end: int, org: str | None = None
) -> tuple[Any, int, float]:
    """One run: (the run, calls made, seconds)."""
    async with ControlPlane(_config(db, url, rate)) as cp:
        before = requests_made(url)
        began = time.perf_counter()
        run = await cp.reconciler.run(start, end, org_id=org)
        seconds = time.perf_counter() - began
        return run, requests_made(url) - before, seconds


def paced(db: Path, url: str, customers: int, start: int, end: int) -> tuple[int, float, int]:
    """`customers` customers' reads with the plugin's limit at the test-mode rate, the
    emulator enforcing Stripe's: (calls, seconds, calls the emulator refused with 429)."""
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM ledger WHERE CAST(substr(org_id, 2) AS INTEGER) >= ?", (customers,))
    conn.commit()
    conn.close()
    httpx.post(f"{url}/_emulator/faults", json={"rate_limit": TEST_MODE_RATE}, timeout=10)
    refused = _state(url)["rate_limited"]
    _, calls, seconds = asyncio.run(reconcile(db, url, TEST_MODE_RATE, start, end))
    return calls, seconds, int(_state(url)["rate_limited"]) - int(refused)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reconcile", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--customers", type=int, default=10_000, help="customers, one org each")
    parser.add_argument("--hours", type=int, default=24, help="hours of sent usage each")
    parser.add_argument(
        "--paced",
        type=int,
        default=100,
        help="customers read again at Stripe's test-mode limit, 25 calls/s (0: skip)",
    )
    args = parser.parse_args(argv)
    if not SHORT_HOUR < args.hours <= 100 or args.customers < 2:
        parser.error("--hours must be 4..100 (one page of summaries), --customers at least 2")
    configure(config_mod.LoggingConfig(level="error"))  # the run alerts: planted
    now = int(time.time()) // HOUR * HOUR
    start = now - (args.hours + 6) * HOUR
    end = start + args.hours * HOUR
    print(f"reconcile benchmark (sqlite; Stripe emulator in a forked process) on {machine()}")
    print(
        f"  {args.customers:,} customers x {args.hours} hours = "
        f"{args.customers * args.hours:,} sent rows and meter events, 1 meter; load average "
        f"at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    began = time.perf_counter()
    emulator = fill_emulator(args.customers, args.hours, start)
    work = Path(tempfile.mkdtemp(prefix="cp-bench-reconcile-"))
    db = work / "reconcile.db"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = multiprocessing.get_context("fork").Process(
        target=_serve, args=(emulator, port), daemon=True
    )
    server.start()
    try:
        for _ in range(200):
            try:
                requests_made(url)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        asyncio.run(_migrate(db, url))
        fill_ledger(db, args.customers, args.hours, start)
        print(f"  setup {time.perf_counter() - began:.1f} s (not timed)\n")

        run, calls, seconds = asyncio.run(reconcile(db, url, 1e9, start, end))
        found = {(f.org_id, f.hour, f.ledger, f.provider, f.status) for f in run.findings}
        expected = planted(args.customers, args.hours, start)
        if found != expected:
            print(f"  WRONG findings: {len(found ^ expected)} differ from the planted ones")
            return 1
        minimum = args.customers + 1  # one summaries read per (customer, meter), one meter lookup
        per_thousand = 1000 / args.customers
        print(
            f"  findings: {len(found)} exactly as planted ({run.units_short} units short, "
            f"{run.units_over} over), {run.hours:,} cells compared"
        )
        print(f"  calls made {calls:,}, minimum {minimum:,}")
        print(
            f"  wall time per 1,000 customers at the emulator: {seconds * per_thousand:.2f} s "
            f"({calls / seconds:,.0f} calls/s; {seconds:.1f} s in all)"
        )
        print(
            f"  at Stripe's test-mode limit ({TEST_MODE_RATE:g} calls/s), computed from the "
            f"calls: {calls * per_thousand / TEST_MODE_RATE:.0f} s per 1,000 customers "
            f"({calls / TEST_MODE_RATE / 60:.1f} min for all)"
        )
        if args.paced:
            n = min(args.paced, args.customers)
            paced_calls, paced_seconds, refused = paced(db, url, n, start, end)
            print(
                f"  paced at {TEST_MODE_RATE:g}/s (the emulator enforcing Stripe's limit): {n} "
                f"customers, {paced_calls} calls in {paced_seconds:.1f} s, {refused} refused "
                f"with 429 ({paced_calls / paced_seconds:.1f} calls/s over the run, the first "
                "second's burst included)"
            )
        print(ratio_line("minimum calls / calls made", minimum / calls, 1.0))
        return 0
    finally:
        server.terminate()
        server.join(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


async def _migrate(db: Path, url: str) -> None:
    async with ControlPlane(_config(db, url, 1e9)):
        pass


if __name__ == "__main__":
    sys.exit(main())
