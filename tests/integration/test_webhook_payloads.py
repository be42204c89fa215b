"""Signed Stripe webhook bodies whose content cannot be used: never a 500.

A signed event of a handled type with a field of the wrong type (or a missing one) is recorded
as unprocessable with the field's path, alerted once and answered 200, so Stripe stops
resending it; a signed body that is not a Stripe event at all (no event id to record) is
answered 400 and alerted. Either way nothing is applied.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import stripe
from litestar.testing import AsyncTestClient
from structlog.testing import capture_logs

from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.http.app import create_app
from controlplane.interfaces import AuditEntry, OrgChange, PlanPeriod, WebhookRecord
from controlplane.plugins.billing.stripe.webhooks import ALERTS, MAX_DEPTH
from tests.conftest import HOUR, T0

SECRET = "whsec_payloads_test"
ORG, CUSTOMER, SUBSCRIPTION = "acme", "cus_acme", "sub_acme"


def sign(body: str | bytes) -> str:
    text = body.decode() if isinstance(body, bytes) else body
    header: str = stripe.WebhookSignature.generate_signature_header(text, SECRET, int(time.time()))
    return header


class Hooks:
    def __init__(self, client: AsyncTestClient[Any], plane: ControlPlane, clock: list[float]):
        self.client = client
        self.plane = plane
        self.clock = clock

    async def post(self, body: str | bytes) -> Any:
        self.clock[0] += 1  # alerts are kept at most one a second
        return await self.client.post(
            "/webhooks/stripe", content=body, headers={"Stripe-Signature": sign(body)}
        )

    async def alerts(self) -> list[str]:
        return [a.text for a in await self.plane.storage.parity_alerts(ALERTS, limit=100)]


@pytest.fixture
async def hooks(make_config: Callable[..., Config], clock: list[float]) -> AsyncIterator[Hooks]:
    config = make_config(stripe={"webhook_secret": SECRET})
    plane = ControlPlane(config, clock=lambda: clock[0])
    async with AsyncTestClient(app=create_app(config, cp=plane)) as client:
        # an org with a customer and a live subscription: every handler finds it
        setup = WebhookRecord("evt_setup", "checkout.session.completed", None, "provisioned")
        change = OrgChange(
            ORG,
            customer=CUSTOMER,
            subscription=SUBSCRIPTION,
            subscription_status="active",
            plan="pro",
            effective_from=T0,
        )
        audit = AuditEntry(action="org.provisioned", subject=ORG, actor="test")
        assert await plane.storage.record_webhook(setup, T0, org=change, audit=[audit])
        yield Hooks(client, plane, clock)


def event(kind: str, obj: Any, **fields: Any) -> dict[str, Any]:
    return {
        "id": f"evt_{kind}_{int(time.time() * 1e6)}",
        "object": "event",
        "type": kind,
        "created": T0 + 5 * HOUR,
        "data": {"object": obj},
        **fields,
    }


INVOICE = {
    "id": "in_1",
    "object": "invoice",
    "customer": CUSTOMER,
    "parent": {"subscription_details": {"subscription": SUBSCRIPTION}},
    "period_start": T0,
    "period_end": T0 + 2 * HOUR,
    "status_transitions": {"finalized_at": T0 + 3 * HOUR},
}
SESSION = {"id": "cs_1", "object": "checkout.session", "mode": "setup", "customer": CUSTOMER}


def without(obj: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != key}


UNPROCESSABLE = {
    "period_start is text": (
        event("invoice.created", {**INVOICE, "period_start": "abc"}),
        "data.object.period_start: expected int, got str",
    ),
    "invoice without id": (
        event("invoice.finalized", without(INVOICE, "id")),
        "data.object.id: required",
    ),
    "period_end a float": (
        event("invoice.finalized", {**INVOICE, "period_end": 1.5}),
        "data.object.period_end: expected int, got float",
    ),
    "period_end of 31 digits": (
        event("invoice.created", {**INVOICE, "period_end": 10**30}),
        "data.object.period_end: expected int <= 253402300799",
    ),
    "period_end in year 10000": (
        event("invoice.created", {**INVOICE, "period_end": 253_402_300_800}),
        "data.object.period_end: expected int <= 253402300799",
    ),
    "finalized_at a boolean": (
        event("invoice.finalized", {**INVOICE, "status_transitions": {"finalized_at": True}}),
        "data.object.status_transitions.finalized_at: expected int | null, got bool",
    ),
    "subscription parent a list": (
        event("invoice.created", {**INVOICE, "parent": []}),
        "data.object.parent: expected object | null, got array",
    ),
    "ended_at text": (
        event(
            "customer.subscription.deleted",
            {"id": SUBSCRIPTION, "object": "subscription", "ended_at": "soon"},
        ),
        "data.object.ended_at: expected int | null, got str",
    ),
    "metadata a list": (
        event("checkout.session.completed", {**without(SESSION, "customer"), "metadata": []}),
        "data.object.metadata: expected object | null, got array",
    ),
    "metadata value a number": (
        event("checkout.session.completed", {**SESSION, "metadata": {"org_id": 7}}),
        "data.object.metadata[...]: expected str, got int",
    ),
    "org id in metadata too long": (
        event("checkout.session.completed", {**SESSION, "metadata": {"org_id": "o" * 257}}),
        "data.object.metadata.org_id: longer than 256 characters",
    ),
    "client_reference_id too long": (
        event("checkout.session.completed", {**SESSION, "client_reference_id": "o" * 257}),
        "data.object.client_reference_id: expected str of length <= 256",
    ),
    "created text": (
        event("invoice.finalized", INVOICE, created="yesterday"),
        "created: expected int, got str",
    ),
    "data an array": (
        {**event("invoice.created", INVOICE), "data": []},
        "data: expected object, got array",
    ),
    "data.object missing": (
        {**event("invoice.created", INVOICE), "data": {}},
        "data.object: required",
    ),
    "type a number": ({**event("invoice.created", INVOICE), "type": 5}, "type: expected str"),
}


@pytest.mark.parametrize("name", list(UNPROCESSABLE))
async def test_unusable_fields_are_recorded_alerted_and_answered_200(
    hooks: Hooks, name: str
) -> None:
    payload, problem = UNPROCESSABLE[name]
    body = json.dumps(payload)
    with capture_logs() as logs:
        r = await hooks.post(body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["event"] == payload["id"] and answer["duplicate"] is False
    assert answer["outcome"].startswith(f"unprocessable: {problem}"), answer
    assert await hooks.plane.storage.webhook_outcome(payload["id"]) == answer["outcome"]
    (warning,) = [e for e in logs if e["event"] == "webhook.unprocessable"]
    assert warning["log_level"] == "warning" and warning["event_id"] == payload["id"]
    assert problem.startswith(warning["path"])
    (alert,) = await hooks.alerts()
    assert payload["id"] in alert and problem in alert
    # nothing applied: the org is as it was, no period closed
    org = await hooks.plane.storage.get_org(ORG)
    assert org is not None and org.plans == [PlanPeriod("pro", T0)]
    assert org.subscription_status == "active"
    assert await hooks.plane.storage.closed_periods([ORG]) == []

    # Stripe resending it (it will not, after a 2xx) changes nothing and alerts no more
    again = await hooks.post(body)
    assert again.status_code == 200
    assert again.json()["duplicate"] is True and again.json()["outcome"] == answer["outcome"]
    assert len(await hooks.alerts()) == 1


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


NOT_EVENTS = {
    "a JSON array": "[]",
    "an array of events": json.dumps([event("invoice.created", INVOICE)]),
    "a JSON string": '"evt_1"',
    "a number": "12",
    "not JSON": "event=invoice.created",
    "no id": json.dumps(without(event("invoice.created", INVOICE), "id")),
    "an id that is a number": json.dumps({**event("invoice.created", INVOICE), "id": 7}),
    "an empty id": json.dumps({**event("invoice.created", INVOICE), "id": ""}),
    "1,000 nested arrays": nested(1000),
    "an event nested 1,000 deep": json.dumps(
        event("invoice.created", {**INVOICE, "metadata": {}})
    ).replace('"metadata": {}', '"metadata": ' + '{"a": ' * 1000 + "1" + "}" * 1000),
    "100,000 nested arrays": nested(100_000),
    "a v2 thin event": json.dumps(
        {"id": "evt_thin", "object": "v2.core.event", "type": "v1.billing.meter.error_report"}
    ),
}


@pytest.mark.parametrize("name", list(NOT_EVENTS))
async def test_signed_bodies_that_are_not_events_get_400_and_an_alert(
    hooks: Hooks, name: str
) -> None:
    with capture_logs() as logs:
        r = await hooks.post(NOT_EVENTS[name])
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "not a Stripe v1 event" in r.json()["detail"]
    assert [e["log_level"] for e in logs if e["event"] == "webhook.not_an_event"] == ["warning"]
    (alert,) = await hooks.alerts()
    assert "not a Stripe v1 event" in alert
    org = await hooks.plane.storage.get_org(ORG)
    assert org is not None and org.plans == [PlanPeriod("pro", T0)]


async def test_nesting_up_to_the_limit_is_decoded(hooks: Hooks) -> None:
    text = 'brackets in text do not nest: \\"' + "[{" * 200 + "\\"  # nor escapes
    lines = {"data": "__inner__", "description": text}
    payload = event("invoice.finalized", {**INVOICE, "lines": lines})

    def body(depth: int) -> str:  # the event, data, object and lines are 4 levels
        return json.dumps(payload).replace('"__inner__"', nested(depth - 4))

    r = await hooks.post(body(MAX_DEPTH))
    assert r.status_code == 200, r.text
    assert r.json()["outcome"] == f"closed period [{T0}, {T0 + 2 * HOUR}) of in_1"
    r = await hooks.post(body(MAX_DEPTH + 1))
    assert r.status_code == 400
    assert f"nested deeper than {MAX_DEPTH} levels" in r.json()["detail"]


async def test_an_unsigned_body_is_refused_without_an_alert(hooks: Hooks) -> None:
    r = await hooks.client.post(
        "/webhooks/stripe", content="[]", headers={"Stripe-Signature": "t=1,v1=00"}
    )
    assert r.status_code == 400
    assert await hooks.alerts() == []
    r = await hooks.client.post(
        "/webhooks/stripe", content=b"\xff\xfe", headers={"Stripe-Signature": sign("x")}
    )
    assert r.status_code == 400
    assert await hooks.alerts() == []


async def test_an_unhandled_type_is_ignored_whatever_its_fields(hooks: Hooks) -> None:
    payload = event("customer.updated", [1, 2], created="whenever")
    r = await hooks.post(json.dumps(payload))
    assert r.status_code == 200
    assert r.json()["outcome"] == "ignored: type not handled"
    assert await hooks.alerts() == []


async def test_usable_events_are_still_applied(hooks: Hooks) -> None:
    finalized = event("invoice.finalized", INVOICE)
    r = await hooks.post(json.dumps(finalized))
    assert r.status_code == 200, r.text
    assert r.json()["outcome"] == f"closed period [{T0}, {T0 + 2 * HOUR}) of in_1"
    (period,) = await hooks.plane.storage.closed_periods([ORG])
    assert (period.invoice_id, period.finalized_at) == ("in_1", T0 + 3 * HOUR)
    checkout = event(
        "checkout.session.completed",
        {**SESSION, "client_reference_id": ORG, "metadata": {"note": "n" * 500}},
    )
    r = await hooks.post(json.dumps(checkout))
    assert (
        r.status_code == 200 and r.json()["outcome"] == f"no-op: {ORG} already has {SUBSCRIPTION}"
    )
    deleted = event(
        "customer.subscription.deleted",
        {"id": SUBSCRIPTION, "object": "subscription", "ended_at": None, "canceled_at": T0 + 9},
    )
    r = await hooks.post(json.dumps(deleted))
    assert r.status_code == 200 and r.json()["outcome"] == f"free from {T0 + 9}"
    org = await hooks.plane.storage.get_org(ORG)
    assert org is not None and org.plans[-1] == PlanPeriod("free", T0 + 9)
    assert await hooks.alerts() == []


async def test_subscription_updates_follow_the_plan_policy_audited(hooks: Hooks) -> None:
    """Without the Stripe plugin the event's own subscription decides (with it, the product
    retrieves the subscription: tests/e2e/test_subscription_lifecycle.py)."""

    def updated(status: str, at: int) -> dict[str, Any]:
        sub = {"id": SUBSCRIPTION, "object": "subscription", "status": status}
        return {**event("customer.subscription.updated", sub), "created": at}

    grace_end = T0 + 2 * HOUR + 7 * 86_400
    past_due = updated("past_due", T0 + 2 * HOUR)
    r = await hooks.post(json.dumps(past_due))
    assert r.status_code == 200 and r.json()["outcome"] == f"free from {grace_end}"
    again = await hooks.post(json.dumps(past_due))
    assert again.json()["duplicate"] is True
    org = await hooks.plane.storage.get_org(ORG)
    assert org is not None and org.subscription_status == "past_due"
    assert org.plans == [PlanPeriod("pro", T0), PlanPeriod("free", grace_end)]
    assert org.plan_at(grace_end - 1) == "pro"

    r = await hooks.post(json.dumps(updated("active", T0 + 3 * HOUR)))
    assert r.json()["outcome"] == f"pro from {grace_end}"  # the downgrade written ahead, undone
    r = await hooks.post(json.dumps(updated("active", T0 + 4 * HOUR)))
    assert r.json()["outcome"] == f"unchanged: {SUBSCRIPTION} is active"
    org = await hooks.plane.storage.get_org(ORG)
    assert org is not None and org.plan_at(grace_end + 1) == "pro"
    audit = await hooks.plane.storage.audit_log(action_prefix="org.subscription")
    assert [a.after["status"] for a in reversed(audit) if a.after] == ["past_due", "active"]

    missing = {"id": SUBSCRIPTION, "object": "subscription"}
    r = await hooks.post(json.dumps(event("customer.subscription.updated", missing)))
    assert r.json()["outcome"] == "unprocessable: data.object.status: required"
