"""The provider's error reports: reported rows held with the code, the org's customer flagged,
the report recorded once, on every storage plugin."""

from __future__ import annotations

from controlplane.interfaces import ProviderError, Storage, WebhookRecord
from controlplane.ledger import CUSTOMER_NOT_FOUND, LedgerRow, Reason, RowState
from tests.contract.helpers import HOUR, NOW, UNIT, B, by_id, claim, entry, event, pro, roll
from tests.contract.helpers import settlement as decided

REPORT = "v1.billing.meter.error_report_triggered"


def report(event_id: str, *errors: tuple[str, str]) -> tuple[WebhookRecord, list[ProviderError]]:
    record = WebhookRecord(event_id=event_id, type=REPORT, created=NOW, outcome="error report")
    return record, [ProviderError(identifier=i, code=c, message=f"{c}!") for i, c in errors]


async def rows_of(storage: Storage, org: str, *values: int) -> list[LedgerRow]:
    await storage.insert_events(
        [event(f"{org}{i}", org, B[i] + 1, v) for i, v in enumerate(values)], HOUR
    )
    await roll(storage)
    return await storage.ledger(org_id=org, limit=100)


async def test_reported_sent_and_attempted_rows_are_held_with_the_code(storage: Storage) -> None:
    await pro(storage, "a")
    r0, r1, r2, r3 = await rows_of(storage, "a", UNIT, 2 * UNIT, 3 * UNIT, 4 * UNIT)
    await storage.sendable(0, 100, claim=claim("s"))
    await storage.record_attempts([r0.id, r1.id, r2.id], NOW)
    await storage.settle(
        [
            decided(r0, RowState.SENT, customer="cus_a"),
            decided(r1, RowState.SENT, customer="cus_a"),
        ],
        NOW,
        "s",
    )
    await storage.release_claims("s")
    record, errors = report(
        "evt_1",
        (r0.identifier, CUSTOMER_NOT_FOUND),
        (r2.identifier, "meter_event_no_customer_defined"),  # attempted, answer lost
        (r3.identifier, CUSTOMER_NOT_FOUND),  # never attempted: not at the provider
        ("someone-else:1", "no_meter"),
    )
    result = await storage.hold_provider_errors(record, errors, NOW + 5, "stripe-thin-event")
    assert result is not None
    assert sorted(result.held) == sorted([r0.identifier, r2.identifier])
    assert result.unmatched == sorted([r3.identifier, "someone-else:1"])
    assert result.flagged == ["a"]
    rows = by_id(await storage.ledger())
    assert (rows[r0.id].state, rows[r0.id].reason, rows[r0.id].detail) == (
        RowState.HELD,
        Reason.PROVIDER_ERROR,
        CUSTOMER_NOT_FOUND,
    )
    assert rows[r2.id].detail == "meter_event_no_customer_defined"
    assert (rows[r1.id].state, rows[r3.id].state) == (RowState.SENT, RowState.PENDING)
    org = await storage.get_org("a")
    assert org is not None and org.customer_error == CUSTOMER_NOT_FOUND
    held = await storage.audit_log(action_prefix="ledger.held")
    assert sorted(a.subject for a in held) == sorted([r0.identifier, r2.identifier])
    before = {a.subject: a.before for a in held}
    assert before[r0.identifier] == {"state": "sent", "reason": None}
    assert before[r2.identifier] == {"state": "pending", "reason": None}
    (flag,) = await storage.audit_log(action_prefix="org.customer_flagged")
    assert (flag.subject, flag.reason) == ("a", f"{REPORT} evt_1")
    assert await storage.webhook_outcome("evt_1") == "error report"


async def test_a_report_is_applied_once_and_a_held_row_is_not_settled(storage: Storage) -> None:
    await pro(storage, "a")
    (r0,) = await rows_of(storage, "a", UNIT)
    await storage.sendable(0, 100, claim=claim("s"))
    await storage.record_attempts([r0.id], NOW)
    record, errors = report("evt_2", (r0.identifier, "meter_event_invalid_value"))
    assert await storage.hold_provider_errors(record, errors, NOW + 1, "t") is not None
    assert await storage.hold_provider_errors(record, errors, NOW + 2, "t") is None
    # another report naming the same row changes nothing either
    again, same = report("evt_3", (r0.identifier, CUSTOMER_NOT_FOUND))
    result = await storage.hold_provider_errors(again, same, NOW + 3, "t")
    assert result is not None and result.held == [] and result.flagged == []
    assert len(await storage.audit_log(action_prefix="ledger.held")) == 1
    # a sender that attempted it before the report cannot settle it as sent afterwards
    assert await storage.settle([decided(r0, RowState.SENT, customer="cus_a")], NOW + 4, "s") == 0
    (row,) = await storage.ledger()
    assert (row.state, row.detail) == (RowState.HELD, "meter_event_invalid_value")
    assert row.id not in [i.row.id for i in await storage.sendable(0, 100, claim=claim("x"))]


async def test_setting_the_customer_again_clears_the_flag(storage: Storage) -> None:
    await pro(storage, "a")
    (r0,) = await rows_of(storage, "a", UNIT)
    await storage.sendable(0, 100, claim=claim("s"))
    await storage.record_attempts([r0.id], NOW)
    await storage.settle([decided(r0, RowState.SENT, customer="cus_a")], NOW, "s")
    record, errors = report("evt_4", (r0.identifier, CUSTOMER_NOT_FOUND))
    await storage.hold_provider_errors(record, errors, NOW + 1, "t")
    await storage.set_org(
        "a", customer=None, plan="pro", effective_from=0, at=NOW + 2, audit=entry("org.set", "a")
    )
    org = await storage.get_org("a")
    assert org is not None and org.customer_error == CUSTOMER_NOT_FOUND  # no customer given
    await storage.set_org(
        "a", customer="cus_a2", plan=None, effective_from=0, at=NOW + 3, audit=entry("org.set", "a")
    )
    org = await storage.get_org("a")
    assert org is not None and (org.customer, org.customer_error) == ("cus_a2", None)


async def test_a_provider_error_row_is_re_issued_under_a_new_identifier(storage: Storage) -> None:
    await pro(storage, "a")
    (r0,) = await rows_of(storage, "a", 3 * UNIT)
    await storage.sendable(0, 100, claim=claim("s"))
    await storage.record_attempts([r0.id], NOW)
    await storage.settle([decided(r0, RowState.SENT, customer="cus_a")], NOW, "s")
    await storage.release_claims("s")
    record, errors = report("evt_5", (r0.identifier, "meter_event_no_customer_defined"))
    await storage.hold_provider_errors(record, errors, NOW + 1, "t")
    (new,) = await storage.reissue_rows([r0.id], NOW + 2, "ops", "released: fixed")
    assert new.identifier != r0.identifier and new.revision == r0.revision + 1
    rows = by_id(await storage.ledger())
    assert (rows[r0.id].state, rows[r0.id].reason) == (RowState.CANCELLED, Reason.REISSUED)
    (fresh,) = [r for r in rows.values() if r.id != r0.id]
    assert (fresh.state, fresh.quantity, fresh.value_micros) == (RowState.PENDING, 3, 3 * UNIT)
    (audit,) = await storage.audit_log(action_prefix="ledger.reissued")
    assert audit.before == {"state": "held", "quantity": 3}
    assert await storage.reissue_rows([r0.id], NOW + 3, "ops", "again") == []
