"""Plan and customer changes say what they mean for usage already rolled up (issue: a
customer change that hides billed usage), on both storage backends:

- a plan period starting before buckets already rolled up under another plan is refused
  unless forced, and forced, the answer says which buckets keep their plan;
- one provider customer bills one org;
- a new customer bills what is sent from then on; a retry goes where its first call went.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from controlplane.core import ControlPlane
from controlplane.errors import BadValue, InvalidInput
from controlplane.flags import FlagChange
from controlplane.interfaces import AuditEntry, Outcome
from controlplane.ledger import RowState
from controlplane.plugins.billing.fake import FakeBilling
from controlplane.rollup import HELD_ALERTS, RollupStats
from tests.conftest import HOUR, T0, tick


@pytest.fixture
async def cp(build_on_each_backend: Callable[..., ControlPlane]) -> AsyncIterator[ControlPlane]:
    async with build_on_each_backend() as plane:
        await plane.set_org("o1", customer="cus_1", plan="pro", actor="t", effective_from=0)
        await plane.ingest([tick(f"e{i}", "o1", T0 + i * HOUR + 5) for i in range(3)], "http")
        await plane.rollup(until=T0 + 3 * HOUR)
        yield plane


async def test_a_retroactive_plan_change_is_refused_and_changes_nothing(cp: ControlPlane) -> None:
    audit = await cp.storage.audit_log(action_prefix="org.")
    with pytest.raises(InvalidInput) as info:
        await cp.set_org("o1", customer=None, plan="free", actor="t", effective_from=T0 + HOUR)
    (problem,) = info.value.problems
    assert problem.field == "effective_from"
    assert f"2 buckets from {T0 + HOUR}" in problem.message
    org = await cp.storage.get_org("o1")
    assert org is not None and [p.plan for p in org.plans] == ["pro"]
    assert await cp.storage.audit_log(action_prefix="org.") == audit
    # the same plan again, or a start after the rolled-up buckets, is no retroactive change
    await cp.set_org("o1", customer=None, plan="pro", actor="t", effective_from=T0)
    update = await cp.set_org(
        "o1", customer=None, plan="free", actor="t", effective_from=T0 + 3 * HOUR
    )
    assert update.notes == []


async def test_a_forced_retroactive_plan_change_says_which_buckets_keep_their_plan(
    cp: ControlPlane,
) -> None:
    update = await cp.set_org(
        "o1", customer=None, plan="free", actor="t", effective_from=T0 + HOUR, force=True
    )
    (note,) = update.notes
    assert note.startswith("forced: 2 buckets") and "later corrections" in note
    (entry, *_) = await cp.storage.audit_log(action_prefix="org.")
    assert entry.forced
    rows = await cp.storage.ledger()
    assert [r.state for r in rows] == [RowState.PENDING] * 3  # kept as rolled up


async def test_a_plan_outside_the_configured_set_is_refused_and_changes_nothing(
    cp: ControlPlane,
) -> None:
    """`orgs set --plan fre` was stored, and the rollup billed it (every plan but `free`)."""
    audit = await cp.storage.audit_log(action_prefix="org.")
    with pytest.raises(BadValue) as info:
        await cp.set_org("o2", customer="cus_2", plan="fre", actor="t")
    (problem,) = info.value.problems
    assert (problem.field, problem.message) == (
        "plan",
        "unknown plan 'fre'; known plans: free, pro",
    )
    assert await cp.storage.get_org("o2") is None
    assert await cp.storage.audit_log(action_prefix="org.") == audit


async def test_one_provider_customer_bills_one_org(cp: ControlPlane) -> None:
    with pytest.raises(InvalidInput) as info:
        await cp.set_org("o2", customer="cus_1", plan="pro", actor="t")
    (problem,) = info.value.problems
    assert problem.field == "customer" and "'o1'" in problem.message
    assert await cp.storage.get_org("o2") is None
    await cp.set_org("o1", customer="cus_1", plan=None, actor="t")  # its own: fine


async def test_a_new_customer_bills_what_is_sent_from_then_on(
    cp: ControlPlane, fake_billing: FakeBilling
) -> None:
    await cp.set_flags(
        [
            FlagChange("authority", "controlplane"),
            FlagChange("bill_from", T0),
            FlagChange("shadow", False),
        ],
        actor="t",
        reason="go",
    )
    fake_billing.fail_next(Outcome.RETRY)  # the first row's call is made, and fails
    await cp.send()
    update = await cp.set_org("o1", customer="cus_2", plan=None, actor="t")
    (note,) = update.notes
    assert "cus_1 -> cus_2" in note
    await cp.send()
    assert [e.customer for e in fake_billing.calls] == ["cus_1", "cus_1", "cus_2", "cus_2"]


async def test_fixing_an_unknown_plan_releases_the_buckets_the_rollup_held(
    cp: ControlPlane,
) -> None:
    """A plan stored before it left `[[plans]]` holds the org's buckets with the reason; setting
    a known plan releases them, and the next rollup bills them (they waited for new events)."""
    audit = AuditEntry(action="org.set", subject="o3", actor="older config")
    await cp.storage.set_org(
        "o3", customer="cus_3", plan="team", effective_from=0, at=T0, audit=audit
    )
    await cp.ingest([tick("o3-e", "o3", T0 + 4 * HOUR + 5)], "http")
    held = await cp.rollup(until=T0 + 5 * HOUR)
    assert held.held == 1 and held.rows == 0
    (alert,) = await cp.storage.parity_alerts(HELD_ALERTS)
    assert "until the org's plan is one of [[plans]]" in alert.text  # what releases it
    assert await cp.rollup(until=T0 + 5 * HOUR) == RollupStats()  # passed by, not retried
    await cp.set_org("o3", customer=None, plan="pro", actor="t", effective_from=0)
    again = await cp.rollup(until=T0 + 5 * HOUR)
    assert (again.held, again.rows) == (0, 1)
    (row,) = [r for r in await cp.storage.ledger() if r.org_id == "o3"]
    assert row.state is RowState.PENDING
