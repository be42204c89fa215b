"""Issue 23, point 4: through two cutovers and two rollbacks, every (org, bucket) with usage is
billed exactly once in total across both billers.

The control plane sends to the Stripe emulator over the real SDK; a simulated legacy biller
(tests/legacy_biller.py) follows the contract, reading `GET /v1/seam` before each of its runs.
Usage keeps arriving throughout, some of it late. What the control plane billed is what Stripe
holds: the emulator's hourly meter event summaries per customer (a bucket is billed there when
its hour holds units), checked to be the ledger's `sent` rows and reconciled clean, so a cancel
that did not land, or a send the ledger does not know of, would show.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import stripe
from litestar.testing import AsyncTestClient

from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.http.app import create_app
from controlplane.interfaces import MeterSummaries
from controlplane.ledger import RowState
from stripe_emulator import StripeEmulator, serve_emulator
from tests.conftest import READ_TOKEN, T0, tick
from tests.legacy_biller import SimulatedLegacy

API_KEY = "sk_test_seam"
HOUR = 3600
DAY = 24 * HOUR
ORGS = ("o1", "o2", "o3")
START = T0  # the first bucket with usage


def has_usage(org: str, bucket: int) -> bool:
    """o1 every hour, o2 every other hour, o3 every third: ranges with gaps."""
    step = {"o1": 1, "o2": 2, "o3": 3}[org]
    return (bucket // HOUR) % step == 0


class Run:
    """The control plane, Stripe, the legacy biller, and the usage sent so far."""

    def __init__(
        self, plane: ControlPlane, client: Any, clock: list[float], customers: dict[str, str]
    ) -> None:
        self.plane, self.client, self.clock, self.customers = plane, client, clock, customers
        self.usage: set[tuple[str, int]] = set()
        self.legacy = SimulatedLegacy(self.read_seam, since=START)
        self.hour = START  # the next bucket to fill
        self.n = 0

    async def read_seam(self, start: int, end: int) -> dict[str, Any]:
        auth = {"Authorization": f"Bearer {READ_TOKEN}"}
        r = await self.client.get("/v1/seam", params={"from": start, "to": end}, headers=auth)
        assert r.status_code == 200, r.text
        answer: dict[str, Any] = r.json()
        return answer

    async def ingest(self, org: str, bucket: int) -> None:
        self.n += 1
        await self.plane.ingest([tick(f"e{self.n}", org, bucket + 60, s=180)], "http")
        self.usage.add((org, bucket))

    async def hours(self, count: int) -> None:
        """`count` hours go by: each one's usage arrives as it ends, with some late usage; the
        jobs run every hour, the legacy biller every fourth."""
        for _ in range(count):
            bucket = self.hour
            self.hour += HOUR
            self.clock[0] = float(self.hour + 15 * 60)
            for org in ORGS:
                if has_usage(org, bucket):
                    await self.ingest(org, bucket)
            step = (bucket - START) // HOUR
            if step % 5 == 4:  # o3's usage four hours late (an hour it may have had none in)
                await self.ingest("o3", bucket - 4 * HOUR)
            if step % 7 == 6 and bucket - 30 * HOUR >= START:  # o1's, thirty hours late
                await self.ingest("o1", bucket - 30 * HOUR)
            await self.plane.rollup()
            await self.plane.send()
            if step % 4 == 3:
                await self.legacy.run(int(self.clock[0]), self.usage)

    async def cutover(self) -> int:
        """Cut over at the next bucket boundary: after everything the legacy biller billed."""
        t = self.hour
        assert self.legacy.billed_until is None or self.legacy.billed_until <= t
        await self.plane.cutover.execute(t, actor="ops", reason="cutover", force=True)
        return t


@pytest.fixture
async def run(make_config: Callable[..., Config]) -> AsyncIterator[Run]:
    clock = [float(START)]
    emulator = StripeEmulator(seed=23, clock=lambda: clock[0])
    async with serve_emulator(emulator):
        config = make_config(
            billing={
                "backend": "stripe",
                "api_key": API_KEY,
                "api_base": emulator.base_url,
                "rate_limit": 500.0,
                "max_retries": 0,
            },
            reconcile={"settle_seconds": HOUR},
        )
        http = stripe.HTTPXClient(timeout=5)
        client = stripe.StripeClient(
            API_KEY,
            base_addresses={"api": emulator.base_url},
            http_client=http,
            max_network_retries=0,
        )
        meter: Any = {
            "display_name": "GB-seconds",
            "event_name": "memory_gb_seconds",
            "default_aggregation": {"formula": "sum"},
        }
        await client.v1.billing.meters.create_async(params=meter)
        async with ControlPlane(config, clock=lambda: clock[0]) as plane:
            customers = {}
            for org in ORGS:
                customer = await client.v1.customers.create_async(params={"name": org})
                customers[org] = str(customer.id)
                await plane.set_org(
                    org, customer=customers[org], plan="pro", actor="t", effective_from=0
                )
            async with AsyncTestClient(app=create_app(config, cp=plane)) as api:
                yield Run(plane, api, clock, customers)
        await http.close_async()  # type: ignore[no-untyped-call]


async def at_stripe(run: Run, start: int, end: int) -> set[tuple[str, int]]:
    """(org, hour) pairs whose hour holds units at Stripe (its hourly summaries)."""
    billing = run.plane.billing
    assert isinstance(billing, MeterSummaries)
    held = set()
    for org, customer in run.customers.items():
        hours = await billing.hourly_usage(customer, "memory_gb_seconds", start, end)
        held |= {(org, hour) for hour, units in hours.items() if units > 0}
    return held


async def test_two_cutovers_and_two_rollbacks_bill_every_bucket_exactly_once(run: Run) -> None:
    plane = run.plane
    await run.hours(24)  # shadow soak: the legacy biller bills everything
    t1 = await run.cutover()
    await run.hours(72)  # three days of billing here
    first = await plane.cutover.rollback(actor="ops", reason="bad numbers", cancel_sent=True)
    rolled_back_at = plane.now()
    assert first.cancelled and first.not_cancelled  # the last 24 h cancelled, the rest kept
    kept = {(n.org_id, n.bucket_start) for n in first.not_cancelled}
    await run.hours(24)  # the legacy biller again, skipping the buckets Stripe kept
    t2 = await run.cutover()
    await run.hours(48)
    second = await plane.cutover.rollback(actor="ops", reason="again", cancel_sent=False)
    assert second.cancelled == [] == second.not_cancelled  # everything sent stays sent
    await run.hours(24)
    run.clock[0] += 3 * HOUR  # everything closed and settled; the legacy biller's last run
    await plane.rollup()
    await run.legacy.run(plane.now(), run.usage)

    end = run.hour
    sent = {
        (r.org_id, r.bucket_start)
        for r in await plane.storage.ledger(state=RowState.SENT, limit=10_000)
    }
    stripe_holds = await at_stripe(run, START, end)
    assert stripe_holds == sent  # what Stripe will invoice is what the ledger says was sent
    reconciliation = await plane.reconciler.run(START, end)
    assert reconciliation.clean, reconciliation.findings

    legacy = set(run.legacy.billed)
    assert stripe_holds & legacy == set()  # nothing billed twice
    assert stripe_holds | legacy == run.usage  # nothing billed by neither

    # the seam did the work: rows of the first cutover older than 24 h stayed at Stripe and
    # the legacy biller skipped them after the rollback, though they lie before T2 and it
    # bills every bucket while legacy_bill_until is null
    assert kept and kept <= stripe_holds and all(t1 <= b < rolled_back_at for _, b in kept)
    cancelled = {(n.org_id, n.bucket_start) for n in first.cancelled} - kept
    assert cancelled and cancelled <= legacy
    assert all(b < t2 for _, b in kept)
    seam = await plane.cutover.seam(START, end)
    assert seam.legacy_bill_until is None and seam.authority == "legacy"
    for org, bucket in run.usage:
        assert seam.legacy_bills(org, bucket) == ((org, bucket) not in stripe_holds)
