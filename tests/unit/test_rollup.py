"""Revision and rounding-carry maths of the rollup planner (no database)."""

from __future__ import annotations

import msgspec

from controlplane.interfaces import Carry, ChainRow, Org, PlanPeriod, RollupBatch, UsageTotal
from controlplane.ledger import Reason, RowState, identifier
from controlplane.plans import PlanConfig, Plans
from controlplane.rollup import plan_revisions, requantify
from controlplane.units import MAX_MICROS, MICROS

PRO = {"o": Org(org_id="o", customer="cus", plans=[PlanPeriod("pro", 0)], updated_at=0)}


def batch(
    totals: dict[int, int],
    written: dict[int, int] | None = None,
    carry: Carry | None = None,
    orgs: dict[str, Org] | None = None,
) -> RollupBatch:
    written = written or {}
    return RollupBatch(
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
    # the carry keeps what is not on the ledger in whole units: 0.5 unit
    assert plan.carries == [Carry("o", "m", "billable", 500_000, 0)]


def test_remainder_is_carried_into_later_rows() -> None:
    plan = plan_revisions(batch({0: 400_000, 3600: 400_000, 7200: 400_000}), 3600)
    assert [r.quantity for r in plan.rows] == [0, 0, 1]
    assert sum(r.quantity for r in plan.rows) == (1_200_000 // MICROS)


def test_late_events_make_a_correction_revision_with_the_difference() -> None:
    plan = plan_revisions(
        batch(
            {0: 3_700_000}, written={0: 2_500_000}, carry=Carry("o", "m", "billable", 2_500_000, 2)
        ),
        3600,
    )
    (row,) = plan.rows
    assert (row.revision, row.value_micros, row.quantity) == (2, 1_200_000, 1)
    assert row.identifier == "o:m:0:2"


def test_unchanged_bucket_writes_nothing() -> None:
    plan = plan_revisions(
        batch({0: 5}, written={0: 5}, carry=Carry("o", "m", "billable", 5, 0)), 3600
    )
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


def test_the_legacy_plan_counts_only_where_no_plan_is_stored() -> None:
    unplanned = {"o": Org("o", None, [PlanPeriod("free", 3600)], 0)}  # nothing stored at 0
    plan = plan_revisions(batch({0: MICROS, 3600: MICROS}, orgs=unplanned), 3600, {"o": "pro"})
    assert [(r.bucket_start, r.state) for r in plan.rows] == [
        (0, RowState.PENDING),  # the legacy biller's answer
        (3600, RowState.EXCLUDED),  # the stored plan wins
    ]
    plan = plan_revisions(batch({0: MICROS}, orgs={}), 3600, {"o": "pro"})
    assert plan.rows[0].state is RowState.PENDING


def test_identifier_is_deterministic_and_bounded() -> None:
    assert identifier("acme", "gbs", 3600, 1) == "acme:gbs:3600:1"
    long = identifier("o" * 120, "gbs", 3600, 1)
    assert len(long) <= 100 and long == identifier("o" * 120, "gbs", 3600, 1)
    assert long != identifier("o" * 120, "gbs", 3600, 2)


def test_free_rows_have_a_carry_of_their_own() -> None:
    half_free = {"o": Org("o", None, [PlanPeriod("free", 0), PlanPeriod("pro", 3600)], 0)}
    plan = plan_revisions(batch({0: 600_000, 3600: 600_000}, orgs=half_free), 3600)
    assert [(r.reason, r.quantity) for r in plan.rows] == [(Reason.FREE_PLAN, 0), (None, 0)]
    assert sorted((c.segment, c.exact_micros, c.quantity) for c in plan.carries) == [
        ("billable", 600_000, 0),
        ("free_plan", 600_000, 0),
    ]


def test_requantify_keeps_frozen_rows_and_restores_the_floor() -> None:
    # 0.5 + 0.5 units: once the first is gone from the chain, the second owns its own half
    chain = [ChainRow(1, 500_000, 0, True), ChainRow(2, 500_000, 1, False)]
    assert requantify(chain) == ({}, 1_000_000, 1)
    changed, exact, whole = requantify([ChainRow(2, 500_000, 1, False)])
    assert (changed, exact, whole) == ({2: 0}, 500_000, 0)
    # a frozen row that took more than its share is absorbed by the next free row
    chain = [
        ChainRow(1, 600_000, 1, True),
        ChainRow(2, 600_000, 1, False),
        ChainRow(3, 900_000, 0, False),
    ]
    changed, exact, whole = requantify(chain)
    assert changed == {2: 0, 3: 1} and (exact, whole) == (2_100_000, 2)


def test_alternating_fractions_never_move_units_out_of_the_billed_chain() -> None:
    """Billed and excluded rows alternating at 0.5 unit each: every whole unit stays on its side."""
    billed = [ChainRow(i, 500_000, 0, False) for i in range(0, 10, 2)]
    excluded = [ChainRow(i, 500_000, 0, False) for i in range(1, 10, 2)]
    b_changed, b_exact, b_whole = requantify(billed)
    e_changed, e_exact, e_whole = requantify(excluded)
    assert b_whole == b_exact // MICROS == 2 and e_whole == e_exact // MICROS == 2
    assert sum(b_changed.values()) == 2 and sum(e_changed.values()) == 2


def test_a_carry_read_as_lifetime_sums_gives_the_same_quantities() -> None:
    """Stores written before carries kept only the fraction hold (exact, whole) sums."""
    written = {0: 2_500_000}
    lifetime = Carry("o", "m", "billable", 2_500_000, 2)
    fraction = Carry("o", "m", "billable", 500_000, 0)
    for carried in (lifetime, fraction):
        plan = plan_revisions(batch({0: 3_700_000}, written=written, carry=carried), 3600)
        assert [r.quantity for r in plan.rows] == [1]
        assert plan.carries == [Carry("o", "m", "billable", 700_000, 0)]


def test_a_bucket_total_past_the_bound_is_held_and_the_others_planned() -> None:
    totals = {0: MAX_MICROS + 1, 3600: 2_000_000}
    plan = plan_revisions(batch(totals), 3600)
    assert [(r.bucket_start, r.quantity) for r in plan.rows] == [(3600, 2)]
    (held,) = plan.held
    assert (held.org_id, held.bucket_start) == ("o", 0) and "past the" in held.reason


PLANS = Plans(
    [
        PlanConfig(name="free", billable=False),
        PlanConfig(name="trial", billable=False),
        PlanConfig(name="pro", billable=True),
        PlanConfig(name="team", billable=True),
    ],
    plan_map={"enterprise": "team", "starter": "free"},
)


def test_a_plan_bills_by_its_billable_setting_not_by_its_name() -> None:
    orgs = {"o": Org("o", None, [PlanPeriod("team", 0), PlanPeriod("trial", 3600)], 0)}
    plan = plan_revisions(batch({0: MICROS, 3600: MICROS}, orgs=orgs), 3600, plans=PLANS)
    assert [(r.state, r.reason) for r in plan.rows] == [
        (RowState.PENDING, None),
        (RowState.EXCLUDED, Reason.FREE_PLAN),
    ]


def test_a_stored_plan_outside_the_set_is_held_with_its_reason_never_billed() -> None:
    """A typo stored before plans were a closed set (`fre`) was billed: every name but
    exactly `free` was."""
    typo = {"o": Org("o", None, [PlanPeriod("fre", 0)], 0)}
    plan = plan_revisions(batch({0: MICROS, 3600: MICROS}, orgs=typo), 3600, plans=PLANS)
    assert plan.rows == [] and plan.carries == []
    assert [(h.org_id, h.bucket_start) for h in plan.held] == [("o", 0), ("o", 3600)]
    assert "plan 'fre', which is not configured (plans: free, pro, team, trial)" in (
        plan.held[0].reason
    )


def test_legacy_answers_map_through_plan_map_and_an_unmapped_one_is_held() -> None:
    plan = plan_revisions(batch({0: MICROS}, orgs={}), 3600, {"o": "enterprise"}, PLANS)
    assert plan.rows[0].state is RowState.PENDING  # enterprise -> team, billable
    plan = plan_revisions(batch({0: MICROS}, orgs={}), 3600, {"o": "starter"}, PLANS)
    assert plan.rows[0].reason is Reason.FREE_PLAN  # starter -> free
    plan = plan_revisions(batch({0: MICROS}, orgs={}), 3600, {"o": "team"}, PLANS)
    assert plan.rows[0].state is RowState.PENDING  # already a plan's name
    plan = plan_revisions(batch({0: MICROS}, orgs={}), 3600, {"o": "platinum"}, PLANS)
    assert plan.rows == [] and len(plan.held) == 1
    assert "plan 'platinum', which maps to no configured plan" in plan.held[0].reason
    assert "[legacy] plan_map" in plan.held[0].reason


def test_a_token_issued_before_the_stored_plan_changed_does_not_outrank_it() -> None:
    """The org upgraded at 11:55 (stored `pro` from then); the bucket's events still carry a
    `free` token issued at 11:50: the store is newer, so the bucket is billed. A token issued
    after the change still outranks the store."""
    upgraded = {"o": Org("o", "cus", plans=[PlanPeriod("free", 0), PlanPeriod("pro", 100)],
                         updated_at=100)}  # fmt: skip

    def decided(issued: int) -> tuple[RowState, str | None]:
        given = msgspec.structs.replace(
            batch({3600: MICROS}, orgs=upgraded),
            token_plans={("o", 3600): "free"},
            token_issued={("o", 3600): issued},
        )
        (row,) = plan_revisions(given, 3600).rows
        return row.state, row.plan_source

    assert decided(issued=50) == (RowState.PENDING, "stored")
    assert decided(issued=150) == (RowState.EXCLUDED, "token")


def taken_back(
    plan: str, total: int, chains: dict[str, int], carries: dict[str, int]
) -> list[tuple[RowState, str | None, int, str | None]]:
    """Bucket 0 of org o1, written per chain as `chains` (units), its usage now `total`
    units, the plan in force now `plan`: the rows the rollup writes."""
    written = sum(chains.values())
    batch = RollupBatch(
        totals=[UsageTotal("o1", "gbs", 0, total * MICROS)],
        ledger_sums=[UsageTotal("o1", "gbs", 0, written * MICROS)],
        revisions={("o1", "gbs", 0): 1},
        carries=[Carry("o1", "gbs", c, u * MICROS, u) for c, u in carries.items()],
        orgs={"o1": Org("o1", "cus_1", [PlanPeriod("pro", 0)], 0)},
        token_plans={("o1", 0): plan},
        ledger_chains={("o1", "gbs", 0): {c: u * MICROS for c, u in chains.items()}},
    )
    return [
        (r.state, r.reason, r.quantity, r.plan_source) for r in plan_revisions(batch, 3600).rows
    ]


def test_usage_taken_back_leaves_the_chain_that_holds_it_whatever_the_plan_now() -> None:
    """A bucket billed 10 units as pro whose plan now resolves to free (a newer token, a
    forced plan period) goes down to 6: the -4 is taken off the billed chain (refunded, as
    billed), not written to the free chain (the customer would keep paying 10). And the
    mirror: units written free and taken back while pro now are not refunded."""
    billed, free = {"billable": 10}, {Reason.FREE_PLAN: 10}
    assert taken_back("free", 6, billed, billed) == [(RowState.PENDING, None, -4, "ledger")]
    assert taken_back("pro", 6, free, free) == [(RowState.EXCLUDED, Reason.FREE_PLAN, -4, "ledger")]
    assert taken_back("pro", 6, billed, billed) == [(RowState.PENDING, None, -4, "token")]


def test_usage_taken_back_past_one_chain_is_split_between_the_chains_holding_it() -> None:
    """3 units billed and 3 free (usage added after a plan change follows the plan), down to
    1: 5 taken back, never more off a chain than it holds, the plan's chain now first."""
    both = {"billable": 3, Reason.FREE_PLAN: 3}
    assert taken_back("pro", 1, both, both) == [
        (RowState.PENDING, None, -3, "token"),
        (RowState.EXCLUDED, Reason.FREE_PLAN, -2, "ledger"),
    ]
    assert taken_back("free", 1, both, both) == [
        (RowState.EXCLUDED, Reason.FREE_PLAN, -3, "token"),
        (RowState.PENDING, None, -2, "ledger"),
    ]
    # units a rollback handed back are billed here by no chain: never refunded
    handed = {Reason.ROLLED_BACK: 4, Reason.FREE_PLAN: 2}
    assert taken_back("free", 2, handed, {Reason.FREE_PLAN: 2}) == [
        (RowState.EXCLUDED, Reason.FREE_PLAN, -4, "token")
    ]
    assert taken_back("pro", 2, handed, {Reason.FREE_PLAN: 2}) == [
        (RowState.EXCLUDED, Reason.FREE_PLAN, -4, "ledger")
    ]
