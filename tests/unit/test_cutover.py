"""Cutover: plan, each preflight check failing and passing, atomic execute, rollback, stages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import pytest

from controlplane import cutover
from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.errors import FlagRefused, StorageError
from controlplane.flags import FlagChange
from controlplane.interfaces import (
    AuditEntry,
    Delivery,
    LegacyCapability,
    LegacySource,
    MeterEvent,
    Outcome,
    ParityRun,
)
from controlplane.ledger import RowState
from controlplane.plugins.billing.fake import FakeBilling
from controlplane.times import iso
from tests.conftest import HOUR, T0, tick

# the clock fixture reads T0 + 10 h: settled buckets (settle 2 h) end at T0 + 8 h
T = T0 + 9 * HOUR
CATALOG = {
    "products": [{"key": "pro", "name": "Pro"}],
    "prices": [
        {"key": "m", "product": "pro", "lookup_key": "m", "meter": "gbs", "unit_amount": "0.1"}
    ],
}


class Legacy(LegacySource):
    name = "test"

    def __init__(self, billed_until: int | None = None, can_tell: bool = True) -> None:
        self._until = billed_until
        self._can = can_tell

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def usage(self, start: int, end: int) -> dict[str, Decimal]:
        return {}

    def capabilities(self) -> frozenset[LegacyCapability]:
        return frozenset({LegacyCapability.BILLED_UNTIL}) if self._can else frozenset()

    async def billed_until(self) -> int | None:
        if not self._can:
            return await super().billed_until()
        return self._until


@pytest.fixture
def build(
    make_config: Callable[..., Config], clock: list[float], fake_billing: FakeBilling
) -> Callable[..., Any]:
    def make(legacy: LegacySource | None = None, **sections: Any) -> ControlPlane:
        sections.setdefault("parity", {"meter": "gbs"})
        sections.setdefault("cutover", {"parity_clean_hours": 3})
        return ControlPlane(
            make_config(**sections), billing=fake_billing, legacy=legacy, clock=lambda: clock[0]
        )

    return make


@pytest.fixture
async def ready(build: Callable[..., ControlPlane]) -> AsyncIterator[ControlPlane]:
    """Every precondition met for T: clean parity for 4 h up to the settled horizon, the
    catalog published, the pro org with a customer, the legacy biller billed up to T."""
    async with build(Legacy(billed_until=T), catalog=CATALOG) as cp:
        await clean_runs(cp, T0 + 4 * HOUR, T0 + 8 * HOUR)
        await publish(cp)
        await cp.set_org("o1", customer="cus_1", plan="pro", actor="t", effective_from=0)
        yield cp


async def live_with_one_row(cp: ControlPlane) -> None:
    """One pending row for o1's bucket T, and the control plane live from T."""
    await cp.ingest([tick("a", "o1", T + 5)], "http")
    await cp.rollup(until=T + HOUR)
    await cp.cutover.execute(T, actor="ops", reason="go")


async def clean_runs(cp: ControlPlane, start: int, end: int, dirty: int | None = None) -> None:
    for b in range(start, end, HOUR):
        clean = b != dirty
        run = ParityRun(
            meter="gbs",
            bucket_start=b,
            bucket_end=b + HOUR,
            checked_at=cp.now(),
            orgs=1,
            mismatches=0 if clean else 1,
            material=0,
            controlplane_micros=1,
            legacy_micros=1,
            worst_org=None,
            worst_drift_micros=0,
            worst_relative=None,
            clean=clean,
            alarming=False,
            alarm_since=None,
        )
        await cp.storage.record_parity_run(run, [], None)


async def publish(cp: ControlPlane) -> None:
    await cp.storage.publish_catalog(
        {"prices": {}},
        "d1",
        "t",
        cp.now(),
        AuditEntry(action="catalog.publish", subject="1", actor="t"),
    )


def by_name(report: cutover.Preflight) -> dict[str, cutover.Check]:
    return {c.name: c for c in report.checks}


# plan -----------------------------------------------------------------------------------------


async def test_plan_explains_who_bills_what_and_changes_nothing(ready: ControlPlane) -> None:
    await ready.ingest([tick("a", "o1", T - HOUR + 5), tick("b", "o1", T + 5)], "http")
    await ready.rollup(until=T + HOUR)
    before = await ready.flags()
    plan = await ready.cutover.plan(T)
    assert plan.before == [
        "legacy biller: every bucket",
        "control plane: computes in shadow, sends nothing",
    ]
    assert plan.after == [
        f"legacy biller: buckets starting before {iso(T)} ({T})",
        f"control plane: buckets starting at or after {iso(T)} ({T}) (sending)",
    ]
    assert [(c.flag, c.before, c.after) for c in plan.changes] == [
        ("authority", "legacy", "controlplane"),
        ("bill_from", None, T),
        ("shadow", True, False),
    ]
    assert (plan.pending_from_t, plan.pending_before_t) == (1, 1)
    assert plan.problems == []
    assert await ready.flags() == before


@pytest.mark.parametrize(
    ("values", "who"),
    [
        ({"authority": "legacy", "shadow": False}, ["every bucket", "authority is legacy"]),
        ({"authority": "legacy", "bill_from": T}, ["every bucket", "computes in shadow"]),
        ({"authority": "controlplane"}, ["every bucket", "until bill_from (T) is set"]),
        (  # a paused cutover: legacy_bill_until is T, the control plane sends nothing yet
            {"authority": "controlplane", "bill_from": T},
            [f"before {iso(T)} ({T})", f"at or after {iso(T)} ({T}), computed in shadow and sent"],
        ),
    ],
)
async def test_plan_says_truthfully_who_bills_what_under_every_flag_combination(
    ready: ControlPlane, values: dict[str, Any], who: list[str]
) -> None:
    """Authority controlplane with shadow on was described as "legacy biller: every bucket"
    while legacy_bill_until was T."""
    changes = [FlagChange(name, value) for name, value in values.items()]
    await ready.set_flags(changes, actor="t", reason="r", force=True)
    plan = await ready.cutover.plan(T)
    assert len(plan.before) == 2
    for line, says in zip(plan.before, who, strict=True):
        assert says in line, (line, says)


async def test_plan_names_the_rules_execute_would_meet(ready: ControlPlane) -> None:
    plan = await ready.cutover.plan(T + 1)
    assert [p["rule"] for p in plan.problems] == ["bill_from.aligned"]


# preflight ------------------------------------------------------------------------------------


async def test_preflight_passes_when_every_precondition_holds(ready: ControlPlane) -> None:
    report = await ready.cutover.preflight(T)
    assert report.ok, report
    assert {c.name: c.status for c in report.checks} == {
        "t_valid": "pass",
        "billable_orgs_have_customer": "pass",
        "usage_has_a_plan": "pass",
        "parity_clean": "pass",
        "legacy_not_billed_from_t": "pass",
        "catalog_published": "pass",
        "capability_tokens_carried": "n/a",
        "reconciled_since_rollback": "n/a",
        "money_parity": "n/a",  # [cutover] require_money_parity is off
    }


async def test_preflight_fails_on_a_misaligned_or_too_old_t(ready: ControlPlane) -> None:
    assert by_name(await ready.cutover.preflight(T + 7))["t_valid"].status == "fail"
    old = await ready.cutover.preflight(T - 40 * 86400)
    assert not old.ok and "days" in by_name(old)["t_valid"].detail


async def test_preflight_fails_when_a_pro_org_has_no_customer(ready: ControlPlane) -> None:
    await ready.set_org("o2", customer=None, plan="pro", actor="t", effective_from=0)
    await ready.set_org("o3", customer=None, plan="free", actor="t", effective_from=0)
    check = by_name(await ready.cutover.preflight(T))["billable_orgs_have_customer"]
    assert check.status == "fail" and "o2" in check.detail and "o3" not in check.detail


async def test_preflight_looks_at_every_billable_plan(build: Callable[..., Any]) -> None:
    plans = [
        {"name": "free", "billable": False},
        {"name": "pro", "billable": True},
        {"name": "team", "billable": True},
        {"name": "trial", "billable": False},
    ]
    async with build(plans=plans) as cp:
        await cp.set_org("o1", customer="cus_1", plan="pro", actor="t", effective_from=0)
        await cp.set_org("o2", customer=None, plan="team", actor="t", effective_from=0)
        await cp.set_org("o3", customer=None, plan="trial", actor="t", effective_from=0)
        check = by_name(await cp.cutover.preflight(T))["billable_orgs_have_customer"]
        assert check.status == "fail" and "1 orgs" in check.detail
        assert "o2" in check.detail and "o3" not in check.detail


async def test_preflight_fails_when_parity_is_not_clean_long_enough(
    build: Callable[..., ControlPlane],
) -> None:
    async with build(Legacy(), cutover={"parity_clean_hours": 3}) as cp:
        check = by_name(await cp.cutover.preflight(T))["parity_clean"]
        assert check.status == "fail" and "unavailable" in check.detail
        await clean_runs(cp, T0 + 3 * HOUR, T0 + 8 * HOUR, dirty=T0 + 6 * HOUR)
        check = by_name(await cp.cutover.preflight(T))["parity_clean"]
        assert check.status == "fail" and "clean for 1 h" in check.detail


async def test_preflight_fails_when_the_checker_lags_behind_now(
    build: Callable[..., ControlPlane],
) -> None:
    async with build(Legacy()) as cp:
        await clean_runs(cp, T0, T0 + 6 * HOUR)  # 6 h clean, but ends 2 h before the horizon
        check = by_name(await cp.cutover.preflight(T))["parity_clean"]
        assert check.status == "fail" and "behind" in check.detail


async def test_preflight_without_legacy_source_reports_parity_unavailable(
    build: Callable[..., ControlPlane],
) -> None:
    async with build() as cp:
        report = by_name(await cp.cutover.preflight(T))
        assert report["parity_clean"].status == "fail"
        assert "parity history unavailable" in report["parity_clean"].detail
        assert report["legacy_not_billed_from_t"].status == "warn"


async def test_preflight_legacy_billed_until(build: Callable[..., ControlPlane]) -> None:
    async with build(Legacy(billed_until=T + HOUR)) as cp:
        check = by_name(await cp.cutover.preflight(T))["legacy_not_billed_from_t"]
        assert check.status == "fail" and str(T + HOUR) in check.detail
    async with build(Legacy(billed_until=None)) as cp:
        check = by_name(await cp.cutover.preflight(T))["legacy_not_billed_from_t"]
        assert check.status == "pass"
    async with build(Legacy(can_tell=False)) as cp:
        check = by_name(await cp.cutover.preflight(T))["legacy_not_billed_from_t"]
        assert check.status == "warn" and check.ok
        assert check.detail.startswith("cannot tell: legacy plugin")
        assert "billed_until" in check.detail


async def test_preflight_catalog(build: Callable[..., ControlPlane]) -> None:
    async with build(catalog=CATALOG) as cp:
        check = by_name(await cp.cutover.preflight(T))["catalog_published"]
        assert check.status == "fail" and "catalog publish" in check.detail
        await publish(cp)
        assert by_name(await cp.cutover.preflight(T))["catalog_published"].status == "pass"
    async with build() as cp:
        assert by_name(await cp.cutover.preflight(T))["catalog_published"].status == "n/a"


# execute --------------------------------------------------------------------------------------


async def test_execute_sets_the_three_flags_with_one_audit_group(ready: ControlPlane) -> None:
    report, flags = await ready.cutover.execute(T, actor="ops", reason="go live")
    assert report.ok and flags.sending and flags.legacy_bill_until == T
    entries = await ready.storage.audit_log(limit=10)
    group = entries[0].group_id
    assert group is not None
    assert sorted(e.action + ":" + e.subject for e in entries if e.group_id == group) == [
        f"cutover.execute:{T}",
        "flag.set:authority",
        "flag.set:bill_from",
        "flag.set:shadow",
    ]
    assert (await ready.cutover.status()).stage == "live"


async def test_execute_refuses_when_preflight_fails_and_changes_nothing(
    ready: ControlPlane,
) -> None:
    await ready.set_org("o2", customer=None, plan="pro", actor="t", effective_from=0)
    before = await ready.flags()
    with pytest.raises(FlagRefused) as info:
        await ready.cutover.execute(T, actor="ops", reason="go")
    assert info.value.rule == "cutover.preflight" and "billable_orgs_have_customer" in str(
        info.value
    )
    assert await ready.flags() == before
    assert await ready.storage.audit_log(action_prefix="cutover.") == []
    _, flags = await ready.cutover.execute(T, actor="ops", reason="go anyway", force=True)
    assert flags.sending
    assert (await ready.storage.audit_log(action_prefix="cutover."))[0].forced


async def test_execute_failing_midway_changes_nothing(
    ready: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage: Any = ready.storage
    before = await ready.flags()
    original = storage._append_audit

    async def boom(conn: Any, entries: Any, at: int) -> None:
        raise StorageError("disk full")  # after the flag rows were written in the transaction

    monkeypatch.setattr(storage, "_append_audit", boom)
    with pytest.raises(StorageError):
        await ready.cutover.execute(T, actor="ops", reason="go")
    monkeypatch.setattr(storage, "_append_audit", original)
    assert await ready.flags() == before
    assert not [
        e for e in await ready.storage.audit_log() if e.action.startswith(("flag.", "cutover."))
    ]


# rollback and status ---------------------------------------------------------------------------


async def test_rollback_cancels_recent_sends_and_lists_the_rest(
    ready: ControlPlane, clock: list[float], fake_billing: FakeBilling
) -> None:
    await ready.ingest([tick("a", "o1", T + 5), tick("b", "o1", T + HOUR + 5, mb=2048)], "http")
    await ready.rollup(until=T + 2 * HOUR)
    await ready.cutover.execute(T, actor="ops", reason="go")
    first = await ready.send(until=T + HOUR)
    assert first.sent == 1
    clock[0] += 25 * HOUR  # the first row is now too old to cancel
    assert (await ready.send()).sent == 1
    assert (await ready.cutover.status()).stage == "live"

    result = await ready.cutover.rollback(actor="ops", reason="bad invoice", cancel_sent=True)
    assert result.flags["flags"]["authority"]["value"] == "legacy"
    assert [r.identifier for r in result.cancelled] == [f"o1:gbs:{T + HOUR}:1"]
    (kept,) = result.not_cancelled
    assert kept.identifier == f"o1:gbs:{T}:1" and kept.quantity == 20 and kept.value == "20"
    assert "more than" in (kept.note or "")
    assert fake_billing.cancelled == {f"o1:gbs:{T + HOUR}:1"}
    (row,) = await ready.storage.ledger(state=RowState.CANCELLED)
    assert (row.reason, row.bucket_start) == ("rolled_back", T + HOUR)
    audit = await ready.storage.audit_log(action_prefix="ledger.cancelled")
    assert [a.subject for a in audit] == [row.identifier]

    status = await ready.cutover.status()
    assert status.stage == "rolled_back"
    assert [h["step"] for h in status.history] == ["rollback", "execute"]
    # after the rollback, the legacy biller bills everything again
    assert (await ready.flags()).legacy_bill_until is None


async def test_rollback_without_cancel_keeps_sent_rows(ready: ControlPlane) -> None:
    await live_with_one_row(ready)
    await ready.send()
    result = await ready.cutover.rollback(actor="ops", reason="pause")
    assert result.cancelled == [] and result.not_cancelled == []
    assert len(await ready.storage.ledger(state=RowState.SENT)) == 1


async def test_rollback_also_settles_rows_attempted_without_an_answer(
    ready: ControlPlane, fake_billing: FakeBilling
) -> None:
    await live_with_one_row(ready)
    fake_billing.fail_next(Outcome.AMBIGUOUS)  # the provider has it; the answer was lost
    assert (await ready.send()).ambiguous == 1
    (row,) = await ready.storage.ledger()
    assert (row.state, row.attempts) == (RowState.PENDING, 1)
    result = await ready.cutover.rollback(actor="ops", reason="bad", cancel_sent=True)
    assert [r.identifier for r in result.cancelled] == [row.identifier]
    assert fake_billing.cancelled == {row.identifier}
    (cancelled,) = await ready.storage.ledger(state=RowState.CANCELLED)
    assert cancelled.id == row.id
    (audit,) = await ready.storage.audit_log(action_prefix="ledger.cancelled")
    assert audit.before == {"state": "pending"}


async def test_rollback_lists_an_attempted_row_the_provider_does_not_know(
    ready: ControlPlane, fake_billing: FakeBilling
) -> None:
    await live_with_one_row(ready)
    (row,) = await ready.storage.ledger()
    await ready.storage.record_attempts([row.id], ready.now())  # a crash right after this
    result = await ready.cutover.rollback(actor="ops", reason="bad", cancel_sent=True)
    (kept,) = result.not_cancelled
    assert kept.identifier == row.identifier and result.cancelled == []
    assert (kept.note or "").startswith("attempted without a definite answer")


async def test_rollback_leaves_out_rows_the_provider_refused(
    ready: ControlPlane, fake_billing: FakeBilling
) -> None:
    await live_with_one_row(ready)
    fake_billing.fail_next(Outcome.REJECTED)  # a definite no: nothing was billed
    assert (await ready.send()).held == 1
    result = await ready.cutover.rollback(actor="ops", reason="bad", cancel_sent=True)
    assert result.cancelled == [] and result.not_cancelled == []  # no credit note for it


async def test_rollback_waits_for_a_running_send_pass_and_lists_what_it_sent(
    ready: ControlPlane, clock: list[float], fake_billing: FakeBilling
) -> None:
    await ready.cutover.execute(T, actor="ops", reason="go")
    clock[0] = T + 41 * HOUR
    await ready.ingest([tick(f"e{i}", "o1", T + i * HOUR + 5) for i in range(40)], "http")
    await ready.rollup()
    calling, answer = asyncio.Event(), asyncio.Event()
    deliver = fake_billing.send

    async def held_send(event: MeterEvent) -> Delivery:
        calling.set()
        await answer.wait()
        return await deliver(event)

    fake_billing.send = held_send  # type: ignore[method-assign]
    sending = asyncio.create_task(ready.send())
    await calling.wait()  # the pass is delivering its first group of 32 rows
    rolling = asyncio.create_task(
        ready.cutover.rollback(actor="ops", reason="bad", cancel_sent=True)
    )
    await asyncio.sleep(0.5)
    assert not rolling.done()  # flags flipped; waiting for the pass
    assert not (await ready.flags()).sending
    answer.set()
    stats, result = await sending, await rolling
    # The pass finished its group and stopped before the next one.
    assert stats.sent == 32 and stats.skipped == (
        "the flags changed during the pass (sending off, or another T)"
    )
    assert sorted(r.identifier for r in result.cancelled) == sorted(fake_billing.events)
    assert len(fake_billing.events) == 32 and result.senders_still_running is None
    assert len(await ready.storage.ledger(state=RowState.PENDING)) == 8


async def test_stages(ready: ControlPlane) -> None:
    assert (await ready.cutover.status()).stage == "shadow"
    await ready.set_flags([FlagChange("bill_from", T)], actor="t", reason="arm")
    assert (await ready.cutover.status()).stage == "armed"
    await ready.cutover.execute(None, actor="t", reason="go")  # T from bill_from
    assert (await ready.cutover.status()).stage == "live"
    await ready.cutover.rollback(actor="t", reason="back")
    assert (await ready.cutover.status()).stage == "rolled_back"


async def test_a_second_cutover_needs_a_clean_reconciliation_since_the_rollback(
    ready: ControlPlane,
) -> None:
    def check(report: Any) -> Any:
        return {c.name: c for c in report.checks}["reconciled_since_rollback"]

    assert check(await ready.cutover.preflight(T)).status == "n/a"  # a first cutover
    await ready.cutover.execute(T, actor="ops", reason="go", force=True)
    await ready.cutover.rollback(actor="ops", reason="back")
    failed = check(await ready.cutover.preflight(T))
    assert failed.status == "fail" and "no reconciliation of every org since" in failed.detail
    await ready.reconciler.run(T - HOUR, T, org_id="o1")  # one org's: not enough
    assert check(await ready.cutover.preflight(T)).status == "fail"
    await ready.reconciler.run(T + HOUR, T + 2 * HOUR)  # not from the rolled-back T
    late = check(await ready.cutover.preflight(T))
    assert late.status == "fail" and "after the rolled-back T" in late.detail
    run = await ready.reconciler.run(T - HOUR, T)
    passed = check(await ready.cutover.preflight(T))
    assert run.clean and passed.status == "pass" and "reconciled clean since" in passed.detail
    assert (await ready.cutover.status()).reconciled_clean_since == T - HOUR


async def test_usage_free_only_by_default_is_named_by_the_rollup_and_preflight(
    ready: ControlPlane, clock: list[float]
) -> None:
    """An org with usage and no plan from any source (no token, none stored, no legacy
    answer) is excluded as free: counted by the rollup and its metric, and named by preflight
    as a warning (it may be meant)."""
    at = int(clock[0]) - 2 * HOUR
    bucket = at - at % HOUR
    await ready.ingest([tick("n1", "nobody", bucket + 5)], "http")
    stats = await ready.rollup(until=bucket + HOUR)
    assert (stats.excluded, stats.unplanned) == (1, 1)
    assert ready.metrics.unplanned_rows._value.get() == 1
    check = by_name(await ready.cutover.preflight(T))["usage_has_a_plan"]
    assert check.status == "warn" and "nobody" in check.detail
