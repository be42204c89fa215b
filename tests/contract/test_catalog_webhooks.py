"""Catalog versions, and provider webhooks applied once with their org changes."""

from __future__ import annotations

from controlplane.interfaces import (
    CatalogVersion,
    ClosedPeriod,
    OrgChange,
    PlanPeriod,
    Storage,
    WebhookRecord,
)
from tests.contract.conftest import Store
from tests.contract.helpers import NOW, B, entry

CATALOG = {
    "meters": {"gbs": {"id": "mtr_1", "event_name": "memory_gb_seconds"}},
    "prices": {"pro_gbs": {"id": "price_1", "lookup_key": "pro_gbs", "unit_amount": "0.0001"}},
    "welcome_credit": {"amount": 500, "currency": "usd"},
}


# catalog --------------------------------------------------------------------------------


async def test_publishing_adds_versions_and_audits_each(store: Store, storage: Storage) -> None:
    assert await storage.catalog_version() is None
    assert await storage.catalog_version(1) is None

    first = await storage.publish_catalog(
        CATALOG, "digest-1", "alice", NOW, entry("catalog.publish", "catalog", after={"d": 1})
    )
    assert first == CatalogVersion(1, NOW, "alice", "digest-1", CATALOG)
    changed = {**CATALOG, "prices": {"pro_gbs": {"id": "price_2", "lookup_key": "pro_gbs"}}}
    second = await storage.publish_catalog(
        changed, "digest-2", "bob", NOW + 60, entry("catalog.publish", "catalog", after={"d": 2})
    )
    assert second == CatalogVersion(2, NOW + 60, "bob", "digest-2", changed)

    other = await store.open()
    assert await other.catalog_version() == second
    assert await other.catalog_version(2) == second
    assert await other.catalog_version(1) == first
    assert await other.catalog_version(3) is None

    audit = await storage.audit_log(action_prefix="catalog.")
    assert [(a.subject, a.at) for a in audit] == [("catalog", NOW + 60), ("catalog", NOW)]
    # The version is only known inside the transaction: the store adds it to the record.
    assert [a.after for a in audit] == [{"d": 2, "version": 2}, {"d": 1, "version": 1}]


# webhooks -------------------------------------------------------------------------------


async def test_a_webhook_is_recorded_once_with_its_org_change(storage: Storage) -> None:
    assert await storage.webhook_outcome("evt_1") is None
    record = WebhookRecord("evt_1", "checkout.session.completed", NOW - 5, "provisioned")
    change = OrgChange(
        "a",
        customer="cus_a",
        subscription="sub_1",
        subscription_status="active",
        plan="pro",
        effective_from=B[0],
    )
    fresh = await storage.record_webhook(
        record, NOW, org=change, audit=[entry("org.provisioned", "a")]
    )
    assert fresh is True
    assert await storage.webhook_outcome("evt_1") == "provisioned"
    org = await storage.get_org("a")
    assert org is not None
    assert (org.customer, org.subscription, org.subscription_status, org.updated_at) == (
        "cus_a",
        "sub_1",
        "active",
        NOW,
    )
    assert org.plans == [PlanPeriod("pro", B[0])]
    audit = await storage.audit_log()

    # Delivered again (even with other content): nothing changes.
    replay = WebhookRecord("evt_1", "checkout.session.completed", NOW - 5, "something else")
    other_change = OrgChange("a", customer="cus_X", subscription="sub_X", plan="free")
    assert not await storage.record_webhook(
        replay, NOW + 5, org=other_change, audit=[entry("org.provisioned", "a")]
    )
    assert await storage.get_org("a") == org
    assert await storage.audit_log() == audit
    assert await storage.webhook_outcome("evt_1") == "provisioned"

    # A later event changes only what it names.
    deleted = WebhookRecord("evt_2", "customer.subscription.deleted", None, "marked free")
    cancel = OrgChange("a", subscription_status="canceled", plan="free", effective_from=B[5])
    assert await storage.record_webhook(deleted, NOW + 10, org=cancel)
    org = await storage.get_org("a")
    assert org is not None
    assert (org.customer, org.subscription, org.subscription_status, org.updated_at) == (
        "cus_a",
        "sub_1",
        "canceled",
        NOW + 10,
    )
    assert org.plans == [PlanPeriod("pro", B[0]), PlanPeriod("free", B[5])]
    assert await storage.webhook_outcome("evt_2") == "marked free"

    # An event that changes nothing is still recorded once.
    ignored = WebhookRecord("evt_3", "customer.created", NOW, "ignored: not handled")
    assert await storage.record_webhook(ignored, NOW)
    assert not await storage.record_webhook(ignored, NOW + 1)
    assert await storage.webhook_outcome("evt_3") == "ignored: not handled"


async def test_a_webhook_keeps_what_set_org_stored(storage: Storage) -> None:
    await storage.set_org(
        "a", customer="cus_a", plan="free", effective_from=0, at=NOW, audit=entry("org.set", "a")
    )
    record = WebhookRecord("evt_1", "checkout.session.completed", None, "provisioned")
    change = OrgChange(
        "a", subscription="sub_1", subscription_status="active", plan="pro", effective_from=B[2]
    )
    assert await storage.record_webhook(record, NOW + 1, org=change)
    org = await storage.get_org("a")
    assert org is not None
    assert (org.customer, org.subscription) == ("cus_a", "sub_1")
    assert org.plans == [PlanPeriod("free", 0), PlanPeriod("pro", B[2])]


async def test_closed_periods_are_kept_by_invoice_oldest_first(storage: Storage) -> None:
    periods = [
        ClosedPeriod("in_2", "a", B[24], B[48], NOW + 2),
        ClosedPeriod("in_1", "a", B[0], B[24], NOW + 1),
        ClosedPeriod("in_b", "b", B[0], B[24], NOW + 3),
    ]
    for n, period in enumerate(periods):
        record = WebhookRecord(f"evt_{n}", "invoice.finalized", None, "period closed")
        assert await storage.record_webhook(record, NOW, closed=period)
    # Another event for an invoice already closed does not add a period.
    dupe = ClosedPeriod("in_1", "a", B[1], B[2], NOW + 9)
    assert await storage.record_webhook(
        WebhookRecord("evt_9", "invoice.finalized", None, "period closed"), NOW, closed=dupe
    )

    assert await storage.closed_periods(["a"]) == [periods[1], periods[0]]
    assert await storage.closed_periods(["b"]) == [periods[2]]
    both = await storage.closed_periods(["a", "b", "nobody"])
    assert sorted(both, key=lambda p: p.invoice_id) == sorted(periods, key=lambda p: p.invoice_id)
    assert [p.invoice_id for p in both if p.org_id == "a"] == ["in_1", "in_2"]
    assert await storage.closed_periods([]) == []
    assert await storage.closed_periods(["nobody"]) == []


async def test_org_for_billing_by_subscription_then_customer(storage: Storage) -> None:
    for org, customer, subscription in (("a", "cus_a", "sub_1"), ("b", "cus_b", "sub_2")):
        change = OrgChange(
            org, customer=customer, subscription=subscription, subscription_status="active"
        )
        record = WebhookRecord(f"evt_{org}", "checkout.session.completed", None, "provisioned")
        assert await storage.record_webhook(record, NOW, org=change)
    await storage.set_org(
        "c", customer="cus_c", plan="pro", effective_from=0, at=NOW, audit=entry("org.set", "c")
    )

    find = storage.org_for_billing
    assert await find(subscription="sub_1", customer=None) == "a"
    assert await find(subscription=None, customer="cus_b") == "b"
    assert await find(subscription=None, customer="cus_c") == "c"
    assert await find(subscription="sub_2", customer="cus_a") == "b"  # subscription first
    assert await find(subscription="sub_unknown", customer="cus_a") == "a"  # then customer
    assert await find(subscription="sub_unknown", customer="cus_unknown") is None
    assert await find(subscription=None, customer=None) is None

    # Only the org's current subscription counts.
    renewed = OrgChange("a", subscription="sub_3", subscription_status="active")
    record = WebhookRecord("evt_renew", "checkout.session.completed", None, "provisioned")
    assert await storage.record_webhook(record, NOW + 1, org=renewed)
    assert await find(subscription="sub_3", customer=None) == "a"
    assert await find(subscription="sub_1", customer=None) is None


async def test_subscription_lifecycle_changes_write_several_plan_periods(
    storage: Storage,
) -> None:
    """A lifecycle event may write more than one plan period at once (the paid plan from now,
    and a grace end written ahead overwritten with it); statuses are counted per status."""
    assert await storage.subscription_statuses() == {}
    start = OrgChange("a", customer="cus_a", subscription="sub_1", subscription_status="incomplete")
    assert await storage.record_webhook(
        WebhookRecord("evt_1", "checkout.session.completed", NOW, "incomplete"), NOW, org=start
    )
    other = OrgChange("b", customer="cus_b", subscription="sub_2", subscription_status="active")
    assert await storage.record_webhook(
        WebhookRecord("evt_2", "checkout.session.completed", NOW, "ok"), NOW, org=other
    )
    assert await storage.subscription_statuses() == {"active": 1, "incomplete": 1}
    org = await storage.get_org("a")
    assert org is not None and org.plans == [] and org.subscription_status == "incomplete"

    paid = OrgChange(
        "a",
        subscription_status="active",
        plans=(PlanPeriod("pro", B[1]), PlanPeriod("free", B[5])),
    )
    assert await storage.record_webhook(
        WebhookRecord("evt_3", "customer.subscription.updated", B[1], "paid"), NOW, org=paid
    )
    recovered = OrgChange("a", plans=(PlanPeriod("pro", B[5]),))  # the status kept
    assert await storage.record_webhook(
        WebhookRecord("evt_4", "customer.subscription.updated", B[2], "paid"), NOW, org=recovered
    )
    org = await storage.get_org("a")
    assert org is not None
    assert org.plans == [PlanPeriod("pro", B[1]), PlanPeriod("pro", B[5])]
    assert org.subscription_status == "active"
    assert await storage.subscription_statuses() == {"active": 2}
