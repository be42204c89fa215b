"""`controlplane demo`: a guided first run against the local Stripe emulator (or test mode).

Creates what Stripe needs (the meter of every configured meter, a customer per demo org), maps
the demo orgs to those customers on the Pro plan, ingests a few hours of usage, rolls it up,
and prints the ledger. With `--cutover` it also flips the flags so that the scheduler of a
running `controlplane serve` delivers the rows (or `controlplane send` does, now).
"""

from __future__ import annotations

import time
from typing import Any

from controlplane.core import ControlPlane
from controlplane.errors import ConfigError
from controlplane.flags import FlagChange
from controlplane.units import format_micros

ORGS = ("acme", "globex", "initech")
HOUR = 3600


async def ensure_stripe(cp: ControlPlane, orgs: tuple[str, ...]) -> dict[str, str]:
    """The meter for each configured meter, and a customer per org; returns org -> customer."""
    client: Any = getattr(cp.billing, "client", None)
    if client is None:
        raise ConfigError(
            'billing: the demo needs backend = "stripe" (real test mode or the emulator)'
        )
    meters = await client.v1.billing.meters.list_async(params={"limit": 100})
    existing = {m.event_name for m in meters.data}
    for meter in cp.meters.meters:
        name = meter.config.provider_event_name
        if name not in existing:
            await client.v1.billing.meters.create_async(
                params={
                    "display_name": meter.name,
                    "event_name": name,
                    "default_aggregation": {"formula": "sum"},
                }
            )
            print(f"stripe: created meter {name}")
    customers: dict[str, str] = {}
    for org in orgs:
        found = await cp.storage.get_org(org)
        if found and found.customer:
            customers[org] = found.customer
            continue
        customer = await client.v1.customers.create_async(
            params={"name": org, "metadata": {"org_id": org}}
        )
        customers[org] = customer.id
        print(f"stripe: created customer {customer.id} for org {org}")
    return customers


def sample_events(orgs: tuple[str, ...], start: int, hours: int, run: str) -> list[dict[str, Any]]:
    """20-second usage ticks for each org; sizes differ so each org's total does too."""
    events: list[dict[str, Any]] = []
    for n, org in enumerate(orgs):
        for i in range(hours * HOUR // 20):
            events.append(
                {
                    "id": f"demo-{run}-{org}-{i}",
                    "type": "usage_tick",
                    "subject": org,
                    "ts": (start + i * 20) * 1000,
                    "data": {"memory_mb": 512 * (n + 1) + 100, "interval_s": 20},
                }
            )
    return events


async def run(cp: ControlPlane, *, hours: int = 3, cutover: bool = False) -> None:
    now = int(time.time())
    this_hour = now - now % HOUR
    start = this_hour - hours * HOUR
    customers = await ensure_stripe(cp, ORGS)
    for org, customer in customers.items():
        await cp.set_org(
            org, customer=customer, plan="pro", actor="demo", effective_from=0, reason="demo org"
        )
    events = sample_events(ORGS, start, hours, run=str(start))
    accepted = duplicates = 0
    for i in range(0, len(events), 1000):
        result = await cp.ingest(events[i : i + 1000], "demo")
        accepted += result.accepted
        duplicates += result.duplicates
    print(f"ingested {accepted} events ({duplicates} already there) for {', '.join(ORGS)}")
    stats = await cp.rollup(until=this_hour)
    print(f"rolled up {stats.buckets} buckets into {stats.rows} ledger rows")
    for row in await cp.storage.ledger(start=start, limit=100):
        print(
            f"  {row.identifier:<40} {format_micros(row.value_micros):>14}"
            f" -> {row.quantity:>8} units  {row.state}"
        )
    flags = await cp.flags()
    if cutover:
        changes = [
            FlagChange("authority", "controlplane"),
            FlagChange("bill_from", start),
            FlagChange("shadow", False),
        ]
        flags = await cp.set_flags(changes, actor="demo", reason="demo cutover")
        print(f"flags: authority=controlplane, bill_from={start}, shadow=false")
    if flags.sending:
        sent = await cp.send()
        print(f"sent {sent.sent} rows to Stripe ({sent.held} held, {sent.excluded} excluded)")
    else:
        print("shadow mode: nothing is sent. Run `controlplane demo --cutover` to flip the flags.")
