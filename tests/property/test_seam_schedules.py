"""Issue 23, point 4: over random cutover and rollback schedules, every (org, bucket) with usage
is billed exactly once across both billers.

A schedule is a soak, then one to three cycles of (cutover at the next bucket boundary, some
hours live, rollback with or without cancelling, the provider's cancels and offsets all
landing, some of them refused, or every cancel refused, some hours of the legacy biller again).
A refusal inside a bucket whose other rows were taken back already must leave the bucket
billed here, whole. Usage arrives every hour, some of it late. The legacy
biller (tests/legacy_biller.py) follows the contract, reading the core's seam before each of its
runs. What the control plane billed is what the provider double holds per hour (its events not
cancelled), checked to be the ledger's `sent` rows. A second cutover at or before rows already
sent, attempted or cancelled is refused (``bill_from.frozen``): the plan names the rule.
"""

from __future__ import annotations

import asyncio
import tempfile
import zlib
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane import config as config_mod
from controlplane.core import ControlPlane
from controlplane.interfaces import (
    Delivery,
    InvoicePreview,
    InvoicePreviewer,
    MeterEvent,
    OrgChange,
    Outcome,
    WebhookRecord,
)
from controlplane.ledger import RowState
from controlplane.plugins.billing.fake import FakeBilling
from tests.conftest import T0, raw_config, tick
from tests.legacy_biller import SimulatedLegacy

HOUR = 3600
ORGS = ("a", "b", "c")

Cycle = tuple[int, int, bool, int]  # hours live, hours after, cancel_sent, refusals


class OpenPeriodBilling(FakeBilling, InvoicePreviewer):
    """The fake provider, its subscriptions' current billing period covering every hour: rows
    past the cancel window are offset there."""

    async def preview_invoice(self, customer: str, subscription: str) -> InvoicePreview:
        return InvoicePreview("usd", 0, 2**40, subtotal=0, total=0, lines=[])


CYCLE = st.tuples(st.integers(1, 30), st.integers(1, 20), st.booleans(), st.integers(0, 2))
LAND, SOME_REFUSED, CANCELS_REFUSED = range(3)


def refused(refusals: int, identifier: str) -> bool:
    """Whether the provider refuses a call taking `identifier` back (a cancel, or an offset
    of it): none, about half of them (by identifier), or every cancel."""
    return refusals == SOME_REFUSED and zlib.crc32(identifier.encode()) % 2 == 1


class Schedule:
    def __init__(
        self, plane: ControlPlane, fake: FakeBilling, clock: list[float], usage_seed: int
    ) -> None:
        self.plane, self.fake, self.clock = plane, fake, clock
        self.seed = usage_seed
        self.usage: set[tuple[str, int]] = set()
        self.units: dict[tuple[str, int], int] = {}  # per (org, bucket): the usage's units
        self.legacy = SimulatedLegacy(self.read, since=T0)
        self.hour = T0
        self.n = 0

    async def read(self, start: int, end: int) -> dict[str, Any]:
        seam = await self.plane.cutover.seam(start, end)
        answer: dict[str, Any] = msgspec.to_builtins(seam)
        return answer

    async def ingest(self, org: str, bucket: int) -> None:
        self.n += 1
        await self.plane.ingest([tick(f"e{self.n}", org, bucket + 7, s=120)], "http")
        self.usage.add((org, bucket))
        self.units[(org, bucket)] = self.units.get((org, bucket), 0) + 120

    async def hours(self, count: int) -> None:
        for _ in range(count):
            bucket = self.hour
            self.hour += HOUR
            self.clock[0] = float(self.hour + 900)
            step = (bucket - T0) // HOUR
            for i, org in enumerate(ORGS):
                if (step + self.seed + i) % (i + 1) == 0:
                    await self.ingest(org, bucket)
            late = (self.seed * 7 + step) % 11
            if bucket - late * HOUR >= T0:
                await self.ingest(ORGS[step % len(ORGS)], bucket - late * HOUR)
            await self.plane.rollup()
            await self.plane.send()
            if (step + self.seed) % 3 == 0:
                await self.legacy.run(int(self.clock[0]), self.usage)


async def replay(
    soak: int, cycles: list[Cycle], usage_seed: int, db: Path, offsets: bool = False
) -> None:
    clock = [float(T0)]
    fake = OpenPeriodBilling() if offsets else FakeBilling()
    config = config_mod.parse(raw_config(db, cutover={"cancel_window_seconds": 8 * HOUR}))
    async with ControlPlane(config, billing=fake, clock=lambda: clock[0]) as plane:
        for org in ORGS:
            await plane.set_org(org, customer=f"cus_{org}", plan="pro", actor="t", effective_from=0)
            change = OrgChange(org, subscription=f"sub_{org}", subscription_status="active")
            record = WebhookRecord(f"evt_{org}", "checkout.session.completed", None, "provisioned")
            await plane.storage.record_webhook(record, T0, org=change)
        run = Schedule(plane, fake, clock, usage_seed)
        await run.hours(soak)
        earlier: int | None = None
        for live, after, cancel_sent, refusals in cycles:
            t = run.hour  # the next boundary: after all the legacy biller billed
            if earlier is not None and (await plane.storage.seam(earlier)).reached:
                plan = await plane.cutover.plan(earlier)
                assert "bill_from.frozen" in {p["rule"] for p in plan.problems}
            await plane.cutover.execute(t, actor="ops", reason="go", force=True)
            await run.hours(live)

            async def cancel(
                event_name: str, identifier: str, refusals: int = refusals
            ) -> Delivery:
                if refusals == CANCELS_REFUSED or refused(refusals, identifier):
                    return Delivery(Outcome.REJECTED, "refused by the provider")
                return await FakeBilling.cancel(fake, event_name, identifier)

            def offsets(event: MeterEvent, refusals: int = refusals) -> Outcome | None:
                offset = event.value < 0 and refused(refusals, event.identifier)
                return Outcome.REJECTED if offset else None

            fake.cancel, fake.decide = cancel, offsets  # type: ignore[method-assign]
            await plane.cutover.rollback(actor="ops", reason="undo", cancel_sent=cancel_sent)
            fake.decide = None
            await run.hours(after)
            earlier = t
        clock[0] += 3 * HOUR
        await plane.rollup()
        await run.legacy.run(plane.now(), run.usage)

        sent = await plane.storage.ledger(state=RowState.SENT, limit=100_000)
        held: dict[tuple[str, int], int] = {}
        for org in ORGS:
            hours = await fake.hourly_usage(f"cus_{org}", "memory_gb_seconds", T0, run.hour)
            held |= {(org, h): units for h, units in hours.items() if units > 0}
        # a bucket billed here is billed whole: none of its units handed back alone
        assert held == {bucket: run.units[bucket] for bucket in held}, "billed in part"
        billed = [r for r in sent if r.offsets_id is None]  # an offset hands its row back
        assert set(held) == {(r.org_id, r.bucket_start) for r in billed if r.quantity > 0}
        assert {(r.org_id, r.bucket_start) for r in billed} == set(held)  # none below a unit
        legacy = set(run.legacy.billed)
        assert set(held) & legacy == set(), "billed twice"
        assert set(held) | legacy == run.usage, "billed by neither"


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    soak=st.integers(0, 12),
    cycles=st.lists(CYCLE, min_size=1, max_size=3),
    usage_seed=st.integers(0, 5),
    offsets=st.booleans(),
)
def test_every_bucket_is_billed_exactly_once_over_random_cutovers_and_rollbacks(
    soak: int, cycles: list[Cycle], usage_seed: int, offsets: bool
) -> None:
    """`offsets`: the provider says every subscription's billing period is open, so rows past
    the cancel window are offset (else they stay billed here, the legacy biller skipping
    them)."""
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(replay(soak, cycles, usage_seed, Path(folder) / "cp.db", offsets))


async def test_a_correction_cancelled_under_a_kept_original_is_billed_by_someone(
    tmp_path: Path,
) -> None:
    clock = [float(T0 + HOUR + 900)]
    fake = FakeBilling()
    config = config_mod.parse(raw_config(tmp_path / "cp.db"))
    async with ControlPlane(config, billing=fake, clock=lambda: clock[0]) as plane:
        await plane.set_org("a", customer="cus_a", plan="pro", actor="t", effective_from=0)
        await plane.cutover.execute(T0, actor="ops", reason="go", force=True)
        await plane.ingest([tick("e1", "a", T0 + 7, s=120)], "http")  # 120 units
        await plane.rollup()
        assert (await plane.send()).sent == 1
        clock[0] += 30 * HOUR
        await plane.ingest([tick("late", "a", T0 + 9, s=60)], "http")  # 60 more, late
        await plane.rollup()
        assert (await plane.send()).sent == 1  # the correction, revision 2
        await plane.cutover.rollback(actor="ops", reason="undo", cancel_sent=True)
        seam = await plane.cutover.seam(T0, T0 + HOUR)
        legacy_bills = seam.legacy_bills("a", T0)
        held = await fake.hourly_usage("cus_a", "memory_gb_seconds", T0, T0 + HOUR)
        # the bucket's 180 units: all at the provider, or the bucket handed to the legacy biller
        assert legacy_bills or held == {T0: 180}
