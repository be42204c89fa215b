"""Plans: the closed set of plans an org can be on, and which of them are billed.

``[[plans]]`` in config names them (``free``, not billable, and ``pro``, billable, by
default; the Stripe webhooks provision ``pro`` and return an org to ``free``, so both must
exist). An org's plan comes from its stored plan periods, else from the legacy biller's
answer mapped through ``[legacy] plan_map`` (an answer that already names a plan needs no
entry), else ``free``. A name outside the set is never guessed: an org set to one is refused,
and a bucket whose plan is unknown is held with the reason until the org's plan is fixed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from controlplane.errors import BadValue, Problem

FREE = "free"  # an org no one gave a plan
PRO = "pro"  # what a Stripe checkout provisions


class PlanConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One ``[[plans]]`` entry."""

    name: str
    billable: bool  # usage of orgs on it is sent to the provider; else excluded (free_plan)
    entitlements: dict[str, str | int | bool] = {}  # stated in its capability tokens
    prices: list[str] = []  # `[[catalog.prices]]` keys its subscriptions hold; [] for all


DEFAULT_PLANS = [PlanConfig(name=FREE, billable=False), PlanConfig(name=PRO, billable=True)]


class Plans:
    """The configured plans, and the legacy biller's names for them."""

    def __init__(
        self, plans: Sequence[PlanConfig], plan_map: Mapping[str, str] | None = None
    ) -> None:
        self.by_name = {p.name: p for p in plans}
        self.plan_map = dict(plan_map or {})

    @property
    def names(self) -> list[str]:
        return sorted(self.by_name)

    @property
    def billable(self) -> list[str]:
        """The names of the plans whose usage is billed."""
        return sorted(name for name, p in self.by_name.items() if p.billable)

    def is_billable(self, name: str) -> bool | None:
        """Whether usage on `name` is billed; None for a name outside the set."""
        plan = self.by_name.get(name)
        return None if plan is None else plan.billable

    def check(self, name: str, field: str = "plan") -> str:
        """`name` when it is a configured plan; else BadValue naming the known ones."""
        if name not in self.by_name:
            message = f"unknown plan {name!r}; known plans: {', '.join(self.names)}"
            raise BadValue([Problem(field=field, message=message)])
        return name

    def entitlements(self, name: str) -> dict[str, str | int | bool]:
        """What `name` entitles an org to, as its capability tokens state it."""
        plan = self.by_name.get(name)
        return dict(plan.entitlements) if plan else {}

    def prices(self, name: str) -> list[str]:
        """The catalog price keys a subscription for `name` holds; empty for every price."""
        plan = self.by_name.get(name)
        return list(plan.prices) if plan else []

    def from_legacy(self, answer: str) -> str | None:
        """The configured plan the legacy biller's `answer` means; None when it means none
        (no ``[legacy] plan_map`` entry and no plan of that name)."""
        name = self.plan_map.get(answer, answer)
        return name if name in self.by_name else None
