"""`/v1/seam`: which buckets the legacy biller may bill, per org (scope `read`, as the flags).

The answer is :class:`controlplane.seam.Seam`: `legacy_bill_until`, and per org the ranges the
control plane bills. The legacy biller bills a bucket only if it starts before
`legacy_bill_until` (every bucket when null) and lies in none of its org's ranges."""

from __future__ import annotations

from litestar import Controller, get

from controlplane.http.guards import BEARER, require_scope
from controlplane.http.params import CP, From, Org, To
from controlplane.http.problems import AUTH, documented
from controlplane.seam import Seam


class SeamController(Controller):
    """Reads behind a token with the `read` scope."""

    path = "/v1/seam"
    tags = ["cutover"]
    security = BEARER
    guards = [require_scope]
    opt = {"scope": "read"}

    @get(
        summary="Per org, the bucket ranges the control plane bills, and legacy_bill_until",
        responses=documented(*AUTH, 400, 422),
    )
    async def seam(self, cp: CP, start: From = None, end: To = None, org: Org = None) -> Seam:
        """`from` and `to` (required) are unix seconds on bucket boundaries, `from` before
        `to`; `org` narrows the answer to one org."""
        return await cp.cutover.seam(start, end, org)
