"""Rollup: fold closed dirty buckets into the ledger as exact, revisioned rows.

For each dirty (org, bucket) whose end is at or before the watermark, the total per meter (the
sum of its stored meter values, kept by ingest in the same transaction as the values) is
compared with what the ledger already holds for that (org, meter, bucket); a difference
becomes a new revision. Recomputing, not incrementing,
makes a rerun a no-op and a late event a correction, never a loss.

Rounding: each row's integer `quantity` is chosen so that, per (org, meter), the quantities
written so far sum to floor(exact usage so far); the remainder is carried, never dropped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import msgspec
import structlog

from controlplane.interfaces import (
    Carry,
    ChainRow,
    HeldBucket,
    ParityAlert,
    RollupBatch,
    RollupPlan,
    Storage,
)
from controlplane.ledger import BILLABLE, NewRow, Reason, RowState, segment
from controlplane.plans import DEFAULT_PLANS, FREE, Plans
from controlplane.units import MAX_MICROS, MICROS, floor_units, format_micros

DEFAULT = Plans(DEFAULT_PLANS)

log = structlog.get_logger("rollup")


class RollupStats(msgspec.Struct):
    skipped: str | None = None
    buckets: int = 0
    rows: int = 0
    pending: int = 0
    excluded: int = 0
    deferred_orgs: int = 0  # no stored plan, and the legacy biller could not answer
    held: int = 0  # buckets it cannot fold (see HeldBucket): alerted, the others rolled up
    unplanned: int = 0  # rows excluded as free only by default: no token, stored or legacy plan
    gauge_series: int = 0  # gauge series derived before the buckets were folded
    gauge_resets: int = 0  # snapshots that reset a level the deltas before them disagreed with


class LegacyPlans(msgspec.Struct, frozen=True):
    """The legacy biller's answers, for one rollup pass, about orgs with no stored plan."""

    plans: dict[str, str]  # org -> its plan there (an org it does not know is absent: free)
    answered: list[str]  # every org it answered for, known or not
    deferred: list[str]  # orgs it could not answer for: their buckets wait for a later pass


def plan_revisions(
    batch: RollupBatch,
    bucket_seconds: int,
    legacy_plans: Mapping[str, str] | None = None,
    plans: Plans = DEFAULT,
) -> RollupPlan:
    """Decide the revisions for one batch of closed dirty buckets (pure).

    The plan authority chain decides the row's segment, and the row records which link did
    (`plan_source`): the plan of the newest capability token among the bucket's events
    (`batch.token_plans`) unless it was issued before the stored plan period in force took
    effect (the store is newer then), else the org's plan stored here at the bucket's start,
    else the legacy biller's answer (`legacy_plans`, mapped through `plans`), else `free`.
    Rows of a plan that is not billable are excluded at once (``free_plan``), with a rounding
    carry of their own. A negative revision (usage taken back) goes to the chain that holds
    the units, billed or free, whatever the plan in force now (a plan changed since, a newer
    token): else it would refund usage never billed, or keep billing usage taken back. A
    bucket whose plan is none of `plans` is held, never guessed. The
    boundary T is left to the sender: it may still move until rows are sent, and an excluded
    row is final.
    """
    legacy = legacy_plans or {}
    totals = {(t.org_id, t.meter, t.bucket_start): t.value_micros for t in batch.totals}
    written = {(t.org_id, t.meter, t.bucket_start): t.value_micros for t in batch.ledger_sums}
    held = {
        (org_id, bucket_start): HeldBucket(
            org_id,
            bucket_start,
            f"{meter} total {format_micros(total)} is past the {format_micros(MAX_MICROS)} a "
            "bucket may hold (stored before ingest refused such totals)",
        )
        for (org_id, meter, bucket_start), total in sorted(totals.items())
        if abs(total) > MAX_MICROS
    }
    # chain -> [exact micros, whole units] so far; the batch's rows extend each chain in order.
    chains = {(c.org_id, c.meter, c.segment): [c.exact_micros, c.quantity] for c in batch.carries}
    touched: set[tuple[str, str, str]] = set()
    rows: list[NewRow] = []
    for key in sorted(totals.keys() | written.keys()):
        diff = totals.get(key, 0) - written.get(key, 0)
        if diff == 0:
            continue
        org_id, meter, bucket_start = key
        if (org_id, bucket_start) in held:
            continue
        org = batch.orgs.get(org_id)
        token = batch.token_plans.get((org_id, bucket_start))
        period = org.period_at(bucket_start) if org else None
        stored = period.plan if period else None
        issued = batch.token_issued.get((org_id, bucket_start))
        if period and issued is not None and issued < period.effective_from:
            token = None  # issued before the stored plan changed: the store is newer
        billable, why, source = _billable(plans, org_id, token, stored, legacy)
        if billable is None:
            held[(org_id, bucket_start)] = HeldBucket(org_id, bucket_start, why)
            continue
        reason = None if billable else Reason.FREE_PLAN
        parts = [(reason, diff, source)]
        if diff < 0:
            held_in = batch.ledger_chains.get(key, {})
            parts = _taken_back(
                -diff, reason, source, held_in.get(BILLABLE, 0), held_in.get(Reason.FREE_PLAN, 0)
            )
        revision = batch.revisions.get(key, 0)
        for reason, value, why in parts:
            revision += 1
            chain = (org_id, meter, segment(reason))
            so_far = chains.get(chain)
            if so_far is None:
                so_far = chains[chain] = [0, 0]
            so_far[0] += value
            quantity = floor_units(so_far[0]) - so_far[1]
            if value >= 0:
                quantity = max(0, quantity)  # a chain that owes units pays them back
            so_far[1] += quantity
            touched.add(chain)
            rows.append(
                NewRow(
                    org_id=org_id,
                    meter=meter,
                    bucket_start=bucket_start,
                    bucket_end=bucket_start + bucket_seconds,
                    revision=revision,
                    value_micros=value,
                    quantity=quantity,
                    state=RowState.EXCLUDED if reason else RowState.PENDING,
                    reason=reason,
                    plan_source=why,
                )
            )
    carries = [carry(*chain, *chains[chain]) for chain in sorted(touched)]
    return RollupPlan(rows=rows, carries=carries, held=list(held.values()))


def _taken_back(
    taken: int, reason: Reason | None, source: str, billed: int, free: int
) -> list[tuple[Reason | None, int, str]]:
    """Usage taken back from a bucket (`taken` micro-units) as rows of the chains that hold
    it, whatever the plan in force now (`reason`, decided by `source`): the billed chain
    gives back at most what it holds (`billed`), the free plan's chain the rest (units
    written free, or never billed here: handed back, before T). The plan's chain now goes
    first; a row in the other says so (`plan_source` ``ledger``)."""
    if reason is None:
        from_billed = min(taken, max(0, billed))
    else:  # the free chain first, as far as it holds
        from_billed = min(taken - min(taken, max(0, free)), max(0, billed))
    parts = [(None, -from_billed), (Reason.FREE_PLAN, from_billed - taken)]
    if reason is not None:
        parts.reverse()
    return [(r, value, source if r == reason else LEDGER_SOURCE) for r, value in parts if value]


def _billable(
    plans: Plans,
    org_id: str,
    token: str | None,
    stored: str | None,
    legacy: Mapping[str, str],
) -> tuple[bool | None, str, str]:
    """Whether the org's usage in a bucket is billed (None: its plan is unknown), why, and
    the plan authority chain's link that decided: ``token`` (the newest capability token
    among the bucket's events), ``stored`` (the org's plan history here), ``legacy`` (the
    legacy biller's answer, mapped), else ``default`` (free)."""
    # the reasons are only written for a bucket held: most buckets are billed or excluded
    if token is not None:
        billable = plans.is_billable(token)
        why = (
            ""
            if billable is not None
            else (
                f"org {org_id!r}'s capability token states plan {token!r}, which is not configured "
                f"(plans: {', '.join(plans.names)})"
            )
        )
        return billable, why, "token"
    if stored is not None:
        billable = plans.is_billable(stored)
        why = (
            ""
            if billable is not None
            else (
                f"org {org_id!r} is on plan {stored!r}, which is not configured (plans: "
                f"{', '.join(plans.names)}): set its plan (`controlplane orgs set`)"
            )
        )
        return billable, why, "stored"
    answer = legacy.get(org_id)
    if answer is None:
        return plans.is_billable(FREE), "", DEFAULT_SOURCE
    plan = plans.from_legacy(answer)
    if plan is None:
        return (
            None,
            f"the legacy biller says org {org_id!r} is on plan {answer!r}, which maps to no "
            f"configured plan (plans: {', '.join(plans.names)}): add it to [legacy] plan_map, "
            "or set the org's plan (`controlplane orgs set`)",
            "legacy",
        )
    return plans.is_billable(plan), "", "legacy"


def carry(org_id: str, meter: str, chain: str, exact: int, whole: int) -> Carry:
    """A rounding chain's carry as stored: the usage not yet in whole units on the ledger
    (exact less whole units, with 0 units). Never the lifetime sums: those outgrow storage
    integers (a meter of 10^12 units an hour does in ten hours); the next row's quantity is
    the same from either."""
    return Carry(org_id, meter, chain, exact - whole * MICROS, 0)


def requantify(chain: list[ChainRow]) -> tuple[dict[int, int], int, int]:
    """Re-derive the quantities of one rounding chain (rows of one segment, oldest first).

    Frozen rows keep theirs; each other row gets floor(exact so far) minus the units before
    it (never below zero for usage), so the chain again sums to floor(its exact total) once
    the frozen rows hold no more than that. Returns (changed quantities by row
    id, exact micros, whole units) — the chain's new carry.
    """
    exact = whole = 0
    changed: dict[int, int] = {}
    for row in chain:
        exact += row.value_micros
        if row.frozen:
            whole += row.quantity
            continue
        quantity = floor_units(exact) - whole
        if row.value_micros >= 0:
            # Never below zero for usage: after rows left the chain (a rollback cancelled
            # them) while rows that may have reached the provider stayed, those can hold
            # more units than the chain's floor; later rows pay that back instead of going
            # out negative.
            quantity = max(0, quantity)
        whole += quantity
        if quantity != row.quantity:
            changed[row.id] = quantity
    return changed, exact, whole


class ChainMember(msgspec.Struct, frozen=True):
    """One ledger row of an (org, meter), as its rounding chains are re-derived from it."""

    id: int
    value_micros: int
    quantity: int
    state: RowState
    reason: str | None
    attempts: int
    held: bool  # another live claimant holds it: it may be about to send its quantity
    offsets_id: int | None = None  # an offsetting row (its chain: the row it offsets)


_MOVABLE = frozenset({RowState.PENDING, RowState.HELD, RowState.EXCLUDED})


def rechain(
    org_id: str, meter: str, rows: Iterable[ChainMember]
) -> tuple[dict[int, int], list[Carry]]:
    """Re-derive every rounding chain (one per segment) of one (org, meter) from its ledger
    rows, oldest first, after rows left the billable chain (excluded, cancelled, re-issued).
    Returns the quantities that change, by row id, and each chain's carry.

    A row is frozen once it may be on its way to the provider: attempted, sent (or cancelled
    after), or held by another sender. Rows never offered to the provider keep moving:
    pending ones, those held before any attempt (`no_customer`), and excluded ones. The
    billable chain is always present, so its carry is reset even when it emptied.
    """
    segments: dict[str, list[ChainRow]] = {BILLABLE: []}
    for r in rows:
        # an offsetting row holds exactly its row's negative, whatever its chain's carry
        frozen = r.state not in _MOVABLE or r.attempts > 0 or r.held or r.offsets_id is not None
        if r.state is RowState.EXCLUDED:
            frozen = False  # never sent: its units may move
        segments.setdefault(segment(r.reason, r.offsets_id), []).append(
            ChainRow(r.id, r.value_micros, r.quantity, frozen)
        )
    changed: dict[int, int] = {}
    carries: list[Carry] = []
    for name, chain in segments.items():
        moved, exact, whole = requantify(chain)
        changed.update(moved)
        carries.append(carry(org_id, meter, name, exact, whole))
    return changed, carries


async def run(
    storage: Storage,
    *,
    bucket_seconds: int,
    closed_before: int,
    batch_buckets: int = 5000,
    org_id: str | None = None,
    legacy: LegacyPlans | None = None,
    plans: Plans = DEFAULT,
) -> RollupStats:
    """Roll up every dirty bucket that ends at or before `closed_before`. With `legacy`, a
    bucket no stored plan covers waits unless the legacy biller answered for its org (also
    an org whose events arrived after it was asked: it is asked on the next pass)."""
    stats = RollupStats(deferred_orgs=len(legacy.deferred) if legacy else 0)
    started = time.monotonic()

    held: list[HeldBucket] = []  # by the step in progress

    def planner(batch: RollupBatch) -> RollupPlan:
        plan = plan_revisions(batch, bucket_seconds, legacy.plans if legacy else None, plans)
        held[:] = plan.held
        return plan

    while True:
        held.clear()
        buckets, rows = await storage.rollup_step(
            closed_before,
            bucket_seconds,
            batch_buckets,
            planner,
            org_id,
            unplanned_allowed=legacy.answered if legacy else None,
        )
        if buckets == 0:
            break
        stats.buckets += buckets - len(held)
        stats.held += len(held)
        for bucket in held:
            await _alert_held(storage, bucket)
        stats.rows += len(rows)
        stats.pending += sum(1 for r in rows if r.state is RowState.PENDING)
        stats.excluded += sum(1 for r in rows if r.state is RowState.EXCLUDED)
        stats.unplanned += sum(1 for r in rows if r.plan_source == DEFAULT_SOURCE)
    if stats.buckets or stats.held:
        log.info(
            "rollup.done",
            buckets=stats.buckets,
            rows=stats.rows,
            pending=stats.pending,
            excluded=stats.excluded,
            unplanned=stats.unplanned,
            deferred_orgs=stats.deferred_orgs,
            held=stats.held,
            seconds=round(time.monotonic() - started, 3),
        )
    return stats


async def _alert_held(storage: Storage, bucket: HeldBucket) -> None:
    """A held bucket is billed by nobody until someone acts: say so where operators look."""
    out_of_range = "a bucket may hold" in bucket.reason
    until = (
        "an event for it brings the total back in range"
        if out_of_range
        else "the org's plan is one of [[plans]] (`controlplane orgs set ORG --plan ...` "
        "releases it)"
    )
    text = (
        f"Rollup holds org {bucket.org_id!r}, bucket {bucket.bucket_start}: {bucket.reason}. "
        f"Its usage is stored but reaches no ledger row until {until}; the other buckets are "
        "rolled up."
    )
    log.error(
        "rollup.bucket_held", org=bucket.org_id, bucket=bucket.bucket_start, reason=bucket.reason
    )
    await storage.record_alert(
        ParityAlert(
            meter=HELD_ALERTS,
            bucket_start=bucket.bucket_start,
            dedup_key=f"{HELD_ALERTS}:{bucket.org_id}:{bucket.bucket_start}",
            text=text,
            state="pending",
            created_at=int(time.time()),
        )
    )


DEFAULT_SOURCE = "default"  # the plan chain's last link: no plan from any source, so `free`
LEDGER_SOURCE = "ledger"  # usage taken back from the chain holding it, not the plan's now
HELD_ALERTS = "job:rollup:held"  # delivered by the job watcher, apart from job health alerts


def watermark(now: float, grace_seconds: int) -> int:
    """Buckets ending at or before this are closed."""
    return int(now) - grace_seconds
