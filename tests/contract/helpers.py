"""Shared values and builders for the storage contract suite."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from controlplane import moves, rollup
from controlplane.interfaces import (
    AuditEntry,
    Claim,
    RollupBatch,
    RollupPlan,
    Settlement,
    Storage,
    StoredEvent,
    UsageTotal,
)
from controlplane.ledger import LedgerRow, NewRow, RowState, segment

HOUR = 3600
UNIT = 1_000_000  # micro-units in one billing unit
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z, a bucket boundary
B = [T0 + i * HOUR for i in range(64)]  # bucket starts
NOW = T0 + 100 * HOUR  # a wall clock well after every bucket used


def plan(batch: RollupBatch) -> RollupPlan:
    """The real planner, as the rollup job passes it."""
    return rollup.plan_revisions(batch, HOUR)


def event(
    event_id: str,
    org: str,
    at: int,
    micros: int,
    meter: str = "gbs",
    *,
    source: str = "test",
    more: tuple[tuple[str, int], ...] = (),
) -> StoredEvent:
    """One usage event at unix second `at`, worth `micros` of `meter` (and `more`)."""
    return StoredEvent(
        source=source,
        event_id=event_id,
        type="tick",
        org_id=org,
        time_ms=at * 1000,
        data=b'{"mb":1024,"s":20}',
        values=((meter, micros), *more),
    )


def entry(action: str = "test.change", subject: str = "thing", **fields: Any) -> AuditEntry:
    return AuditEntry(action=action, subject=subject, actor="tester", **fields)


def claim(claimant: str, at: int = NOW, seconds: int = 300) -> Claim:
    return Claim(claimant=claimant, at=at, until=at + seconds)


def settlement(
    row: LedgerRow,
    state: RowState,
    reason: str | None = None,
    *,
    detail: str | None = None,
    provider_id: str | None = None,
    customer: str | None = None,
    actor: str = "sender",
) -> Settlement:
    """A sender's decision, with the audit record the sender gives it (a move to `sent`)."""
    decided = Settlement(
        row_id=row.id,
        identifier=row.identifier,
        state=state,
        reason=reason,
        detail=detail,
        provider_id=provider_id,
        customer=customer,
        quantity=row.quantity,
    )
    return moves.audited([decided], actor)[0]


async def pro(storage: Storage, *orgs: str, customer: bool = True, since: int = 0) -> None:
    """Put `orgs` on the pro plan from `since`, each with a provider customer `cus_<org>`."""
    for org in orgs:
        await storage.set_org(
            org,
            customer=f"cus_{org}" if customer else None,
            plan="pro",
            effective_from=since,
            at=NOW,
            audit=entry("org.set", org),
        )


async def roll(
    storage: Storage, closed_before: int = NOW, org_id: str | None = None
) -> list[NewRow]:
    """Roll up every closed dirty bucket; the rows written."""
    written: list[NewRow] = []
    while True:
        done, rows = await storage.rollup_step(closed_before, HOUR, 1000, plan, org_id=org_id)
        if done == 0:
            assert rows == []
            return written
        written.extend(rows)


def as_map(totals: Iterable[UsageTotal]) -> dict[tuple[str, str, int], int]:
    out: dict[tuple[str, str, int], int] = {}
    for t in totals:
        assert type(t.value_micros) is int, t
        key = (t.org_id, t.meter, t.bucket_start)
        assert key not in out, f"{key} reported twice"
        out[key] = t.value_micros
    return out


def chains(rows: Iterable[LedgerRow]) -> dict[tuple[str, str, str], tuple[int, int]]:
    """Per rounding chain (org, meter, segment): (Σ exact micros, Σ quantities)."""
    sums: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        acc = sums[(r.org_id, r.meter, segment(r.reason))]
        acc[0] += r.value_micros
        acc[1] += r.quantity
    return {k: (v[0], v[1]) for k, v in sums.items()}


def assert_chains_floor(rows: Iterable[LedgerRow]) -> None:
    """Invariant 3: in every rounding chain, Σ quantities == floor(Σ exact usage)."""
    for key, (exact, quantity) in chains(rows).items():
        assert quantity == exact // UNIT, f"{key}: {quantity} units for {exact} micros"


def by_id(rows: Iterable[LedgerRow]) -> dict[int, LedgerRow]:
    return {r.id: r for r in rows}
