"""`controlplane demo` against an in-process Stripe emulator, with the real SDK over HTTP."""

from __future__ import annotations

from collections.abc import Callable

from controlplane import demo
from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.ledger import RowState
from stripe_emulator import StripeEmulator, serve_emulator


async def test_demo_shadow_then_cutover_delivers_the_ledger(
    make_config: Callable[..., Config],
) -> None:
    emulator = StripeEmulator()
    async with serve_emulator(emulator) as url:
        config = make_config(
            billing={"backend": "stripe", "api_key": "sk_test_demo", "api_base": url},
            meters=[
                {
                    "name": "memory_gb_seconds",
                    "event_type": "usage_tick",
                    "value": "data.memory_mb * data.interval_s / 1024",
                }
            ],
        )
        async with ControlPlane(config) as cp:
            await demo.run(cp, hours=2)
            rows = await cp.storage.ledger()
            assert len(rows) == 6 and {r.state for r in rows} == {RowState.PENDING}
            assert emulator.state()["meter_events_accepted"] == 0

            await demo.run(cp, hours=2, cutover=True)  # re-running ingests only duplicates
            rows = await cp.storage.ledger()
            assert len(rows) == 6 and {r.state for r in rows} == {RowState.SENT}
            for org in demo.ORGS:
                customer = (await cp.storage.get_org(org)).customer  # type: ignore[union-attr]
                sent = sum(r.quantity for r in rows if r.org_id == org)
                start = min(r.bucket_start for r in rows)
                end = max(r.bucket_end for r in rows)
                assert emulator.meter_total("memory_gb_seconds", customer, start, end) == sent
