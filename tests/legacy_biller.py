"""A simulated legacy biller that keeps docs/legacy-biller-contract.md exactly.

Before each billing run it reads the seam once (``GET /v1/seam`` or the core's
:meth:`~controlplane.cutover.Cutover.seam`, as JSON) and uses that one answer for the whole run:
it bills a closed hour bucket of an org only if the bucket starts before ``legacy_bill_until``
(every bucket when null) and lies in none of the org's billed ranges. It bills each (org, bucket)
at most once and records when, so a test can add up both billers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

HOUR = 3600

ReadSeam = Callable[[int, int], Awaitable[dict[str, Any]]]
"""The seam's JSON answer for the window [from, to)."""


class SimulatedLegacy:
    """Bills buckets from `since` (a bucket boundary) on; `billed` maps (org, bucket start) to
    the time of the run that billed it."""

    def __init__(self, read: ReadSeam, since: int, bucket_seconds: int = HOUR) -> None:
        self.read = read
        self.since = since
        self.bucket = bucket_seconds
        self.billed: dict[tuple[str, int], int] = {}
        self.runs = 0

    @property
    def billed_until(self) -> int | None:
        """The end of the newest bucket billed (what a legacy source reports to preflight)."""
        if not self.billed:
            return None
        return max(b for _, b in self.billed) + self.bucket

    async def run(self, now: int, usage: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """One billing run at `now` over the (org, bucket start) pairs the legacy biller has
        usage for: bills the closed ones the contract gives it. Returns those billed now."""
        closed = now - now % self.bucket
        if closed <= self.since:
            return []
        seam = await self.read(self.since, closed)
        until = seam["legacy_bill_until"]
        ranges = {o["org_id"]: [(r["start"], r["end"]) for r in o["ranges"]] for o in seam["orgs"]}
        self.runs += 1
        billed_now = []
        for org, bucket in sorted(set(usage)):
            if bucket < self.since or bucket >= closed or (org, bucket) in self.billed:
                continue
            if until is not None and bucket >= until:
                continue
            if any(start <= bucket < end for start, end in ranges.get(org, [])):
                continue
            self.billed[(org, bucket)] = now
            billed_now.append((org, bucket))
        return billed_now
