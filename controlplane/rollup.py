"""Rollup: fold closed dirty buckets into the ledger as exact, revisioned rows.

For each dirty (org, bucket) whose end is at or before the watermark, the total per meter is
recomputed from stored meter values and compared with what the ledger already holds for that
(org, meter, bucket); a difference becomes a new revision. Recomputing, not incrementing,
makes a rerun a no-op and a late event a correction, never a loss.

Rounding: each row's integer `quantity` is chosen so that, per (org, meter), the quantities
written so far sum to floor(exact usage so far); the remainder is carried, never dropped.
"""

from __future__ import annotations

import time

import msgspec
import structlog

from controlplane.interfaces import Carry, RollupBatch, RollupPlan, Storage
from controlplane.ledger import NewRow, Reason, RowState
from controlplane.units import floor_units

log = structlog.get_logger("rollup")

FREE_PLAN = "free"


class RollupStats(msgspec.Struct):
    buckets: int = 0
    rows: int = 0
    pending: int = 0
    excluded: int = 0


def plan_revisions(batch: RollupBatch, bucket_seconds: int) -> RollupPlan:
    """Decide the revisions for one batch of closed dirty buckets (pure)."""
    totals = {(t.org_id, t.meter, t.bucket_start): t.value_micros for t in batch.totals}
    written = {(t.org_id, t.meter, t.bucket_start): t.value_micros for t in batch.ledger_sums}
    carries = {(c.org_id, c.meter): c for c in batch.carries}
    rows: list[NewRow] = []
    for key in sorted(totals.keys() | written.keys()):
        diff = totals.get(key, 0) - written.get(key, 0)
        if diff == 0:
            continue
        org_id, meter, bucket_start = key
        carry = carries.get((org_id, meter)) or Carry(org_id, meter, 0, 0)
        exact = carry.exact_micros + diff
        whole = floor_units(exact)
        carries[(org_id, meter)] = Carry(org_id, meter, exact, whole)
        org = batch.orgs.get(org_id)
        plan = (org.plan_at(bucket_start) if org else None) or FREE_PLAN
        free = plan == FREE_PLAN
        rows.append(
            NewRow(
                org_id=org_id,
                meter=meter,
                bucket_start=bucket_start,
                bucket_end=bucket_start + bucket_seconds,
                revision=batch.revisions.get(key, 0) + 1,
                value_micros=diff,
                quantity=whole - carry.quantity,
                state=RowState.EXCLUDED if free else RowState.PENDING,
                reason=Reason.FREE_PLAN if free else None,
            )
        )
    touched = {(r.org_id, r.meter) for r in rows}
    return RollupPlan(rows=rows, carries=[c for k, c in carries.items() if k in touched])


async def run(
    storage: Storage,
    *,
    bucket_seconds: int,
    closed_before: int,
    batch_buckets: int = 5000,
    org_id: str | None = None,
) -> RollupStats:
    """Roll up every dirty bucket that ends at or before `closed_before`."""
    stats = RollupStats()
    started = time.monotonic()

    def planner(batch: RollupBatch) -> RollupPlan:
        return plan_revisions(batch, bucket_seconds)

    while True:
        buckets, rows = await storage.rollup_step(
            closed_before, bucket_seconds, batch_buckets, planner, org_id=org_id
        )
        if buckets == 0:
            break
        stats.buckets += buckets
        stats.rows += len(rows)
        stats.pending += sum(1 for r in rows if r.state is RowState.PENDING)
        stats.excluded += sum(1 for r in rows if r.state is RowState.EXCLUDED)
    if stats.buckets:
        log.info(
            "rollup.done",
            buckets=stats.buckets,
            rows=stats.rows,
            pending=stats.pending,
            excluded=stats.excluded,
            seconds=round(time.monotonic() - started, 3),
        )
    return stats


def watermark(now: float, grace_seconds: int) -> int:
    """Buckets ending at or before this are closed."""
    return int(now) - grace_seconds
