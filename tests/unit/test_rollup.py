"""Revision and rounding-carry maths of the rollup planner (no database)."""

from __future__ import annotations

from controlplane.interfaces import Carry, Org, PlanPeriod, RollupBatch, UsageTotal
from controlplane.ledger import Reason, RowState, identifier
from controlplane.rollup import plan_revisions
from controlplane.units import MICROS

PRO = {"o": Org(org_id="o", customer="cus", plans=[PlanPeriod("pro", 0)], updated_at=0)}


def batch(
    totals: dict[int, int],
    written: dict[int, int] | None = None,
    carry: Carry | None = None,
    orgs: dict[str, Org] | None = None,
) -> RollupBatch:
    written = written or {}
    return RollupBatch(
        buckets=[],
        totals=[UsageTotal("o", "m", b, v) for b, v in totals.items()],
        ledger_sums=[UsageTotal("o", "m", b, v) for b, v in written.items()],
        revisions={("o", "m", b): 1 for b in written},
        carries=[carry] if carry else [],
        orgs=PRO if orgs is None else orgs,
    )


def test_new_bucket_gets_revision_one_with_floor_quantity() -> None:
    plan = plan_revisions(batch({0: 2_500_000}), 3600)
    (row,) = plan.rows
    assert (row.revision, row.value_micros, row.quantity, row.state) == (
        1,
        2_500_000,
        2,
        RowState.PENDING,
    )
    assert plan.carries == [Carry("o", "m", 2_500_000, 2)]


def test_remainder_is_carried_into_later_rows() -> None:
    plan = plan_revisions(batch({0: 400_000, 3600: 400_000, 7200: 400_000}), 3600)
    assert [r.quantity for r in plan.rows] == [0, 0, 1]
    assert sum(r.quantity for r in plan.rows) == (1_200_000 // MICROS)


def test_late_events_make_a_correction_revision_with_the_difference() -> None:
    plan = plan_revisions(
        batch({0: 3_700_000}, written={0: 2_500_000}, carry=Carry("o", "m", 2_500_000, 2)), 3600
    )
    (row,) = plan.rows
    assert (row.revision, row.value_micros, row.quantity) == (2, 1_200_000, 1)
    assert row.identifier == "o:m:0:2"


def test_unchanged_bucket_writes_nothing() -> None:
    plan = plan_revisions(batch({0: 5}, written={0: 5}, carry=Carry("o", "m", 5, 0)), 3600)
    assert plan.rows == [] and plan.carries == []


def test_free_or_unknown_org_rows_are_excluded() -> None:
    free = {"o": Org("o", None, [PlanPeriod("pro", 0), PlanPeriod("free", 3600)], 0)}
    plan = plan_revisions(batch({0: MICROS, 3600: MICROS}, orgs=free), 3600)
    assert [(r.state, r.reason) for r in plan.rows] == [
        (RowState.PENDING, None),
        (RowState.EXCLUDED, Reason.FREE_PLAN),
    ]
    plan = plan_revisions(batch({0: MICROS}, orgs={}), 3600)
    assert plan.rows[0].reason == Reason.FREE_PLAN


def test_identifier_is_deterministic_and_bounded() -> None:
    assert identifier("acme", "gbs", 3600, 1) == "acme:gbs:3600:1"
    long = identifier("o" * 120, "gbs", 3600, 1)
    assert len(long) <= 100 and long == identifier("o" * 120, "gbs", 3600, 1)
    assert long != identifier("o" * 120, "gbs", 3600, 2)
