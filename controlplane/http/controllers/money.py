"""Money parity: what each biller would invoice per org and billing period
(`/internal/money-parity`, also for signed requests), and the stored runs
(`/v1/parity/money-runs`)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, get
from litestar.params import FromQuery, PathParameter, QueryParameter

from controlplane.errors import NotFound
from controlplane.http.guards import BEARER, any_scope, parity_auth
from controlplane.http.params import CP, MAX_ID, From, Limit, To
from controlplane.http.problems import AUTH, documented
from controlplane.money import PERIOD_PATTERN, comparison_api, period_of, run_api

# the answers: amounts are integers in the currency's minor unit (cents) -----------------------


class StripeNumbers(msgspec.Struct):
    subscription: str
    period_start: int
    period_end: int
    subtotal_minor: int
    total_minor: int
    computed_subtotal_minor: int  # the control plane's pricing of Stripe's period
    drift_minor: int  # computed - Stripe's, before credits
    finding: bool


class ComputedLine(msgspec.Struct):
    price: str
    meter: str | None
    quantity: int
    unit_amount_decimal: str
    amount_minor: int
    credit_minor: int


class LegacyLine(msgspec.Struct):
    description: str
    amount_minor: int


class StripeLine(msgspec.Struct):
    price: str
    quantity: int
    amount_minor: int
    credit_minor: int


class MoneyLines(msgspec.Struct):
    controlplane: list[ComputedLine]
    controlplane_credit_minor: int
    legacy: list[LegacyLine] | None  # None: the legacy biller gave no lines
    stripe: list[StripeLine] | None


class OrgMoney(msgspec.Struct):
    org_id: str
    side: str  # both, controlplane or legacy
    controlplane_minor: int | None
    legacy_minor: int | None
    drift_minor: int | None  # None: no legacy invoices to compare with
    drift_percent: str | None  # None: undefined (nothing on the legacy side) or no legacy
    within_tolerance: bool | None
    stripe: StripeNumbers | None
    lines: MoneyLines | None = None


class MoneyTotals(msgspec.Struct):
    controlplane_minor: int
    legacy_minor: int | None
    drift_minor: int | None
    drift_percent: str | None


class MoneySummary(msgspec.Struct):
    status: str  # clean, mismatch or no_legacy
    orgs: int
    mismatches: int
    only_controlplane: int
    only_legacy: int
    stripe_findings: int
    totals: MoneyTotals


class MoneyComparison(msgspec.Struct):
    start: int = msgspec.field(name="from")
    end: int = msgspec.field(name="to")
    currency: str
    tolerance: str
    catalog_version: int | None  # None: the configured, unpublished catalog
    run_id: int | None
    summary: MoneySummary
    notes: list[str]
    orgs: list[OrgMoney]


class MoneyRunSummary(msgspec.Struct):
    id: int
    start: int = msgspec.field(name="from")
    end: int = msgspec.field(name="to")
    checked_at: int
    currency: str
    tolerance: str
    status: str  # clean, mismatch or no_legacy
    orgs: int
    mismatches: int
    only_controlplane: int
    only_legacy: int
    stripe_findings: int
    controlplane_minor: int
    legacy_minor: int | None


class MoneyRunOrg(msgspec.Struct):
    org_id: str
    controlplane_minor: int | None
    legacy_minor: int | None
    stripe_minor: int | None
    within_tolerance: bool


class MoneyRunDetails(MoneyRunSummary):
    org_results: list[MoneyRunOrg]


class MoneyRuns(msgspec.Struct):
    runs: list[MoneyRunSummary]


# the handlers ----------------------------------------------------------------------------


class MoneyParityController(Controller):
    """The same auth as `/internal/usage-parity`: a bearer token with the `parity` scope, or
    X-Timestamp and X-Signature (HMAC-SHA256 with `parity.hmac_secret`)."""

    path = "/internal/money-parity"
    tags = ["parity"]
    guards = [parity_auth]

    @get(
        summary="Per-org invoice amounts for a billing period: control plane, legacy, Stripe",
        responses=documented(*AUTH, 400, 422),
    )
    async def money_parity(
        self,
        cp: CP,
        period: Annotated[
            str | None,
            QueryParameter(description="YYYY-MM (UTC month)", pattern=PERIOD_PATTERN),
        ] = None,
        start: From = None,
        end: To = None,
        lines: FromQuery[bool] = False,
    ) -> MoneyComparison:
        """`period` (YYYY-MM) or `from` and `to` (unix seconds on bucket boundaries); a
        malformed `period` is 400, a period the app cannot take (both forms, a misaligned or
        empty window) 422, each naming the field. Every
        call is stored as a run. Amounts are integers in the currency's minor unit. Taxes,
        discounts and proration are out of scope."""
        first, last = period_of(period, start, end, cp.config.rollup.bucket_seconds)
        comparison, run_id = await cp.money_parity.check(first, last)
        return msgspec.convert(
            comparison_api(comparison, lines=lines, run_id=run_id), MoneyComparison
        )


class MoneyRunsController(Controller):
    """Stored money parity runs, for a token with the `read` or the `parity` scope."""

    path = "/v1/parity/money-runs"
    tags = ["parity"]
    security = BEARER
    guards = [any_scope]
    opt = {"scopes": ("read", "parity")}

    @get(summary="Money parity runs, newest period first", responses=documented(*AUTH, 400))
    async def money_runs(self, cp: CP, limit: Limit = 100) -> MoneyRuns:
        runs = await cp.money_parity.runs(limit)
        return MoneyRuns(msgspec.convert([run_api(r) for r in runs], list[MoneyRunSummary]))

    @get(
        "/{run_id:int}",
        summary="One money parity run with every org's amounts",
        responses=documented(*AUTH, 400, 404),
    )
    async def money_run(
        self, cp: CP, run_id: Annotated[int, PathParameter(ge=1, le=MAX_ID)]
    ) -> MoneyRunDetails:
        found = await cp.money_parity.run(run_id)
        if found is None:
            raise NotFound(f"no money parity run {run_id}")
        run, orgs = found
        return msgspec.convert(
            {**run_api(run), "org_results": msgspec.to_builtins(orgs)}, MoneyRunDetails
        )
