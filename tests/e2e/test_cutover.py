"""A full cutover against the Stripe emulator, with a simulated legacy biller on the other side
of the seam.

Shadow soak with parity checker passes, preflight, execute at T, more usage, then: the legacy
biller's usage plus the control plane's equals the total exactly, no bucket is billed by both
and none by neither, and Stripe holds exactly the control plane's units. A rollback within
24 hours cancels those sends at the emulator.

The control plane runs in process (so its clock can walk through the soak) with the real
Stripe billing plugin talking HTTP to the emulator process.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from controlplane import config as config_mod
from controlplane.core import ControlPlane
from controlplane.interfaces import LegacyCapability, LegacySource
from controlplane.ledger import RowState
from tests.conftest import HOUR
from tests.e2e.processes import Emulator
from tests.e2e.test_stripe_sending import API_KEY, setup_stripe, summaries, ticks

pytestmark = pytest.mark.e2e

NOW_HOUR = int(time.time()) // HOUR * HOUR
START = NOW_HOUR - 30 * HOUR
T = START + 27 * HOUR  # the seam
LAST = START + 29 * HOUR  # buckets [START, LAST) carry usage
ORGS = ["acme", "globex", "initech"]
MICROS = 1_000_000


class SimulatedLegacyBiller(LegacySource):
    """The legacy biller: sees the same events, bills each closed bucket once, and honours
    `legacy_bill_until` (bills only buckets starting before it)."""

    name = "simulated"

    def __init__(self) -> None:
        self.seen: dict[tuple[str, int], int] = defaultdict(int)  # (org, bucket) -> micros
        self.billed: dict[tuple[str, int], int] = {}

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def observe(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            micros = e["data"]["mb"] * e["data"]["s"] * MICROS // 1024
            bucket = e["ts"] // 1000 // HOUR * HOUR
            self.seen[(e["subject"], bucket)] += micros

    def bill(self, now: int, legacy_bill_until: int | None) -> None:
        for (org, bucket), micros in self.seen.items():
            closed = bucket + HOUR <= now
            allowed = legacy_bill_until is None or bucket < legacy_bill_until
            if closed and allowed and (org, bucket) not in self.billed:
                self.billed[(org, bucket)] = micros

    async def usage(self, start: int, end: int) -> dict[str, Decimal]:
        out: dict[str, Decimal] = defaultdict(Decimal)
        for (org, bucket), micros in self.seen.items():
            if start <= bucket < end:
                out[org] += Decimal(micros) / MICROS
        return dict(out)

    def capabilities(self) -> frozenset[LegacyCapability]:
        return frozenset({LegacyCapability.BILLED_UNTIL})

    async def billed_until(self) -> int | None:
        return max((b + HOUR for _, b in self.billed), default=None)


def events_for(buckets: range) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, org in enumerate(ORGS):
        for b in buckets:
            out += ticks(org, b, 3 + (i + b // HOUR) % 4)
    return out


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    emu = Emulator(tmp_path / "emulator.log", "--seed", "11")
    emu.start()
    yield emu
    emu.stop()


async def test_full_cutover_then_rollback(tmp_path: Path, emulator: Emulator) -> None:
    meter_id, customers = setup_stripe(emulator, ORGS)
    config = config_mod.parse(
        {
            "storage": {"backend": "sqlite", "path": str(tmp_path / "cp.db")},
            "rollup": {"bucket_seconds": HOUR, "grace_seconds": 600},
            "billing": {
                "backend": "stripe",
                "api_key": API_KEY,
                "api_base": emulator.url,
                "rate_limit": 200.0,
                "max_retries": 2,
                "timeout_seconds": 5.0,
                "backoff_base_seconds": 0.05,
                "backoff_cap_seconds": 0.5,
            },
            "meters": [
                {
                    "name": "gbs",
                    "event_type": "tick",
                    "value": "data.mb * data.s / 1024",
                    "event_name": "memory_gb_seconds",
                }
            ],
            "parity": {"meter": "gbs", "settle_seconds": 3600, "backfill_buckets": 30},
            "cutover": {"parity_clean_hours": 12},
            "logging": {"level": "error"},
        }
    )
    legacy = SimulatedLegacyBiller()
    clock = [float(START + 14 * HOUR)]
    async with ControlPlane(config, legacy=legacy, clock=lambda: clock[0]) as cp:
        for org in ORGS:
            await cp.set_org(
                org, customer=customers[org], plan="pro", actor="e2e", effective_from=0
            )

        async def hour(until: int) -> None:
            """Time passes: events arrive, the legacy biller bills, our jobs run."""
            now = int(clock[0])
            batch = events_for(range(now // HOUR * HOUR - 0, until, HOUR))
            clock[0] = until
            assert (await cp.ingest(batch, "e2e")).accepted == len(batch)
            legacy.observe(batch)
            legacy.bill(until, (await cp.flags()).legacy_bill_until)
            await cp.rollup()
            await cp.parity_check()
            await cp.send()

        # shadow soak: usage from START on, checker passes as time goes by
        first = events_for(range(START, START + 14 * HOUR, HOUR))
        await cp.ingest(first, "e2e")
        legacy.observe(first)
        legacy.bill(int(clock[0]), None)
        await cp.rollup()
        await cp.parity_check()
        await hour(START + 20 * HOUR)
        await hour(T)
        assert emulator.state()["meter_events_accepted"] == 0  # shadow: nothing sent

        report = await cp.cutover.preflight(T)
        assert report.ok, report.checks
        statuses = {c.name: c.status for c in report.checks}
        assert statuses["parity_clean"] == "pass"
        assert statuses["legacy_not_billed_from_t"] == "pass"
        _, flags = await cp.cutover.execute(T, actor="e2e", reason="cutover")
        assert flags.legacy_bill_until == T and (await cp.cutover.status()).stage == "live"

        await hour(LAST)  # usage after T, the legacy biller keeps to its side
        clock[0] = LAST + HOUR
        legacy.bill(LAST + HOUR, (await cp.flags()).legacy_bill_until)
        await cp.rollup()
        await cp.send()

        # the seam: every bucket billed by exactly one side, exact sums
        total: dict[tuple[str, int], int] = dict(legacy.seen)
        sent = await cp.storage.ledger(state=RowState.SENT, limit=100_000)
        ours = {(r.org_id, r.bucket_start) for r in sent}
        theirs = set(legacy.billed)
        assert not ours & theirs, "a bucket billed by both"
        assert ours | theirs == set(total), "a bucket billed by neither"
        assert all(b < T for _, b in theirs) and all(b >= T for _, b in ours)
        assert sum(legacy.billed.values()) + sum(r.value_micros for r in sent) == sum(
            total.values()
        )
        for org in ORGS:
            exact = sum(m for (o, b), m in total.items() if o == org and b >= T)
            units = sum(r.quantity for r in sent if r.org_id == org)
            assert units == exact // MICROS  # rounding carries, never loses
            assert summaries(emulator, meter_id, customers[org], T, LAST + HOUR) == units
        excluded = await cp.storage.ledger(state=RowState.EXCLUDED, limit=100_000)
        assert {r.reason for r in excluded} == {"before_bill_from"}
        assert all(r.bucket_start < T for r in excluded)

        # rollback within 24 h: the sends are cancelled at the emulator
        result = await cp.cutover.rollback(actor="e2e", reason="roll back", cancel_sent=True)
        assert result.not_cancelled == []
        assert len(result.cancelled) == len(sent)
        for org in ORGS:
            assert summaries(emulator, meter_id, customers[org], T, LAST + HOUR) == 0
        assert len(await cp.storage.ledger(state=RowState.CANCELLED, limit=100_000)) == len(sent)
        status = await cp.cutover.status()
        assert status.stage == "rolled_back" and (await cp.flags()).legacy_bill_until is None
