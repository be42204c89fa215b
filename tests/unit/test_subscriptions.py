"""The plan policy's rules: which plan periods a subscription status writes."""

from __future__ import annotations

import pytest

from controlplane.config import PlanPolicyConfig
from controlplane.interfaces import PlanPeriod
from controlplane.subscriptions import PlanStep, plan_at, plan_steps

POLICY = PlanPolicyConfig()  # active/trialing paid, past_due 7 days of grace
DAY = 86_400
T0 = 1_800_000_000
PRO = [PlanPeriod("pro", T0)]


def apply(plans: list[PlanPeriod], steps: list[PlanStep]) -> list[PlanPeriod]:
    by_start = {p.effective_from: p.plan for p in plans}
    by_start.update({s.effective_from: s.plan for s in steps})
    return [PlanPeriod(plan, start) for start, plan in sorted(by_start.items())]


def test_paid_status_makes_a_free_org_pro_and_nothing_more_when_pro() -> None:
    assert plan_steps(POLICY, [], "active", T0) == [PlanStep("pro", T0)]
    assert plan_steps(POLICY, [PlanPeriod("free", T0 - 9)], "trialing", T0) == [PlanStep("pro", T0)]
    assert plan_steps(POLICY, PRO, "active", T0 + 5) == []


@pytest.mark.parametrize("status", ["incomplete", "incomplete_expired", "canceled", "unpaid"])
def test_an_org_never_paid_keeps_its_plan(status: str) -> None:
    assert plan_steps(POLICY, [], status, T0) == []
    assert plan_steps(POLICY, [PlanPeriod("free", T0 - 9)], status, T0) == []


def test_past_due_keeps_pro_for_the_grace_then_free_and_a_payment_undoes_it() -> None:
    steps = plan_steps(POLICY, PRO, "past_due", T0 + DAY)
    assert steps == [PlanStep("free", T0 + 8 * DAY)]
    plans = apply(PRO, steps)
    assert plan_at(plans, T0 + 8 * DAY - 1) == "pro" and plan_at(plans, T0 + 8 * DAY) == "free"
    assert plan_steps(POLICY, plans, "past_due", T0 + 2 * DAY) == []  # already written
    recovered = plan_steps(POLICY, plans, "active", T0 + 3 * DAY)
    assert recovered == [PlanStep("pro", T0 + 8 * DAY)]  # the downgrade written ahead, undone
    assert plan_at(apply(plans, recovered), T0 + 30 * DAY) == "pro"


def test_the_grace_runs_from_the_failed_payment_not_from_the_event() -> None:
    steps = plan_steps(POLICY, PRO, "past_due", T0 + 5 * DAY, unpaid_since=T0 + DAY)
    assert steps == [PlanStep("free", T0 + 8 * DAY)]


def test_an_ending_after_failed_payments_is_free_from_the_grace_end_in_any_order() -> None:
    failed, ended = T0 + DAY, T0 + 16 * DAY
    in_order = apply(PRO, plan_steps(POLICY, PRO, "past_due", failed, unpaid_since=failed))
    in_order = apply(
        in_order,
        plan_steps(POLICY, in_order, "canceled", ended, ended_at=ended, unpaid_since=failed),
    )
    # the cancellation seen first (its past_due event late, or never): the same plans
    reverse = apply(
        PRO, plan_steps(POLICY, PRO, "canceled", ended, ended_at=ended, unpaid_since=failed)
    )
    reverse = apply(
        reverse,
        plan_steps(POLICY, reverse, "canceled", failed, ended_at=ended, unpaid_since=failed),
    )
    assert in_order == reverse == [PlanPeriod("pro", T0), PlanPeriod("free", T0 + 8 * DAY)]


def test_a_cancellation_without_failed_payments_is_free_from_its_end() -> None:
    assert plan_steps(POLICY, PRO, "canceled", T0 + 50, ended_at=T0 + 40) == [
        PlanStep("free", T0 + 40)
    ]


def test_a_policy_without_grace_moves_past_due_to_free_at_once() -> None:
    strict = PlanPolicyConfig(paid=["active"], grace_seconds={})
    assert plan_steps(strict, PRO, "past_due", T0 + DAY) == [PlanStep("free", T0 + DAY)]
    assert plan_steps(strict, PRO, "trialing", T0 + DAY) == [PlanStep("free", T0 + DAY)]
