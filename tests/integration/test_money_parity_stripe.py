"""Money parity's third number: for an org already on Stripe, Stripe's own invoice preview
(``invoices.create_preview``, served by the emulator from its meter summaries, prices and
credit grants) beside the legacy invoice and the control plane's pricing. The org is
provisioned by the emulator's own signed checkout webhook, its usage sent by the real sender
over the real SDK; a difference between the pricing and the preview is its own finding."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import stripe
from litestar.testing import AsyncTestClient

from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.flags import FlagChange
from controlplane.http.app import create_app
from controlplane.money import month_bounds, month_of
from controlplane.pricing import line_amount
from stripe_emulator import StripeEmulator, serve_emulator_in_thread
from tests.conftest import HOUR, TOKEN, tick
from tests.stripe_helpers import provision

API_KEY = "sk_test_money_parity"
SECRET = "whsec_money_parity"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CATALOG = {
    "products": [{"key": "pro", "name": "Pro"}],
    "prices": [
        {"key": "memory", "product": "pro", "lookup_key": "mem_v1", "meter": "gbs",
         "unit_amount": "0.000437"},  # 0.0437 cents per GB-second: fractional line amounts
        {"key": "base", "product": "pro", "lookup_key": "base_v1", "unit_amount": "20.00"},
    ],
    "welcome_credit": {"amount": "1.50", "currency": "usd", "name": "Welcome credit"},
}  # fmt: skip


async def test_stripe_preview_is_the_third_number_and_a_difference_is_a_finding(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    emulator = StripeEmulator(seed=21)
    clock = [time.time()]
    # in a thread of its own: the test client serves the app from another event loop
    with serve_emulator_in_thread(emulator):
        legacy = tmp_path / "legacy.db"
        with sqlite3.connect(legacy) as conn:
            conn.execute("CREATE TABLE invoices (org_id TEXT, period TEXT, cents INTEGER)")
        config = make_config(
            billing={
                "backend": "stripe",
                "api_key": API_KEY,
                "api_base": emulator.base_url,
                "max_retries": 0,
            },
            stripe={"webhook_secret": SECRET},
            catalog=CATALOG,
            parity={"meter": "gbs"},
            legacy={
                "backend": "sql",
                "dsn": f"sqlite:///{legacy}",
                "query": "SELECT org_id, 0 FROM invoices WHERE :start < :end",
                "invoices_query": "SELECT org_id, cents FROM invoices "
                "WHERE period = strftime('%Y-%m', :start, 'unixepoch') AND :end > 0",
            },
        )
        client = stripe.StripeClient(
            API_KEY,
            base_addresses={"api": emulator.base_url},
            http_client=stripe.HTTPXClient(timeout=5),
            max_network_retries=0,
        )
        async with ControlPlane(config, clock=lambda: int(clock[0])) as cp:
            await cp.catalog_publish(actor="test")
            # provision `acme` the way Stripe does it: a setup checkout, its signed webhook
            await provision(cp, client, emulator, "acme", SECRET)
            org = await cp.storage.get_org("acme")
            assert org is not None and org.subscription is not None

            # usage in two buckets after the subscription started, cut over and sent
            first = (int(clock[0]) // HOUR + 1) * HOUR
            emulator.advance(first + 3 * HOUR - clock[0])
            clock[0] = first + 3 * HOUR
            await cp.ingest([tick(f"a{i}", "acme", first + 20 * i) for i in range(77)], "t")
            await cp.ingest([tick("b0", "acme", first + HOUR, mb=3 * 1024)], "t")
            await cp.set_flags(
                [
                    FlagChange("authority", "controlplane"),
                    FlagChange("bill_from", first),
                    FlagChange("shadow", False),
                ],
                actor="test",
                reason="cut over for the test",
            )
            await cp.rollup()
            sent = await cp.send()
            assert sent.sent == 2
            # 77 x 20 + 60 = 1600 GB-s; 1600 x 0.0437 = 69.92 -> 70 cents; the $1.50 credit
            # covers the 70 cents of metered usage, never the $20 fee
            period = month_of(first)
            with sqlite3.connect(legacy) as conn:
                conn.execute("INSERT INTO invoices VALUES ('acme', ?, 2070)", (period,))
            agreed, _ = await cp.money_parity.check(*month_bounds(period))

            # more usage rolled up but not sent: Stripe does not have it, the ledger does
            await cp.set_flags([FlagChange("shadow", True)], actor="test", reason="pause")
            await cp.ingest([tick("c0", "acme", first + 2 * HOUR, s=1000)], "t")
            clock[0] += HOUR
            emulator.advance(HOUR)
            await cp.rollup()
        plane = ControlPlane(config, clock=lambda: int(clock[0]))
        async with AsyncTestClient(app=create_app(config, cp=plane)) as http:
            r = await http.get(
                "/internal/money-parity", params={"period": period, "lines": True}, headers=AUTH
            )
    assert r.status_code == 200, r.text

    (before,) = agreed.orgs
    assert before.stripe is not None and not before.stripe.finding
    assert (before.stripe.preview.subtotal, before.stripe.preview.total) == (2070, 2000)
    assert before.controlplane is not None
    assert (before.controlplane.subtotal, before.controlplane.credit) == (2070, 70)
    assert (before.legacy is not None, before.drift) == (True, -70)  # no credit on the legacy side

    body = r.json()
    (acme,) = body["orgs"]
    unit = Decimal("0.0437")
    more = 1000 * 1024 // 1024  # the unsent bucket: 1000 GB-s
    drift = line_amount(unit, 1600 + more) - line_amount(unit, 1600)
    assert acme["stripe"]["subtotal_minor"] == 2070  # Stripe's preview: what was sent
    assert acme["stripe"]["computed_subtotal_minor"] == 2070 + drift
    assert (acme["stripe"]["drift_minor"], acme["stripe"]["finding"]) == (drift, True)
    assert drift == 44  # 2600 x 0.0437 = 113.62 -> 114 cents, less 70
    assert body["summary"]["stripe_findings"] == 1
    assert acme["lines"]["stripe"] == [
        {"price": acme["lines"]["stripe"][0]["price"], "quantity": 1600, "amount_minor": 70,
         "credit_minor": 70},
        {"price": acme["lines"]["stripe"][1]["price"], "quantity": 1, "amount_minor": 2000,
         "credit_minor": 0},
    ]  # fmt: skip
    # the legacy comparison is its own: the calendar month's 2114 cents less the 114 the
    # $1.50 credit covers (metered lines only), against the legacy biller's 2070
    assert (acme["controlplane_minor"], acme["legacy_minor"], acme["drift_minor"]) == (
        2000,
        2070,
        -70,
    )
