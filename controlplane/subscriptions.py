"""What a provider subscription's status means for an org's plan: the plan policy, as pure rules.

The policy (``[stripe.plan_policy]``) names the statuses that are paid (the org is on the paid
plan), the statuses that keep the paid plan for a grace period, and treats every other status
as the end of the paid plan. :func:`plan_steps` turns one observed status into the plan
periods to write; applying its answer twice writes nothing new, so a redelivered or repeated
observation changes nothing, and the answer depends on the subscription's status and the
org's plan history only, never on the order observations arrived in.

A grace period is written ahead of time: a paid org whose subscription goes ``past_due`` at
``t`` gets a ``free`` period from ``t + grace`` at once. Rollup bills each bucket by the plan in
force at its start, so nothing has to run when the grace ends; a payment before then
overwrites that future period with the paid plan.
"""

from __future__ import annotations

import msgspec

from controlplane.config import PlanPolicyConfig
from controlplane.interfaces import PlanPeriod
from controlplane.plans import FREE, PRO

ENDED = frozenset({"canceled", "incomplete_expired"})


class PlanStep(msgspec.Struct, frozen=True):
    """A plan period to write (upserted by its start)."""

    plan: str
    effective_from: int


def is_paid(policy: PlanPolicyConfig, status: str) -> bool:
    """Whether `status` puts an org on the paid plan."""
    return status in policy.paid


def plan_at(plans: list[PlanPeriod], when: int) -> str | None:
    """The plan in force at `when` in `plans` (oldest first), None before the first."""
    current: str | None = None
    for period in plans:
        if period.effective_from <= when:
            current = period.plan
    return current


def plan_steps(
    policy: PlanPolicyConfig,
    plans: list[PlanPeriod],
    status: str,
    since: int,
    *,
    ended_at: int | None = None,
    unpaid_since: int | None = None,
) -> list[PlanStep]:
    """The plan periods that make `plans` follow a subscription in `status` since `since`.

    `unpaid_since` is when the payment the subscription still waits for first failed (its
    latest invoice's finalization, the invoice attempted and unpaid), which Stripe holds
    whatever order the events came in: a grace period runs from it, and a subscription that
    ended or went ``unpaid`` after failed payments is free no later than the end of
    ``past_due``'s grace.

    - paid: the paid plan from `since` (unless already in force), and every later period
      that is not the paid plan (a grace end written ahead) overwritten with it;
    - grace: nothing now; a paid org is free from ``unpaid_since (else since) + grace``,
      unless a downgrade is already written at or before then;
    - otherwise: a paid org is free from `ended_at` (the subscription's end) or `since`, or
      from the end of the dunning grace if that is earlier. An org that is not on the paid
      plan keeps its plan: an ``incomplete`` first payment leaves it as it was.
    """
    if is_paid(policy, status):
        steps = [PlanStep(PRO, since)] if plan_at(plans, since) != PRO else []
        later = [p for p in plans if p.effective_from > since and p.plan != PRO]
        return steps + [PlanStep(PRO, p.effective_from) for p in later]
    graces = {str(k): v for k, v in policy.grace_seconds.items()}
    grace = graces.get(status)
    if grace is not None:
        start = unpaid_since if unpaid_since is not None else since
        if plan_at(plans, start) != PRO:
            return []
        end = start + int(grace)
        if any(p.plan != PRO and start < p.effective_from <= end for p in plans):
            return []  # already downgraded by then
        return [PlanStep(FREE, end)]
    at = ended_at if ended_at is not None else since
    dunning = graces.get("past_due")
    if unpaid_since is not None and dunning is not None:
        at = min(at, unpaid_since + int(dunning))
    if plan_at(plans, at) != PRO:
        return []
    return [PlanStep(FREE, at)]
