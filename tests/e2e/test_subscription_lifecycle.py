"""The subscription lifecycle end to end: `controlplane serve` and the Stripe emulator, the real
stripe SDK over HTTP, webhooks delivered by the emulator, its clock advanced over HTTP.

An org is Pro only when its subscription is paid; a declined first payment leaves the plan as
it was and shows (API, metric, alert); a failed renewal keeps Pro for the grace period, then
free; redelivered and out-of-order lifecycle events give the same plans; an endpoint on an
older API version gets the older shapes and is still understood.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import HOUR
from tests.e2e.test_stripe_webhooks import SECRET, Stack

pytestmark = pytest.mark.e2e

DAY = 86_400
GRACE = 7 * DAY  # [stripe.plan_policy] grace_seconds.past_due, the default


class Lifecycle(Stack):
    def checkout_with(self, org: str, customer: str, card: str) -> httpx.Response:
        """A setup checkout the customer completes with the test card `card`."""
        session = self.stripe.v1.checkout.sessions.create(
            params={
                "mode": "setup",
                "currency": "usd",
                "customer": customer,
                "client_reference_id": org,
            }
        )
        return self.emu.post(
            f"/_emulator/checkout/{session.id}/complete", json={"payment_method": card}
        )

    def pro(self, org: str, card: str = "pm_card_visa") -> tuple[str, str]:
        """An org provisioned with `card`: its customer and subscription."""
        customer = self.customer(org)
        self.checkout_with(org, customer, card).raise_for_status()
        self.flush()
        found = self.org(org)
        assert found["plan"] == "pro" and found["subscription_status"] == "active", found
        return customer, found["subscription"]

    def advance(self, seconds: float) -> None:
        self.emu.post("/_emulator/clock", json={"advance": seconds}).raise_for_status()
        self.flush()

    def fail_card(self, customer: str) -> None:
        """From now on the customer's invoices are charged to a card that declines."""
        pm = self.stripe.v1.payment_methods.attach(
            "pm_card_chargeCustomerFail", {"customer": customer}
        )
        self.stripe.v1.customers.update(
            customer, {"invoice_settings": {"default_payment_method": pm.id}}
        )

    def renew(self, sub: str) -> dict[str, Any]:
        """Move Stripe's clock past the period end and the renewal's finalization (an hour
        later, when the payment is tried); the renewal invoice."""
        end = self.stripe.v1.subscriptions.retrieve(sub)["items"].data[0].current_period_end
        self.advance(end - self.emulator.state()["now"] + HOUR + 60)
        latest = self.stripe.v1.subscriptions.retrieve(sub).latest_invoice
        return self.stripe.v1.invoices.retrieve(str(latest)).to_dict()  # type: ignore[no-any-return]

    def metric(self, name: str, **labels: str) -> float | None:
        text = self.api.get("/metrics").text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith(f"{name}{{{want}}} ") or (
                not labels and line.startswith(name + " ")
            ):
                return float(line.rsplit(" ", 1)[1])
        return None


def plan_at(org: dict[str, Any], when: int) -> str | None:
    current = None
    for period in org["plans"]:
        if period["effective_from"] <= when:
            current = period["plan"]
    return current


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Lifecycle]:
    s = Lifecycle(tmp_path)
    try:
        s.cli("catalog", "publish")
        yield s
    except BaseException:
        print("server log:\n", s.server.output(), "\nemulator log:\n", s.emulator.output())
        raise
    finally:
        s.close()


def test_a_paid_checkout_makes_the_org_pro_with_the_checkouts_card(stack: Lifecycle) -> None:
    customer, sub_id = stack.pro("happy")
    session = stack.event_of("checkout.session.completed", customer=customer)["data"]["object"]
    intent = stack.stripe.v1.setup_intents.retrieve(session["setup_intent"])
    found = stack.stripe.v1.customers.retrieve(customer)
    assert found.invoice_settings.default_payment_method == intent.payment_method  # CO-4
    sub = stack.stripe.v1.subscriptions.retrieve(sub_id)
    first = stack.stripe.v1.invoices.retrieve(str(sub.latest_invoice))
    assert sub.status == "active" and first.status == "paid" and first.amount_paid == 2000
    assert len(stack.grants(customer)) == 1
    assert stack.metric("controlplane_org_subscriptions", status="active") == 1


def test_a_declining_card_leaves_the_plan_unchanged_visibly_then_expires(
    stack: Lifecycle,
) -> None:
    customer = stack.customer("decliner")
    refused = stack.checkout_with("decliner", customer, "pm_card_visa_chargeDeclined")
    assert refused.status_code == 402  # such a card cannot even be set up (PM-3)
    stack.checkout_with("decliner", customer, "pm_card_chargeCustomerFail").raise_for_status()
    stack.flush()
    (sub,) = stack.subscriptions(customer)
    assert sub.status == "incomplete"
    org = stack.org("decliner")
    assert org["subscription"] == sub.id and org["subscription_status"] == "incomplete"
    assert org["plan"] is None and org["plans"] == []  # never Pro
    assert stack.grants(customer) == []  # no welcome credit for an unpaid subscription
    assert stack.metric("controlplane_org_subscriptions", status="incomplete") == 1
    (alert,) = stack.webhook_alerts()
    assert sub.id in alert and "incomplete" in alert and "'decliner'" in alert

    stack.advance(23 * HOUR + 60)  # SUB-4
    assert stack.stripe.v1.subscriptions.retrieve(sub.id).status == "incomplete_expired"
    org = stack.org("decliner")
    assert org["subscription_status"] == "incomplete_expired" and org["plans"] == []
    assert stack.metric("controlplane_org_subscriptions", status="incomplete_expired") == 1


def test_a_new_card_pays_an_incomplete_subscription(stack: Lifecycle) -> None:
    customer = stack.customer("retrier")
    stack.checkout_with("retrier", customer, "pm_card_chargeCustomerFail").raise_for_status()
    stack.flush()
    assert stack.org("retrier")["subscription_status"] == "incomplete"
    stack.checkout_with("retrier", customer, "pm_card_visa").raise_for_status()
    stack.flush()
    (sub,) = stack.subscriptions(customer)
    org = stack.org("retrier")
    assert sub.status == "active" and org["subscription"] == sub.id
    assert org["plan"] == "pro" and org["subscription_status"] == "active"
    assert len(stack.grants(customer)) == 1


def test_a_failed_renewal_keeps_pro_for_the_grace_then_free(stack: Lifecycle) -> None:
    customer, sub_id = stack.pro("renewer")
    stack.fail_card(customer)
    invoice = stack.renew(sub_id)
    assert invoice["status"] == "open" and invoice["attempted"]
    assert stack.stripe.v1.subscriptions.retrieve(sub_id).status == "past_due"
    failed = invoice["status_transitions"]["finalized_at"]
    org = stack.org("renewer")
    assert org["subscription_status"] == "past_due"
    assert plan_at(org, failed + GRACE - 1) == "pro"  # within the grace
    assert plan_at(org, failed + GRACE) == "free"  # written ahead: nothing has to run then

    stack.advance(16 * DAY)  # the retries (3, 5, 7 days apart) fail; Stripe cancels
    assert stack.stripe.v1.subscriptions.retrieve(sub_id).status == "canceled"
    after = stack.org("renewer")
    assert after["subscription_status"] == "canceled"
    assert after["plans"] == org["plans"]  # free from the grace's end, as written


def test_lifecycle_events_out_of_order_and_redelivered_give_the_same_plans(
    stack: Lifecycle,
) -> None:
    # In order, as reference: a failed renewal that ends in cancellation.
    ref_customer, ref_sub = stack.pro("in-order")
    stack.fail_card(ref_customer)
    stack.renew(ref_sub)
    stack.advance(16 * DAY)
    reference = stack.org("in-order")

    # The same story with every event held, then delivered in reverse and shuffled.
    customer, sub_id = stack.pro("reversed")
    stack.fail_card(customer)
    stack.emu.post("/_emulator/webhooks", json={"hold": True}).raise_for_status()
    invoice = stack.renew(sub_id)
    stack.emu.post("/_emulator/clock", json={"advance": 16 * DAY}).raise_for_status()
    released = stack.emu.post("/_emulator/webhooks/release", json={"order": "reverse"}).json()
    assert released["released"] > 5
    stack.emu.post("/_emulator/webhooks", json={"hold": False}).raise_for_status()
    stack.flush()
    org = stack.org("reversed")
    failed = invoice["status_transitions"]["finalized_at"]
    assert org["subscription_status"] == reference["subscription_status"] == "canceled"
    shift = (
        failed
        - stack.stripe.v1.invoices.retrieve(
            str(stack.stripe.v1.subscriptions.retrieve(ref_sub).latest_invoice)
        ).status_transitions.finalized_at
    )
    assert [(p["plan"], p["effective_from"]) for p in org["plans"][1:]] == [
        (p["plan"], p["effective_from"] + shift) for p in reference["plans"][1:]
    ]
    assert plan_at(org, failed + GRACE - 1) == "pro" and plan_at(org, failed + GRACE) == "free"

    # Every lifecycle event again: answered as duplicates, nothing changes.
    events = stack.stripe.v1.events.list(params={"type": "customer.subscription.*", "limit": 100})
    ours = [e for e in events.data if e.data.object["id"] == sub_id]
    for event in ours:
        stack.emu.post(f"/_emulator/events/{event.id}/redeliver", json={}).raise_for_status()
    stack.flush()
    assert stack.org("reversed")["plans"] == org["plans"]
    for event in ours:
        assert all(d["status"] == 200 for d in stack.deliveries(event=event.id))


def test_a_payment_within_the_grace_keeps_pro_whatever_the_order(stack: Lifecycle) -> None:
    customer, sub_id = stack.pro("recovers")
    stack.fail_card(customer)
    stack.emu.post("/_emulator/webhooks", json={"hold": True}).raise_for_status()
    invoice = stack.renew(sub_id)
    paid = stack.stripe.v1.invoices.pay(invoice["id"], {"payment_method": "pm_card_visa"})
    assert paid.status == "paid"
    stack.emu.post("/_emulator/webhooks/release", json={"order": "reverse"}).raise_for_status()
    stack.emu.post("/_emulator/webhooks", json={"hold": False}).raise_for_status()
    stack.flush()
    org = stack.org("recovers")
    assert org["subscription_status"] == "active"
    assert {p["plan"] for p in org["plans"]} == {"pro"}  # never free


def test_an_endpoint_on_an_older_api_version_is_understood(stack: Lifecycle) -> None:
    """The product's endpoint pinned to a version before basil: invoices name their
    subscription in `subscription`, not `parent`; the true-up still finds the org."""
    stack.emu.post("/_emulator/reset", json={}).raise_for_status()
    r = stack.emu.post(
        "/_emulator/webhook_endpoints",
        json={
            "url": f"{stack.server.url}/webhooks/stripe",
            "enabled_events": ["*"],
            "secret": SECRET,
            "api_version": "2025-02-24.acacia",
        },
    )
    r.raise_for_status()
    stack.cli("catalog", "publish")
    customer, sub_id = stack.pro("old-version")
    # only the subscription names the org now: the invoice's `subscription` field must be read
    stack.cli("orgs", "set", "old-version", "--customer", stack.customer("elsewhere"))
    stack.emu.post(f"/_emulator/subscriptions/{sub_id}/advance", json={}).raise_for_status()
    stack.flush()
    created = stack.deliveries(type="invoice.created")
    assert created and all(d["status"] == 200 for d in created), created
    assert any("true-up" in str(d["response"]) for d in created), created
    renewed = stack.deliveries(type="customer.subscription.updated")
    assert renewed and all(d["status"] == 200 for d in renewed)
    assert stack.org("old-version")["subscription_status"] == "active"
    assert stack.org("old-version")["customer"] != customer
