"""The seam between the two billers, as a legacy biller reads it (``GET /v1/seam``, the OFREP
flag ``controlplane_billed_ranges``, ``controlplane seam``).

The control plane bills a bucket (org, bucket start) when the ledger holds at least one row in
state ``sent`` for it, of any meter: per org and bucket, across meters, because that is how a
legacy biller bills (an org's hour). Rows a rollback cancelled at the provider are
``cancelled``, and so are rows an offset undid: neither is billed here any more.

The legacy biller's rule, exact:

    bill bucket ``b`` of org ``o``  iff  (``legacy_bill_until`` is null
                                          or ``b < legacy_bill_until``)
                                         and ``b`` lies in none of ``o``'s billed ranges

``legacy_bill_until`` covers every bucket the control plane bills or will bill from T on,
including those whose rows are still pending or held, and those of orgs with no row yet; the
ranges cover what it billed before, from an earlier cutover whose sent rows a rollback could not
cancel. Nothing here reads storage: :meth:`controlplane.cutover.Cutover.seam` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from controlplane.errors import Problem
from controlplane.interfaces import BilledRange


class Range(msgspec.Struct, frozen=True):
    """Consecutive buckets `[start, end)` (unix seconds) the control plane bills."""

    start: int
    end: int


class OrgRanges(msgspec.Struct, frozen=True):
    org_id: str
    ranges: list[Range]


class Seam(msgspec.Struct, frozen=True, kw_only=True):
    """Who bills which buckets in the window `[from, to)`: the legacy biller bills a bucket
    only if it starts before `legacy_bill_until` (every bucket when null) and lies in none of
    its org's `ranges`. Orgs without billed buckets in the window are absent."""

    start: int = msgspec.field(name="from")
    end: int = msgspec.field(name="to")
    bucket_seconds: int
    authority: str  # legacy or controlplane
    legacy_bill_until: int | None  # T while the control plane is the authority, else null
    orgs: list[OrgRanges]

    def ranges_of(self, org_id: str) -> list[Range]:
        return next((o.ranges for o in self.orgs if o.org_id == org_id), [])

    def legacy_bills(self, org_id: str, bucket_start: int) -> bool:
        """Whether the legacy biller bills this bucket (inside the window)."""
        until = self.legacy_bill_until
        if until is not None and bucket_start >= until:
            return False
        return not any(r.start <= bucket_start < r.end for r in self.ranges_of(org_id))


def window_problems(start: int | None, end: int | None, bucket_seconds: int) -> list[Problem]:
    """Why `[start, end)` is not a window to read the seam over (empty when it is): both
    given, on bucket boundaries, `from` before `to`."""
    problems: list[Problem] = []
    for name, value in (("from", start), ("to", end)):
        if value is None:
            problems.append(Problem(field=name, message="required (unix seconds)"))
        elif value % bucket_seconds:
            below = value - value % bucket_seconds
            problems.append(
                Problem(
                    field=name,
                    message=f"{value} is not aligned to the {bucket_seconds} s buckets "
                    f"(nearest: {below} or {below + bucket_seconds})",
                )
            )
    if not problems and start is not None and end is not None and end <= start:
        problems.append(Problem(field="to", message=f"must be after `from` ({start})"))
    return problems


def seam_of(
    start: int,
    end: int,
    bucket_seconds: int,
    authority: str,
    legacy_bill_until: int | None,
    billed: Sequence[BilledRange],
) -> Seam:
    """The answer from the flags and the stored ranges (ordered by org, then start)."""
    orgs: dict[str, list[Range]] = {}
    for r in billed:
        orgs.setdefault(r.org_id, []).append(Range(r.start, r.end))
    return Seam(
        start=start,
        end=end,
        bucket_seconds=bucket_seconds,
        authority=authority,
        legacy_bill_until=legacy_bill_until,
        orgs=[OrgRanges(org_id, ranges) for org_id, ranges in orgs.items()],
    )
