"""Send throughput: ledger rows the sender delivers to the Stripe emulator, against the
emulator's raw intake through the same Stripe SDK, measured in the same run.

    python -m bench.send [--orgs 200] [--buckets 20] [--concurrency 8] [--rounds 2]
                         [--latency-ms 0]

The emulator runs in its own process (``controlplane stripe-emulator --quiet``, no rate limit,
no faults), so it does not share this process's event loop or core; every run starts from
``POST /_emulator/reset`` and creates one meter and ``--orgs`` customers through the official
``stripe`` SDK. ``--latency-ms`` makes the emulator wait before each API request, as the
network to Stripe does; at 0 both sides are bound by this process's CPU. Each round runs:

1. Raw (the baseline): one ``stripe.StripeClient`` on ``stripe.HTTPXClient``, no SDK retries,
   ``--concurrency`` workers each awaiting ``meter_events.create_async`` with an idempotency
   key, one event per (org, hour), hour by hour, so calls in flight never share a customer.
   The SDK, not the emulator, is the ceiling (a few hundred calls/s per process), so this is
   what any SDK-based sender could reach.
2. Product: a fresh SQLite control plane with ``[billing] backend = "stripe"`` pointed at the
   emulator (client rate limit out of the way), orgs on plan ``pro`` mapped to the customers,
   flags set to send from the first bucket; events ingested and rolled up into ``--orgs`` x
   ``--buckets`` pending rows ending an hour ago. Timed: ``ControlPlane.send()`` passes until
   one makes no call. Every storage call (``sendable``, ``record_attempts``, ``settle``...) and
   provider call is wrapped on the instance to note its start and end, which splits the wall
   time into: some call in flight; storage busy and no call in flight; neither.

The best raw and the best product run count (the machine may be shared; alternating rounds
expose both to the same neighbours). Then, for information only, the same events by plain
``httpx`` without the SDK.

Checks, every round: each ledger row is ``sent``; the emulator accepted exactly that many
meter events, none twice; per customer, the emulator's meter total equals the ledger's
quantities. Prints rows/s of product and raw, the ratio product/raw, and where the product's
time went.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx
import msgspec
import stripe

from bench._common import (
    BUCKET_SECONDS,
    EVENT_TYPE,
    METER,
    SOURCE,
    Stopwatch,
    batches,
    connect,
    machine,
    micros_of,
    process_cpu_seconds,
    ratio_line,
)
from controlplane import config as config_mod
from controlplane.core import ControlPlane
from controlplane.flags import FlagChange
from controlplane.logs import configure
from controlplane.plugins.billing.stripe import StripeBilling
from controlplane.sender import SendStats
from controlplane.units import MICROS

T = TypeVar("T")

TARGET = 0.8
API_KEY = "sk_test_bench"
EVENTS_PER_ROW = 2
MAX_PASSES = 5


# workload ---------------------------------------------------------------------------------


class Workload(msgspec.Struct, frozen=True):
    """`orgs` x `buckets` (org, hour) pairs ending one hour before `now`, each with
    EVENTS_PER_ROW events worth at least one whole unit, so every ledger row needs a call."""

    orgs: int
    buckets: int
    first_bucket: int

    @classmethod
    def ending_now(cls, orgs: int, buckets: int) -> Workload:
        current = int(time.time()) // BUCKET_SECONDS * BUCKET_SECONDS
        return cls(orgs, buckets, current - (buckets + 1) * BUCKET_SECONDS)

    @property
    def rows(self) -> int:
        return self.orgs * self.buckets

    @property
    def until(self) -> int:
        return self.first_bucket + self.buckets * BUCKET_SECONDS

    def org(self, o: int) -> str:
        return f"org-{o:05d}"

    def bucket(self, b: int) -> int:
        return self.first_bucket + b * BUCKET_SECONDS

    def data(self, o: int, b: int, k: int) -> dict[str, int]:
        return {"memory_mb": 1024 + (o * 31 + b * 7 + k) % 3072, "interval_s": 60}

    def events(self) -> Iterator[dict[str, Any]]:
        """Every event, in time order (as live traffic arrives)."""
        for b in range(self.buckets):
            for k in range(EVENTS_PER_ROW):
                for o in range(self.orgs):
                    yield {
                        "id": f"evt-{o}-{b}-{k}",
                        "type": EVENT_TYPE,
                        "subject": self.org(o),
                        "ts": (self.bucket(b) + 60 * (k + 1) + o % 60) * 1000,
                        "data": self.data(o, b, k),
                    }

    def quantity(self, o: int, b: int) -> int:
        """Whole units of one (org, hour), for the raw baseline's request bodies."""
        return sum(micros_of(self.data(o, b, k)) for k in range(EVENTS_PER_ROW)) // MICROS


class RawEvent(msgspec.Struct, frozen=True):
    identifier: str
    customer: str
    value: int
    timestamp: int

    def params(self) -> dict[str, Any]:
        return {
            "event_name": METER,
            "identifier": self.identifier,
            "timestamp": self.timestamp,
            "payload": {"stripe_customer_id": self.customer, "value": str(self.value)},
        }


def raw_events(wl: Workload, customers: Sequence[str], tag: str) -> list[RawEvent]:
    """One event per (org, hour), hour by hour, so neighbours never share a customer."""
    return [
        RawEvent(f"{tag}-{o}-{b}", customers[o], wl.quantity(o, b), wl.bucket(b))
        for b in range(wl.buckets)
        for o in range(wl.orgs)
    ]


# the emulator -----------------------------------------------------------------------------


class Emulator:
    """`controlplane stripe-emulator` in a subprocess, and its test hooks."""

    def __init__(self, work: Path, latency_ms: float = 0.0) -> None:
        self.latency_ms = latency_ms
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "emulator.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controlplane",
                "stripe-emulator",
                "--port",
                str(self.port),
                "--quiet",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"emulator exited with {self.proc.returncode}:\n"
                    f"{self.log_path.read_text()[-2000:]}"
                )
            with contextlib.suppress(httpx.TransportError):
                self.state()
                return
            time.sleep(0.1)
        raise RuntimeError("emulator not ready after 30 s")

    def state(self) -> dict[str, Any]:
        resp = httpx.get(f"{self.url}/_emulator/state", timeout=10)
        resp.raise_for_status()
        return dict(resp.json())

    def reset(self) -> None:
        """Forget everything; no faults, except `latency_ms` before each API request if set."""
        httpx.post(f"{self.url}/_emulator/reset", timeout=10).raise_for_status()
        if self.latency_ms:
            resp = httpx.post(
                f"{self.url}/_emulator/faults", json={"latency_ms": self.latency_ms}, timeout=10
            )
            resp.raise_for_status()
        faults = self.state()["faults"]
        if faults["rate_limit"] or any(v for k, v in faults.items() if k != "latency_ms"):
            raise RuntimeError(f"emulator has faults set: {faults}")

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.proc.pid) or 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _client(url: str) -> tuple[stripe.StripeClient, stripe.HTTPXClient]:
    http = stripe.HTTPXClient(timeout=30)
    client = stripe.StripeClient(
        API_KEY, base_addresses={"api": url}, http_client=http, max_network_retries=0
    )
    return client, http


async def fresh_account(emulator: Emulator, orgs: int, concurrency: int) -> list[str]:
    """Reset the emulator, then create the meter and `orgs` customers through the SDK."""
    emulator.reset()
    client, http = _client(emulator.url)
    try:
        await client.v1.billing.meters.create_async(
            params={
                "display_name": "Memory (GB-seconds)",
                "event_name": METER,
                "default_aggregation": {"formula": "sum"},
                "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
                "value_settings": {"event_payload_key": "value"},
            }
        )

        async def create(o: int) -> str:
            customer = await client.v1.customers.create_async(params={"name": f"org-{o:05d}"})
            return str(customer.id)

        return await _bounded(create, orgs, concurrency)
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]


async def _bounded(call: Callable[[int], Awaitable[T]], n: int, limit: int) -> list[T]:
    """`call(0)` ... `call(n - 1)`, at most `limit` at a time; results in order."""
    slots = asyncio.Semaphore(limit)

    async def one(i: int) -> T:
        async with slots:
            return await call(i)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


# raw baselines ----------------------------------------------------------------------------


class Timing(msgspec.Struct):
    seconds: float
    count: int
    emulator_cpu: float
    own_cpu: float
    latencies: list[float] = []

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def cpu(self) -> str:
        return (
            f"CPU: emulator {self.emulator_cpu / self.seconds:.0%}, "
            f"this process {self.own_cpu / self.seconds:.0%} of a core"
        )


async def _drain(
    events: Sequence[RawEvent], workers: int, post: Callable[[RawEvent], Awaitable[None]]
) -> list[float]:
    queue = iter(events)
    latencies: list[float] = []

    async def worker() -> None:
        for event in queue:
            started = time.perf_counter()
            await post(event)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return latencies


async def raw_sdk(emulator: Emulator, wl: Workload, concurrency: int, tag: str) -> Timing:
    """The same meter events through the Stripe SDK, `concurrency` in flight."""
    customers = await fresh_account(emulator, wl.orgs, concurrency)
    events = raw_events(wl, customers, tag)
    client, http = _client(emulator.url)

    async def post(event: RawEvent) -> None:
        await client.v1.billing.meter_events.create_async(
            params=event.params(),  # type: ignore[arg-type]
            options={"idempotency_key": event.identifier},
        )

    try:
        timing = await _timed(emulator, len(events), lambda: _drain(events, concurrency, post))
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
    _expect_accepted(emulator, len(events), f"raw SDK run {tag}")
    return timing


async def raw_httpx(emulator: Emulator, wl: Workload, concurrency: int) -> Timing:
    """The same requests as the SDK makes (form body, auth, idempotency key), by plain httpx."""
    customers = await fresh_account(emulator, wl.orgs, concurrency)
    events = raw_events(wl, customers, "httpx")
    headers = {
        "authorization": f"Bearer {API_KEY}",
        "content-type": "application/x-www-form-urlencoded",
    }
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=emulator.url, headers=headers, limits=limits) as http:

        async def post(event: RawEvent) -> None:
            body = urlencode(
                {
                    "event_name": METER,
                    "identifier": event.identifier,
                    "timestamp": event.timestamp,
                    "payload[stripe_customer_id]": event.customer,
                    "payload[value]": event.value,
                }
            )
            resp = await http.post(
                "/v1/billing/meter_events",
                content=body,
                headers={"idempotency-key": event.identifier},
            )
            resp.raise_for_status()

        timing = await _timed(emulator, len(events), lambda: _drain(events, concurrency, post))
    _expect_accepted(emulator, len(events), "raw httpx run")
    return timing


async def _timed(
    emulator: Emulator, count: int, work: Callable[[], Awaitable[list[float]]]
) -> Timing:
    cpu, own = emulator.cpu_seconds(), time.process_time()
    with Stopwatch() as sw:
        latencies = await work()
    return Timing(
        sw.seconds, count, emulator.cpu_seconds() - cpu, time.process_time() - own, latencies
    )


def _expect_accepted(emulator: Emulator, count: int, what: str) -> None:
    accepted = emulator.state()["meter_events_accepted"]
    if accepted != count:
        raise RuntimeError(f"{what}: the emulator accepted {accepted} of {count} meter events")


# the product ------------------------------------------------------------------------------


STORAGE_METHODS = ("sendable", "record_attempts", "settle", "release_attempts")
CALLS, STORAGE, NEITHER = "calls in flight", "storage, no call in flight", "neither"


class Timeline:
    """Start and end of every call to chosen async methods (wrapped on the instance), to split
    a run's wall time by what was in progress, whatever overlaps the sender arranges."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int, str]] = []  # (time, +1 start / -1 end, kind)
        self.durations: dict[str, list[float]] = defaultdict(list)

    def wrap(self, obj: object, name: str, kind: str) -> None:
        original: Callable[..., Awaitable[Any]] = getattr(obj, name)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            self.marks.append((started, 1, kind))
            try:
                return await original(*args, **kwargs)
            finally:
                ended = time.perf_counter()
                self.marks.append((ended, -1, kind))
                self.durations[name].append(ended - started)

        setattr(obj, name, timed)

    def split(self, start: float, end: float) -> dict[str, float]:
        """Wall time from `start` to `end` with a call in flight; else with storage busy; else
        neither (the sender's own code and the event loop)."""
        out = dict.fromkeys((CALLS, STORAGE, NEITHER), 0.0)
        active: dict[str, int] = defaultdict(int)
        at = start
        for t, step, kind in sorted(self.marks):
            out[CALLS if active[CALLS] else STORAGE if active[STORAGE] else NEITHER] += t - at
            active[kind] += step
            at = t
        out[NEITHER] += end - at
        return out


class ProductRun(msgspec.Struct):
    timing: Timing
    passes: list[SendStats]
    split: dict[str, float]  # CALLS / STORAGE / NEITHER -> seconds
    storage: dict[str, list[float]]  # method -> durations
    states: dict[str, int]
    accepted: int
    emulator_state: dict[str, Any]
    total_mismatches: list[str]


def _config(db: Path, url: str, concurrency: int) -> config_mod.Config:
    return config_mod.parse(
        {
            "storage": {"backend": "sqlite", "path": str(db), "synchronous": "full"},
            "rollup": {"bucket_seconds": BUCKET_SECONDS},
            "sender": {"concurrency": concurrency},
            "billing": {
                "backend": "stripe",
                "api_key": API_KEY,
                "api_base": url,
                "rate_limit": 100_000.0,
            },
            "logging": {"level": "warning"},
            "meters": [
                {
                    "name": METER,
                    "event_type": EVENT_TYPE,
                    "value": "data.memory_mb * data.interval_s / 1024",
                    "where": "data.memory_mb > 0",
                    "unit": "GB-second",
                }
            ],
        }
    )


async def product(emulator: Emulator, wl: Workload, db: Path, concurrency: int) -> ProductRun:
    """Set up a control plane with `wl.rows` pending rows, time sending them all, check."""
    customers = await fresh_account(emulator, wl.orgs, concurrency)
    async with ControlPlane(_config(db, emulator.url, concurrency)) as cp:
        for o, customer in enumerate(customers):
            await cp.set_org(
                wl.org(o), customer=customer, plan="pro", actor="bench", effective_from=0
            )
        await cp.set_flags(
            [
                FlagChange("authority", "controlplane"),
                FlagChange("bill_from", wl.first_bucket),
                FlagChange("shadow", False),
            ],
            actor="bench",
            reason="send benchmark",
        )
        events = list(wl.events())
        for r in batches(len(events), cp.config.server.max_batch_events):
            await cp.ingest(events[r.start : r.stop], SOURCE)
        rolled = await cp.rollup(until=wl.until)
        if rolled.pending != wl.rows:
            raise RuntimeError(f"rollup wrote {rolled.pending} pending rows, expected {wl.rows}")

        timeline = Timeline()
        for name in STORAGE_METHODS:
            timeline.wrap(cp.storage, name, STORAGE)
        assert cp.billing is not None
        timeline.wrap(cp.billing, "send", CALLS)
        passes: list[SendStats] = []

        async def send_all() -> list[float]:
            while len(passes) < MAX_PASSES:
                passes.append(await cp.send())
                if not passes[-1].calls and not passes[-1].retry and not passes[-1].ambiguous:
                    break
            return timeline.durations["send"]

        started = time.perf_counter()
        timing = await _timed(emulator, wl.rows, send_all)
        split = timeline.split(started, started + timing.seconds)
        storage = {n: timeline.durations[n] for n in STORAGE_METHODS}
        mismatches = await _compare_totals(cp, wl, customers, concurrency)

    conn = connect(db)
    states = dict(conn.execute("SELECT state, count(*) FROM ledger GROUP BY state").fetchall())
    conn.close()
    state = emulator.state()
    return ProductRun(
        timing, passes, split, storage, states, state["meter_events_accepted"], state, mismatches
    )


async def _compare_totals(
    cp: ControlPlane, wl: Workload, customers: Sequence[str], concurrency: int
) -> list[str]:
    """Customers whose emulator meter total differs from their ledger quantities."""
    billing = cp.billing
    assert isinstance(billing, StripeBilling)
    rows = await cp.storage.ledger(limit=wl.rows + 1)
    want: dict[str, int] = defaultdict(int)
    for row in rows:
        want[row.org_id] += row.quantity

    async def total(o: int) -> int:
        return await billing.meter_totals(customers[o], METER, wl.first_bucket, wl.until)

    got = await _bounded(total, wl.orgs, concurrency)
    return [
        f"{wl.org(o)}: emulator {got[o]}, ledger {want[wl.org(o)]}"
        for o in range(wl.orgs)
        if got[o] != want[wl.org(o)]
    ]


# report -----------------------------------------------------------------------------------


def _latency(latencies: list[float]) -> str:
    if not latencies:
        return ""
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return f"call p50 {statistics.median(ordered) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms"


def _best_of(rounds: int) -> str:
    return "one round each" if rounds == 1 else f"best of {rounds} rounds each"


def _line(label: str, t: Timing, unit: str) -> str:
    return (
        f"  {label:<28}{t.seconds:7.2f} s  {t.rate:>8,.0f} {unit}/s  "
        f"({_latency(t.latencies)}; {t.cpu()})"
    )


def verify(run: ProductRun, wl: Workload) -> list[str]:
    problems = []
    if run.states != {"sent": wl.rows}:
        problems.append(f"ledger states {run.states}, expected all {wl.rows:,} sent")
    if run.accepted != wl.rows:
        problems.append(f"the emulator accepted {run.accepted:,} meter events for {wl.rows:,} rows")
    twice = run.emulator_state["identifiers_accepted_more_than_once"]
    rejected = run.emulator_state["duplicate_identifier_rejections"]
    if twice or rejected:
        problems.append(f"{twice} identifiers accepted twice, {rejected} duplicate rejections")
    if run.total_mismatches:
        problems.append(
            f"{len(run.total_mismatches)} customers' meter totals differ from the "
            f"ledger, e.g. {run.total_mismatches[0]}"
        )
    return problems


def report(
    wl: Workload, concurrency: int, raws: list[Timing], runs: list[ProductRun], plain: Timing | None
) -> int:
    raw = min(raws, key=lambda t: t.seconds)
    best = min(runs, key=lambda r: r.timing.seconds)
    for n, (t, run) in enumerate(zip(raws, runs, strict=True), 1):
        print(_line(f"raw SDK, round {n}", t, "events"))
        print(_line(f"product sender, round {n}", run.timing, "rows"))
    if plain is not None:
        print(_line("raw httpx (no SDK, info)", plain, "events"))

    prod = best.timing
    calls = sum(p.calls for p in best.passes)
    print(
        f"\n  where the fastest product run's {prod.seconds:.2f} s went "
        f"({len(best.passes)} send passes, {calls:,} calls):"
    )
    for what, seconds in best.split.items():
        note = ""
        if what == CALLS:
            note = (
                f"  (mean {sum(prod.latencies) / seconds:.1f} in flight of {concurrency} "
                f"allowed; the fastest raw run kept {sum(raw.latencies) / raw.seconds:.1f})"
            )
        print(f"    {what:<28}{seconds:7.2f} s  {seconds / prod.seconds:6.1%}{note}")
    for name, durations in best.storage.items():
        if durations:
            took = sum(durations)
            print(
                f"      storage.{name:<18}{took:7.2f} s in {len(durations):,} calls "
                f"({took / len(durations) * 1000:.1f} ms each, overlapping calls or not)"
            )

    problems = [f"round {n}: {p}" for n, run in enumerate(runs, 1) for p in verify(run, wl)]
    print()
    if problems:
        for p in problems:
            print(f"  VERIFY FAILED: {p}")
    else:
        print(
            f"  verified, every round: all {wl.rows:,} ledger rows sent; the emulator accepted "
            f"exactly {wl.rows:,} meter events, none twice; per-customer meter totals equal "
            "the ledger's quantities"
        )
    print(
        f"  rows {wl.rows:,}   product {prod.rate:,.0f} rows/s   raw {raw.rate:,.0f} events/s "
        f"(official Stripe SDK; {_best_of(len(runs))})"
    )
    print(ratio_line("product/raw rows per second", prod.rate / raw.rate, TARGET))
    return 1 if problems else 0


async def run_all(
    emulator: Emulator, wl: Workload, work: Path, concurrency: int, rounds: int, with_httpx: bool
) -> int:
    """Raw and product runs alternate, so a neighbour's load hits both alike."""
    raws: list[Timing] = []
    runs: list[ProductRun] = []
    for n in range(1, rounds + 1):
        raws.append(await raw_sdk(emulator, wl, concurrency, f"raw{n}"))
        runs.append(await product(emulator, wl, work / f"send-{n}.db", concurrency))
    plain = await raw_httpx(emulator, wl, concurrency) if with_httpx else None
    return report(wl, concurrency, raws, runs, plain)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.send", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--orgs", type=int, default=200, help="orgs, one customer each")
    parser.add_argument("--buckets", type=int, default=20, help="hourly buckets per org")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="sender.concurrency, and the raw clients' calls in flight",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="raw and product runs, alternating; the best of each counts",
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="emulator delay before each API request, as a network to Stripe adds (default 0)",
    )
    parser.add_argument(
        "--no-httpx", action="store_true", help="skip the informational plain-httpx run"
    )
    parser.add_argument("--dir", help="where to put the temporary database (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if not 1 <= args.buckets <= 24 * 30:
        parser.error("--buckets must be 1..720, so every bucket is within the last 30 days")
    if min(args.orgs, args.concurrency, args.rounds) < 1:
        parser.error("--orgs, --concurrency and --rounds must be positive")
    if args.latency_ms < 0:
        parser.error("--latency-ms must not be negative")

    configure(config_mod.LoggingConfig(level="warning"))
    wl = Workload.ending_now(args.orgs, args.buckets)
    print(
        f"send benchmark (sqlite, synchronous=full; Stripe emulator in its own process) on "
        f"{machine()}"
    )
    print(
        f"  {wl.rows:,} ledger rows = {wl.orgs:,} orgs x {wl.buckets} hourly buckets, 1 meter, "
        f"concurrency {args.concurrency}; raw baseline = the official stripe SDK "
        f"(async, HTTPXClient, no retries); emulator latency {args.latency_ms:g} ms per request"
    )
    print(
        f"  load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores "
        "(other processes compete with both sides; raw and product alternate)\n"
    )
    work = Path(tempfile.mkdtemp(prefix="cp-bench-send-", dir=args.dir))
    emulator = Emulator(work, args.latency_ms)
    try:
        emulator.wait_ready()
        return asyncio.run(
            run_all(emulator, wl, work, args.concurrency, args.rounds, not args.no_httpx)
        )
    finally:
        emulator.stop()
        if args.keep:
            print(f"  kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
