"""Org changes: an org's provider customer and its plan periods, and what a change means for
usage already rolled up.

A plan period starting before buckets already rolled up under another plan is refused unless
forced (``effective_from`` names them): those buckets keep the plan they were rolled up under;
usage added to them later follows the new plan, usage taken back leaves the rounding chain that
holds it (billed or free). A new customer bills everything sent
from now on, corrections of earlier buckets included; a retry of a call already made goes to
the customer it was made for. Every change is audited (``org.set``).
"""

from __future__ import annotations

import msgspec

from controlplane.errors import InvalidInput, Problem
from controlplane.interfaces import AuditEntry, LedgerStore, Org, OrgStore, PlanPeriod
from controlplane.plans import Plans

PAGE = 10_000  # ledger rows read at a time to tell whether a plan change is retroactive


class OrgUpdate(msgspec.Struct, frozen=True):
    """An org as changed, and what the change means for usage already rolled up."""

    org: Org
    notes: list[str]


async def set_org(
    orgs: OrgStore,
    ledger: LedgerStore,
    plans: Plans,
    org_id: str,
    *,
    customer: str | None,
    plan: str | None,
    actor: str,
    at: int,
    effective_from: int | None = None,
    reason: str | None = None,
    force: bool = False,
) -> OrgUpdate:
    """Set the org's provider customer and/or start a plan period (audited); the answer says
    what the change means for usage already rolled up (see the module docstring)."""
    if customer is None and plan is None:
        raise InvalidInput([Problem(field="", message="give customer and/or plan")])
    if not org_id.strip():
        raise InvalidInput([Problem(field="org", message="must not be empty")])
    if plan is not None:
        plans.check(plan)
    before = await orgs.get_org(org_id)
    start = at if effective_from is None else effective_from
    notes: list[str] = []
    rolled: list[int] = []
    if plan is not None:
        buckets: list[int] = []
        after = 0
        while rows := await ledger.ledger(org_id=org_id, start=start, after_id=after, limit=PAGE):
            buckets += [r.bucket_start for r in rows]
            after = rows[-1].id
        rolled = _rolled_under_another_plan(before, org_id, plan, start, buckets)
        if rolled:
            what = (
                f"{len(rolled)} buckets from {rolled[0]} on (the plan period would start "
                f"at {start}) were already rolled up under another plan"
            )
            if not force:
                message = (
                    f"{what}; start the plan after {rolled[-1]}, or force it: those buckets "
                    "keep the plan they were rolled up under (usage taken back from them "
                    "leaves the chain that billed it), and only usage added later follows "
                    "the new plan"
                )
                raise InvalidInput([Problem(field="effective_from", message=message)])
            notes.append(
                f"forced: {what}; they keep it, and only their later corrections follow "
                f"plan {plan!r}"
            )
    if customer is not None and before is not None and before.customer not in (None, customer):
        notes.append(
            f"customer {before.customer} -> {customer}: everything sent from now on, "
            f"corrections of earlier buckets included, goes to {customer}; a retry of a "
            f"call already made for {before.customer} goes to {before.customer}"
        )
    org = await orgs.set_org(
        org_id,
        customer=customer,
        plan=plan,
        effective_from=start,
        at=at,
        audit=AuditEntry(
            action="org.set",
            subject=org_id,
            actor=actor,
            reason=reason,
            before=msgspec.to_builtins(before) if before else None,
            after={"customer": customer, "plan": plan, "effective_from": start},
            forced=force and bool(rolled),
        ),
    )
    return OrgUpdate(org, notes)


def _rolled_under_another_plan(
    before: Org | None, org_id: str, plan: str, start: int, buckets: list[int]
) -> list[int]:
    """The buckets (of rows already rolled up) whose plan a period `plan` from `start` would
    change, in order."""
    periods = [p for p in (before.plans if before else []) if p.effective_from != start]
    after = Org(
        org_id,
        None,
        sorted([*periods, PlanPeriod(plan, start)], key=lambda p: p.effective_from),
        start,
    )
    return sorted(
        {
            bucket
            for bucket in buckets
            if (before.plan_at(bucket) if before else None) != after.plan_at(bucket)
        }
    )
