"""Parity between the control plane's usage and the legacy biller's: a comparison of any
window (`/internal/usage-parity`, also for signed requests) and the checker's history
(`/v1/parity/...`)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, get
from litestar.exceptions import ValidationException
from litestar.params import FromQuery, PathParameter, QueryParameter

from controlplane.errors import NotFound
from controlplane.http.guards import BEARER, any_scope, parity_auth
from controlplane.http.params import CP, MAX_ID, From, Limit, To
from controlplane.http.problems import AUTH, documented
from controlplane.parity import CleanSince, comparison_api, drift_api, run_api, window_problems
from controlplane.times import MAX_SECONDS

# the answers: every amount is an exact decimal string ---------------------------------------


class WorstOrg(msgspec.Struct):
    org_id: str
    drift: str
    relative_drift: str | None  # None: undefined (nothing on the legacy side)


class ParityTotals(msgspec.Struct):
    controlplane: str
    legacy: str | None  # None: no legacy source
    drift: str | None
    relative_drift: str | None
    within_tolerance: bool | None


class ParitySummary(msgspec.Struct):
    status: str  # clean, mismatch or no_legacy
    orgs: int
    mismatches: int
    only_controlplane: int
    only_legacy: int
    worst: WorstOrg | None
    totals: ParityTotals
    material_orgs: int
    alarming: bool


class OrgComparison(msgspec.Struct):
    org_id: str
    controlplane: str | None  # None: absent on this side
    legacy: str | None
    side: str  # both, controlplane or legacy
    drift: str | None
    absolute_drift: str | None
    relative_drift: str | None
    within_tolerance: bool | None


class ParityComparison(msgspec.Struct):
    meter: str
    start: int = msgspec.field(name="from")
    end: int = msgspec.field(name="to")
    tolerance: str
    summary: ParitySummary
    orgs: list[OrgComparison]


class RunTotals(msgspec.Struct):
    controlplane: str
    legacy: str
    drift: str


class RunWorst(msgspec.Struct):
    org_id: str
    absolute_drift: str
    relative_drift: str | None


class ParityRunSummary(msgspec.Struct):
    id: int
    meter: str
    bucket_start: int
    bucket_end: int
    checked_at: int
    status: str  # clean or mismatch
    orgs: int
    mismatches: int
    material_orgs: int
    alarming: bool
    alarm_since: int | None
    totals: RunTotals
    worst: RunWorst | None


class OrgMismatch(msgspec.Struct):
    org_id: str
    controlplane: str | None
    legacy: str | None
    drift: str
    relative_drift: str | None


class ParityRunDetails(ParityRunSummary):
    mismatching_orgs: list[OrgMismatch]


class CleanStreak(msgspec.Struct):
    since: int | None  # start of the first bucket of the unbroken clean streak
    until: int | None  # end of the newest checked bucket
    buckets: int
    seconds: int

    @classmethod
    def of(cls, clean: CleanSince) -> CleanStreak:
        return cls(clean.since, clean.until, clean.buckets, clean.seconds)


class ParityRuns(msgspec.Struct):
    meter: str
    clean: CleanStreak
    runs: list[ParityRunSummary]


class ParityCleanSince(msgspec.Struct):
    meter: str
    since: int | None
    until: int | None
    buckets: int
    seconds: int


# the handlers ----------------------------------------------------------------------------


class UsageParityController(Controller):
    """A bearer token with the `parity` scope, or X-Timestamp and X-Signature (HMAC-SHA256
    with `parity.hmac_secret`), so a legacy biller can ask without holding a token."""

    path = "/internal/usage-parity"
    tags = ["parity"]
    guards = [parity_auth]

    @get(
        summary="Per-org usage of the parity meter: control plane (from events) against legacy",
        responses=documented(*AUTH, 400),
    )
    async def usage_parity(
        self,
        cp: CP,
        start: Annotated[int, QueryParameter(name="from", ge=0, le=MAX_SECONDS)],
        end: Annotated[int, QueryParameter(name="to", ge=0, le=MAX_SECONDS)],
        mismatches_only: FromQuery[bool] = False,
    ) -> ParityComparison:
        """`from` and `to` are unix seconds on bucket boundaries. Auth: a bearer token with the
        `parity` scope, or X-Timestamp and X-Signature (HMAC-SHA256)."""
        problems = window_problems(start, end, cp.config.rollup.bucket_seconds)
        if problems:
            raise ValidationException(
                detail="; ".join(f"{p.field}: {p.message}" for p in problems),
                extra=[{"key": p.field, "message": p.message, "source": "query"} for p in problems],
            )
        comparison = await cp.parity(start, end)
        return msgspec.convert(
            comparison_api(comparison, mismatches_only=mismatches_only), ParityComparison
        )


class ParityRunsController(Controller):
    """The checker's history, for a token with the `read` or the `parity` scope."""

    path = "/v1/parity"
    tags = ["parity"]
    security = BEARER
    guards = [any_scope]
    opt = {"scopes": ("read", "parity")}

    @get(
        "/runs",
        summary="The parity checker's runs, newest bucket first, and since when parity is clean",
        responses=documented(*AUTH, 400),
    )
    async def parity_runs(
        self, cp: CP, start: From = None, end: To = None, limit: Limit = 100
    ) -> ParityRuns:
        runs = await cp.parity_runs(limit=limit, start=start, end=end)
        return ParityRuns(
            meter=cp.config.parity.meter,
            clean=CleanStreak.of(await cp.parity_clean_since()),
            runs=msgspec.convert([run_api(r) for r in runs], list[ParityRunSummary]),
        )

    @get(
        "/runs/{run_id:int}",
        summary="One parity run with the orgs that did not match",
        responses=documented(*AUTH, 400, 404),
    )
    async def parity_run(
        self, cp: CP, run_id: Annotated[int, PathParameter(ge=1, le=MAX_ID)]
    ) -> ParityRunDetails:
        found = await cp.parity_run(run_id)
        if found is None:
            raise NotFound(f"no parity run {run_id}")
        run, drifts = found
        return msgspec.convert(
            {**run_api(run), "mismatching_orgs": [drift_api(d) for d in drifts]},
            ParityRunDetails,
        )

    @get(
        "/clean-since",
        summary="Since when the checker has found parity clean, without a break",
        responses=documented(*AUTH, 400),
    )
    async def parity_clean_since(self, cp: CP) -> ParityCleanSince:
        clean = await cp.parity_clean_since()
        return ParityCleanSince(
            cp.config.parity.meter, clean.since, clean.until, clean.buckets, clean.seconds
        )
