"""Reconciliation of the ledger with the provider's aggregates: run one for a window, and the
stored runs (scope `read`)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, get
from litestar.params import QueryParameter

from controlplane.errors import InvalidInput
from controlplane.http.guards import BEARER, require_scope
from controlplane.http.params import CP, From, Limit, To
from controlplane.http.problems import AUTH, documented
from controlplane.interfaces import Finding, ReconcileRun
from controlplane.reconcile import clean_since, window_problems


class Reconciliation(msgspec.Struct):
    id: int
    checked_at: int
    start: int = msgspec.field(name="from")
    end: int = msgspec.field(name="to")  # the last settled hour's end, when the window reached it
    org_id: str | None
    status: str  # clean or mismatch
    customers: int
    hours: int
    units_short: int  # under billing
    units_over: int  # double billing
    findings: list[Finding]

    @classmethod
    def of(cls, run: ReconcileRun) -> Reconciliation:
        status = "clean" if run.clean else "mismatch"
        fields = msgspec.structs.asdict(run)
        del fields["clean"]
        return cls(**fields, status=status)


class ReconcileRuns(msgspec.Struct):
    clean_since: int | None  # the start of the unbroken series of clean runs, newest first
    runs: list[Reconciliation]


class ReconciliationController(Controller):
    """Every route needs `read`."""

    path = "/v1/reconciliation"
    tags = ["reconciliation"]
    security = BEARER
    guards = [require_scope]
    opt = {"scope": "read"}

    @get(
        summary="Reconcile the ledger's sent rows with the provider's hourly aggregates",
        responses=documented(*AUTH, 400, 422),
    )
    async def reconcile(
        self,
        cp: CP,
        start: From = None,
        end: To = None,
        org: Annotated[str | None, QueryParameter(min_length=1, max_length=256)] = None,
    ) -> Reconciliation:
        """Hours in [`from`, `to`) (hour boundaries) older than `[reconcile] settle_seconds`,
        per (org, customer, meter, hour of the timestamp sent): `short` at the provider (under
        billing) or `over` (double billing). The run is stored."""
        problems = window_problems(start, end)
        if problems or start is None or end is None:
            raise InvalidInput(problems)
        return Reconciliation.of(await cp.reconciler.run(start, end, org_id=org))

    @get("/runs", summary="Stored reconciliations, newest first", responses=documented(*AUTH, 400))
    async def runs(self, cp: CP, limit: Limit = 50) -> ReconcileRuns:
        runs = await cp.reconciler.runs(limit)
        return ReconcileRuns(clean_since(runs), [Reconciliation.of(r) for r in runs])
