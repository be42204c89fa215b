"""What the storage plugins share besides the base class: rows read back into records (by
column name), the ingest bound, and the checks made inside write transactions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, TypeVar

import msgspec

from controlplane.errors import FlagRefused, InvalidInput, Problem
from controlplane.events import bucket_of
from controlplane.interfaces import (
    AuditRecord,
    FlagsChanged,
    Org,
    ParityRun,
    PlanPeriod,
    StaticFlags,
    StoredEvent,
)
from controlplane.ledger import LedgerRow, NewRow, RowState
from controlplane.units import MAX_MICROS, format_micros

S = TypeVar("S", bound=msgspec.Struct)
_decode = msgspec.json.Decoder()


def from_row(cls: type[S], row: Any, **decoded: Any) -> S:
    """The record `cls` from a driver row, field by column name (`decoded`: fields the caller
    decoded itself, e.g. JSON). Columns the record has no field for are ignored; SQLite's
    0 and 1 are read as booleans."""
    return msgspec.convert({**dict(row), **decoded}, cls, strict=False)


def ledger_row(row: Any) -> LedgerRow:
    return from_row(LedgerRow, row)


def _json_or_none(text: str | None) -> Any:
    return None if text is None else _decode.decode(text)


def audit_record(row: Any) -> AuditRecord:
    return from_row(
        AuditRecord,
        row,
        before=_json_or_none(row["before"]),
        after=_json_or_none(row["after"]),
    )


def parity_run(row: Any) -> ParityRun:
    return from_row(ParityRun, row)


def org_record(row: Any, plans: Iterable[Any]) -> Org:
    """An org from its row and its plan periods' rows, oldest first."""
    return from_row(Org, row, plans=[from_row(PlanPeriod, p) for p in plans])


def orgs_with_plans(rows: Iterable[Any]) -> dict[str, Org]:
    """Orgs from (org_id, customer, updated_at, plan, effective_from) rows, an org's plans in
    order; an org without plans has one row with plan NULL."""
    found: dict[str, tuple[str | None, int, list[PlanPeriod]]] = {}
    for r in rows:
        entry = found.setdefault(r["org_id"], (r["customer"], r["updated_at"], []))
        if r["plan"] is not None:
            entry[2].append(PlanPeriod(plan=r["plan"], effective_from=r["effective_from"]))
    return {
        org_id: Org(org_id=org_id, customer=c, plans=p, updated_at=u)
        for org_id, (c, u, p) in found.items()
    }


BucketKey = tuple[str, str, int]  # (org, meter, bucket start)


def bucket_sums(events: Iterable[StoredEvent], bucket_seconds: int) -> dict[BucketKey, int]:
    """What a batch adds to each (org, meter, bucket) total."""
    sums: dict[BucketKey, int] = defaultdict(int)
    for e in events:
        bucket = bucket_of(e.time_ms, bucket_seconds)
        for meter, micros in e.values:
            sums[(e.org_id, meter, bucket)] += micros
    return sums


def _first_past(
    events: Iterable[StoredEvent], bucket_seconds: int, before: Mapping[BucketKey, int], bound: int
) -> tuple[StoredEvent, BucketKey, int] | None:
    """The first event, in batch order, that takes a running total (from `before`) past
    `bound` either way, with its key and the total it reaches."""
    running = dict(before)
    for e in events:
        bucket = bucket_of(e.time_ms, bucket_seconds)
        for meter, micros in e.values:
            key = (e.org_id, meter, bucket)
            total = running[key] = running.get(key, 0) + micros
            if abs(total) > bound:
                return e, key, total
    return None


def _refuse(e: StoredEvent, key: BucketKey, what: str) -> InvalidInput:
    org_id, meter, bucket = key
    return InvalidInput(
        [
            Problem(
                field="data",
                message=(
                    f"event {e.event_id!r} (source {e.source!r}) would take the {meter} usage "
                    f"of org {org_id!r} in the bucket starting {bucket} {what}; one bucket "
                    f"holds at most {format_micros(MAX_MICROS)} either way"
                ),
            )
        ]
    )


def check_batch_alone(events: Iterable[StoredEvent], bucket_seconds: int) -> None:
    """Before a batch is summed into stored totals: refuse it when its own running total for
    a bucket passes twice the bound, which no stored total (itself within the bound) brings
    back inside. Past this check no sum comes near the storage's integer limits."""
    if past := _first_past(events, bucket_seconds, {}, 2 * MAX_MICROS):
        e, key, total = past
        raise _refuse(e, key, f"past the bound whatever it holds (this batch adds {total})")


def check_bucket_bound(
    events: Iterable[StoredEvent], bucket_seconds: int, before: Mapping[BucketKey, int]
) -> None:
    """Raise InvalidInput naming the first event, in batch order, that takes a bucket total
    (from the stored totals `before`) past :data:`MAX_MICROS` either way: the batch is refused
    whole, nothing is stored."""
    if past := _first_past(events, bucket_seconds, before, MAX_MICROS):
        e, key, total = past
        raise _refuse(e, key, f"to {format_micros(total)}")


class Reissue(NamedTuple):
    """A row to re-issue: sent, held for a provider error, or cancelled by a rollback (the
    `reissuable` query's columns, by name)."""

    id: int
    identifier: str
    state: str
    org_id: str
    meter: str
    bucket_start: int
    bucket_end: int
    value_micros: int
    quantity: int
    plan_source: str | None
    last_revision: int  # of its bucket

    def next(self, detail: str, taken: dict[tuple[str, str, int], int]) -> NewRow:
        """The revision that carries its usage from now on: the bucket's next one (`taken`
        holds the revisions already given in this transaction, per bucket)."""
        bucket = (self.org_id, self.meter, self.bucket_start)
        revision = taken[bucket] = taken.get(bucket, self.last_revision) + 1
        return NewRow(
            org_id=self.org_id,
            meter=self.meter,
            bucket_start=self.bucket_start,
            bucket_end=self.bucket_end,
            revision=revision,
            value_micros=self.value_micros,
            quantity=self.quantity,
            state=RowState.PENDING,
            detail=f"re-issues {self.identifier}: {detail}",
            plan_source=self.plan_source,
        )


def check_customer_free(customer: str, org_id: str, owner: str | None) -> None:
    """One provider customer maps to one org: refuse (InvalidInput) giving `org_id` a
    customer another org has."""
    if owner is not None:
        raise InvalidInput(
            [
                Problem(
                    field="customer",
                    message=f"{customer} is already org {owner!r}'s customer; one provider "
                    "customer bills one org (its usage and invoices would mix)",
                )
            ]
        )


STATIC_FLAGS = "static_flags"  # the settings key of the static layers' recorded flag values


def moved_flags(expected: Mapping[str, int], stored: Mapping[str, int]) -> list[str]:
    """The flags whose runtime version is not the one expected (0: no runtime value)."""
    return sorted(n for n, v in expected.items() if stored.get(n, 0) != v)


def check_flag_versions(expected: Mapping[str, int], stored: Mapping[str, int]) -> None:
    """Raise FlagRefused (rule `version`) when a change was prepared from older flags."""
    if moved := moved_flags(expected, stored):
        raise FlagRefused(
            "version", f"{', '.join(moved)} changed while this change was prepared; retry"
        )


def check_flags_unchanged(expected: Mapping[str, int], stored: Mapping[str, int]) -> None:
    """Raise FlagsChanged when a flag moved since a sender read it."""
    if moved := moved_flags(expected, stored):
        raise FlagsChanged(f"{', '.join(moved)} changed since the flags were read")


def check_static(static: StaticFlags, stored: str | None) -> None:
    """Raise FlagRefused (rule `version`) when the static layers' record moved meanwhile."""
    if (None if stored is None else _decode.decode(stored)) != static.before:
        raise FlagRefused(
            "version", "another process recorded the static flag layers meanwhile; retry"
        )
