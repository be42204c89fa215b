"""Catalog and Stripe webhooks, end to end: `controlplane serve`, the CLI and the Stripe
emulator, with webhooks delivered by the emulator, signed, duplicated and retried.

Provisioning must happen exactly once however often and in whatever order Stripe delivers;
a delivery that does not verify provisions nothing; `invoice.created` trues up before the
answer; a correction for a finalized invoice lands in the current period.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe

from tests.conftest import HOUR, TOKEN, tick
from tests.e2e.processes import ROOT, Emulator, Server, base_config, bearer

pytestmark = pytest.mark.e2e

API_KEY = "sk_test_webhooks"
SECRET = "whsec_e2e_webhooks_secret"
NOW_HOUR = int(time.time()) // HOUR * HOUR


def config_text(db: Path, emulator: Emulator) -> str:
    return (
        base_config(db)
        + f"""
[rollup]
grace_seconds = 3600       # the scheduler never closes the buckets these tests use:
interval_seconds = 3600    # only the true-up (or the CLI) rolls up and sends
[sender]
interval_seconds = 3600

[flags]
shadow = false
authority = "controlplane"
bill_from = {NOW_HOUR - 2 * HOUR}

[billing]
backend = "stripe"
api_key = "{API_KEY}"
api_base = "{emulator.url}"
rate_limit = 200.0
max_retries = 1
backoff_base_seconds = 0.05
backoff_cap_seconds = 0.2

[stripe]
webhook_secret = "{SECRET}"

[[catalog.products]]
key = "pro"
name = "Pro"

[[catalog.prices]]
key = "pro_memory"
product = "pro"
lookup_key = "pro_memory_gb_seconds"
meter = "gbs"
unit_amount = "0.0004"
currency = "usd"
interval = "month"

[[catalog.prices]]
key = "pro_base"
product = "pro"
lookup_key = "pro_base_fee"
unit_amount = "20.00"
currency = "usd"
interval = "month"

[catalog.welcome_credit]
amount = "10.00"
currency = "usd"
name = "Welcome credit"
expires_after_days = 30
"""
    )


class Stack:
    def __init__(self, tmp_path: Path) -> None:
        self.emulator = Emulator(tmp_path / "emulator.log")
        self.emulator.start()
        self.config = tmp_path / "cp.toml"
        self.db = tmp_path / "cp.db"
        self.config.write_text(config_text(self.db, self.emulator))
        self.server = Server(self.config, tmp_path / "server.log")
        self.server.start()
        self.api = httpx.Client(base_url=self.server.url, headers=bearer(TOKEN), timeout=20)
        self.emu = httpx.Client(base_url=self.emulator.url, timeout=20)
        self.stripe = stripe.StripeClient(
            API_KEY, base_addresses={"api": self.emulator.url}, max_network_retries=0
        )
        r = self.emu.post(
            "/_emulator/webhook_endpoints",
            json={
                "url": f"{self.server.url}/webhooks/stripe",
                "enabled_events": ["*"],
                "secret": SECRET,
            },
        )
        r.raise_for_status()

    def close(self) -> None:
        self.api.close()
        self.emu.close()
        self.server.stop()
        self.emulator.stop()

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "controlplane", *args, "--config", str(self.config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def flush(self) -> None:
        r = self.emu.post("/_emulator/webhooks/flush", json={"timeout": 15})
        assert r.json()["idle"], r.text

    def customer(self, org: str) -> str:
        return str(self.stripe.v1.customers.create(params={"name": org}).id)

    def checkout(self, org: str, customer: str) -> str:
        """A setup checkout completed by the customer; returns the session id."""
        session = self.stripe.v1.checkout.sessions.create(
            params={
                "mode": "setup",
                "currency": "usd",
                "customer": customer,
                "client_reference_id": org,
                "success_url": "https://example.com/done",
            }
        )
        self.emu.post(f"/_emulator/checkout/{session.id}/complete", json={}).raise_for_status()
        return str(session.id)

    def deliveries(self, **params: str) -> list[dict[str, Any]]:
        r = self.emu.get("/_emulator/deliveries", params=params)
        r.raise_for_status()
        body = r.json()
        return body["data"] if isinstance(body, dict) else body  # type: ignore[no-any-return]

    def event_of(self, kind: str, **match: Any) -> dict[str, Any]:
        events = self.stripe.v1.events.list(params={"type": kind, "limit": 100}).data
        for e in events:
            obj = e.to_dict()["data"]["object"]
            if all(obj.get(k) == v for k, v in match.items()):
                return e.to_dict()  # type: ignore[no-any-return]
        raise AssertionError(f"no {kind} event matching {match}")

    def subscriptions(self, customer: str) -> list[Any]:
        params: Any = {"customer": customer, "status": "all"}
        return list(self.stripe.v1.subscriptions.list(params=params).data)

    def grants(self, customer: str) -> list[Any]:
        return list(self.stripe.v1.billing.credit_grants.list(params={"customer": customer}).data)

    def org(self, org: str) -> dict[str, Any]:
        r = self.api.get(f"/v1/orgs/{org}")
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    def ledger(self, org: str) -> list[dict[str, Any]]:
        r = self.api.get("/v1/ledger", params={"org": org})
        r.raise_for_status()
        return r.json()["rows"]  # type: ignore[no-any-return]

    def ingest(self, events: list[dict[str, Any]]) -> None:
        self.api.post("/v1/events", json=events).raise_for_status()

    def webhook_alerts(self) -> list[str]:
        """The webhook handler's alerts, read from the control plane's database."""
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as db:
            rows = db.execute(
                "SELECT text FROM parity_alerts WHERE meter = 'job:webhooks' ORDER BY id"
            ).fetchall()
        return [text for (text,) in rows]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    try:
        yield s
    except BaseException:
        print("server log:\n", s.server.output(), "\nemulator log:\n", s.emulator.output())
        raise
    finally:
        s.close()


def test_publish_is_idempotent_and_shown(stack: Stack) -> None:
    dry = stack.cli("catalog", "publish", "--dry-run")
    assert "create" in dry and "dry run" in dry
    assert stack.api.get("/v1/catalog").json()["version"] is None  # the dry run stored nothing
    assert "published catalog version 1" in stack.cli("catalog", "publish")
    again = stack.cli("catalog", "publish")
    assert "unchanged: catalog version 1" in again and "create" not in again
    catalog = stack.api.get("/v1/catalog").json()
    assert catalog["version"] == 1
    prices = catalog["catalog"]["prices"]
    assert prices["pro_memory"]["usage_type"] == "metered"
    assert prices["pro_base"]["usage_type"] == "licensed"
    found = stack.stripe.v1.prices.list(
        params={"lookup_keys": ["pro_memory_gb_seconds", "pro_base_fee"]}
    ).data
    assert {p.id for p in found} == {prices["pro_memory"]["id"], prices["pro_base"]["id"]}
    memory = next(p for p in found if p.lookup_key == "pro_memory_gb_seconds")
    assert memory.unit_amount_decimal == Decimal("0.04")  # 0.0004 dollars, exactly, in cents
    assert len(stack.stripe.v1.billing.meters.list().data) == 1
    audit = json.loads(stack.cli("catalog", "show", "--json"))
    assert audit["version"] == 1


def test_checkout_provisions_exactly_once(stack: Stack) -> None:
    stack.cli("catalog", "publish")
    customer = stack.customer("acme")
    # the completion's events (payment method attached, setup intent created, succeeded,
    # session completed) go twice
    stack.emu.post("/_emulator/webhooks", json={"duplicate_next": 4}).raise_for_status()
    stack.checkout("acme", customer)
    stack.flush()
    event = stack.event_of("checkout.session.completed", customer=customer)
    stack.emu.post(f"/_emulator/events/{event['id']}/redeliver", json={}).raise_for_status()
    stack.flush()
    attempts = stack.deliveries(event=event["id"])
    assert len(attempts) == 3 and sum(a["duplicate"] for a in attempts) == 1
    assert all(a["status"] == 200 for a in attempts), [
        (a["status"], a["error"], a["response"], a["duplicate"]) for a in attempts
    ]
    stack.checkout("acme", customer)  # a second, different checkout event for the same org
    stack.flush()

    subscriptions = stack.subscriptions(customer)
    assert len(subscriptions) == 1
    items = subscriptions[0].to_dict()["items"]["data"]
    assert len(items) == 2
    assert (
        next(i for i in items if i["price"]["recurring"]["usage_type"] == "metered").get("quantity")
        is None
    )
    grants = stack.grants(customer)
    assert len(grants) == 1
    assert grants[0].to_dict()["amount"]["monetary"]["value"] == 1000
    org = stack.org("acme")
    assert org["plan"] == "pro" and org["customer"] == customer


def test_empty_catalog_answers_503_then_redelivery_provisions(stack: Stack) -> None:
    customer = stack.customer("early")
    stack.checkout("early", customer)
    stack.flush()
    event = stack.event_of("checkout.session.completed", customer=customer)
    attempts = stack.deliveries(event=event["id"])
    assert attempts and all(a["status"] == 503 for a in attempts), attempts
    assert stack.subscriptions(customer) == [] and stack.grants(customer) == []
    assert stack.api.get("/v1/orgs/early").status_code == 404

    stack.cli("catalog", "publish")
    stack.emu.post(f"/_emulator/events/{event['id']}/redeliver", json={}).raise_for_status()
    stack.flush()
    assert len(stack.subscriptions(customer)) == 1
    assert len(stack.grants(customer)) == 1
    assert stack.org("early")["plan"] == "pro"


def test_bad_signatures_are_refused_and_provision_nothing(stack: Stack) -> None:
    stack.cli("catalog", "publish")
    customer = stack.customer("mallory")
    now = int(time.time())
    body = json.dumps(
        {
            "id": "evt_forged_1",
            "object": "event",
            "type": "checkout.session.completed",
            "created": now,
            "data": {
                "object": {
                    "id": "cs_forged",
                    "object": "checkout.session",
                    "mode": "setup",
                    "customer": customer,
                    "client_reference_id": "mallory",
                    "metadata": {},
                }
            },
        }
    )
    sign = stripe.WebhookSignature.generate_signature_header  # type: ignore[attr-defined]
    cases = {
        "forged": (body, sign(body, "whsec_not_the_secret", now)),
        "stale": (body, sign(body, SECRET, now - 301)),
        "changed": (body.replace("mallory", "mallory2"), sign(body, SECRET, now)),
        "missing": (body, ""),
    }
    for name, (payload, header) in cases.items():
        r = httpx.post(
            f"{stack.server.url}/webhooks/stripe",
            content=payload,
            headers={"Stripe-Signature": header, "Content-Type": "application/json"},
        )
        assert r.status_code == 400, (name, r.text)
    assert stack.subscriptions(customer) == [] and stack.grants(customer) == []
    assert stack.api.get("/v1/orgs/mallory").status_code == 404
    # the same body, correctly signed, is accepted: the refusals were the signature's doing
    r = httpx.post(
        f"{stack.server.url}/webhooks/stripe",
        content=body,
        headers={"Stripe-Signature": sign(body, SECRET, now)},
    )
    assert r.status_code == 200, r.text
    assert len(stack.subscriptions(customer)) == 1


def test_subscription_deleted_makes_the_org_free(stack: Stack) -> None:
    stack.cli("catalog", "publish")
    customer = stack.customer("leaver")
    stack.checkout("leaver", customer)
    stack.flush()
    (sub,) = stack.subscriptions(customer)
    # a foreign subscription's deletion changes nothing
    other = stack.customer("someone-else")
    price = stack.api.get("/v1/catalog").json()["catalog"]["prices"]["pro_base"]["id"]
    foreign = stack.stripe.v1.subscriptions.create(
        params={"customer": other, "items": [{"price": price}]}
    )
    stack.stripe.v1.subscriptions.cancel(foreign.id)
    stack.flush()
    assert stack.org("leaver")["plan"] == "pro"

    stack.stripe.v1.subscriptions.cancel(sub.id)
    stack.flush()
    org = stack.org("leaver")
    assert org["plan"] == "free"
    ended = org["plans"][-1]["effective_from"]
    later = (ended // HOUR + 1) * HOUR
    stack.ingest([tick("leaver-1", "leaver", later + 5, s=100)])
    stack.cli("rollup", "--until", str(later + HOUR))
    rows = stack.ledger("leaver")
    assert rows and all(r["state"] == "excluded" and r["reason"] == "free_plan" for r in rows)


def test_true_up_and_correction_after_finalized(stack: Stack) -> None:
    stack.cli("catalog", "publish")
    customer = stack.customer("big")
    stack.checkout("big", customer)
    stack.flush()
    (sub,) = stack.subscriptions(customer)
    since = stack.org("big")["plans"][-1]["effective_from"]
    bucket = (since // HOUR + 1) * HOUR  # the first whole bucket on the Pro plan
    stack.ingest([tick(f"big-{i}", "big", bucket + 60 * i, s=100) for i in range(3)])  # 300 GB-s
    # Stripe's clock reaches two hours past that bucket; the period ends there.
    emu_now = stack.emulator.state()["now"]
    stack.emu.post(
        "/_emulator/clock", json={"advance": bucket + 2 * HOUR - emu_now}
    ).raise_for_status()
    closed = stack.emu.post(f"/_emulator/subscriptions/{sub.id}/advance", json={"at": "now"})
    closed.raise_for_status()
    invoice_id = closed.json()["invoice"]["id"]
    stack.flush()
    created = stack.deliveries(type="invoice.created")
    assert created and all(d["status"] == 200 for d in created), created
    (row,) = stack.ledger("big")
    assert row["state"] == "sent" and row["quantity"] == 300 and row["bucket_start"] == bucket
    invoice = stack.stripe.v1.invoices.retrieve(invoice_id).to_dict()
    assert invoice["status"] == "draft"
    metered = [
        line for line in invoice["lines"]["data"] if line["quantity"] == 300
    ]  # the usage sent by the true-up is on the invoice
    assert metered, invoice["lines"]["data"]

    stack.emu.post(f"/_emulator/invoices/{invoice_id}/finalize", json={}).raise_for_status()
    stack.flush()
    stack.ingest([tick("big-late", "big", bucket + 900, s=100)])  # 100 GB-s more, too late
    stack.cli("rollup", "--until", str(bucket + HOUR))
    stack.cli("send")
    rows = stack.ledger("big")
    assert len(rows) == 2
    late = rows[1]
    assert late["revision"] == 2 and late["state"] == "sent" and late["quantity"] == 100
    assert f"correction for finalized invoice {invoice_id}" in late["detail"]
    assert "current period" in late["detail"]
    final = stack.stripe.v1.invoices.retrieve(invoice_id).to_dict()
    assert final["status"] == "paid"  # charged to the checkout's card, the invoice default
    assert sorted(line["quantity"] for line in final["lines"]["data"]) == sorted(
        line["quantity"] for line in invoice["lines"]["data"]
    )  # the finalized invoice did not take the correction


def test_a_customer_already_another_orgs_is_refused(stack: Stack) -> None:
    """One Stripe customer maps to one org: a second org's checkout with the first org's
    customer is answered 200 (Stripe stops resending), recorded as refused and alerted, and
    provisions nothing: no subscription link, no second welcome credit, no Pro plan."""
    stack.cli("catalog", "publish")
    customer = stack.customer("shared")
    stack.checkout("first", customer)
    stack.flush()
    (sub,) = stack.subscriptions(customer)
    assert stack.org("first")["plan"] == "pro" and stack.org("first")["subscription"] == sub.id

    session = stack.checkout("second", customer)
    stack.flush()
    event = stack.event_of("checkout.session.completed", id=session)
    assert len(stack.grants(customer)) == 1  # one welcome credit, the first org's
    assert stack.api.get("/v1/orgs/second").status_code == 404  # never linked, not Pro
    assert [s.id for s in stack.subscriptions(customer)] == [sub.id]
    (delivery,) = stack.deliveries(event=event["id"])
    assert delivery["status"] == 200, delivery
    assert f"refused: customer {customer} is org first's" in delivery["response"]
    (alert,) = stack.webhook_alerts()
    assert event["id"] in alert and "'second'" in alert and "'first'" in alert

    # redelivered: the recorded refusal is answered again, nothing more happens
    stack.emu.post(f"/_emulator/events/{event['id']}/redeliver", json={}).raise_for_status()
    stack.flush()
    assert all(d["status"] == 200 for d in stack.deliveries(event=event["id"]))
    assert len(stack.grants(customer)) == 1 and len(stack.webhook_alerts()) == 1

    # the subscription's deletion downgrades its one org; no org is left Pro on it
    stack.stripe.v1.subscriptions.cancel(sub.id)
    stack.flush()
    assert stack.org("first")["plan"] == "free"
    assert stack.api.get("/v1/orgs/second").status_code == 404


def test_a_subscription_made_for_another_org_is_never_adopted(stack: Stack) -> None:
    """Provisioning reuses a subscription an earlier attempt made for the same org (its answer
    lost), never one Stripe holds for another org on the customer."""
    stack.cli("catalog", "publish")
    customer = stack.customer("moved")
    stack.checkout("old-owner", customer)
    stack.flush()
    (theirs,) = stack.subscriptions(customer)
    stack.cli("orgs", "set", "old-owner", "--customer", stack.customer("elsewhere"))

    stack.checkout("new-owner", customer)  # the customer is no org's now: provisioned
    stack.flush()
    mine = stack.org("new-owner")
    assert mine["plan"] == "pro" and mine["customer"] == customer
    assert mine["subscription"] not in (None, theirs.id)
    assert {s.id for s in stack.subscriptions(customer)} == {theirs.id, mine["subscription"]}
    assert stack.org("old-owner")["subscription"] == theirs.id

    stack.stripe.v1.subscriptions.cancel(theirs.id)
    stack.flush()
    assert stack.org("old-owner")["plan"] == "free"
    assert stack.org("new-owner")["plan"] == "pro"
