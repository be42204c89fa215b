"""`GET /v1/usage` (totals from events) and `GET /v1/ledger` (what is, or will be, billed)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, get
from litestar.params import FromQuery, QueryParameter

from controlplane.http.guards import BEARER, require_scope
from controlplane.http.params import CP, From, Limit, Org, To
from controlplane.http.problems import AUTH, documented
from controlplane.ledger import LedgerRow, RowState
from controlplane.units import format_micros


class UsageBucket(msgspec.Struct):
    org_id: str
    meter: str
    bucket_start: int
    value: str  # exact decimal


class UsageTotals(msgspec.Struct):
    rows: list[UsageBucket]


class LedgerEntry(msgspec.Struct):
    """A ledger row, with its value as an exact decimal string."""

    id: int
    identifier: str
    org_id: str
    meter: str
    bucket_start: int
    bucket_end: int
    revision: int
    quantity: int
    state: RowState
    reason: str | None
    detail: str | None
    attempts: int
    first_attempt_at: int | None
    provider_id: str | None
    created_at: int
    updated_at: int
    sent_at: int | None
    attempt_customer: str | None
    attempt_timestamp: int | None
    attempt_key: str | None
    last_attempt_at: int | None
    plan_source: str | None
    offsets_id: int | None  # an offsetting row (a rollback's): the id of the row it takes back
    value: str

    @classmethod
    def of(cls, row: LedgerRow) -> LedgerEntry:
        fields: dict[str, Any] = msgspec.structs.asdict(row)
        del fields["value_micros"]
        return cls(**fields, value=format_micros(row.value_micros))


class LedgerRows(msgspec.Struct):
    rows: list[LedgerEntry]


class UsageController(Controller):
    """Reads behind a token with the `read` scope."""

    path = "/v1"
    tags = ["usage"]
    security = BEARER
    guards = [require_scope]
    opt = {"scope": "read"}

    @get(
        "/usage",
        summary="Usage totals per bucket, from events",
        responses=documented(*AUTH, 400),
    )
    async def usage(
        self,
        cp: CP,
        org: Org = None,
        meter: FromQuery[str | None] = None,
        start: From = None,
        end: To = None,
    ) -> UsageTotals:
        rows = await cp.usage(org, meter, start, end)
        return UsageTotals(
            [
                UsageBucket(r.org_id, r.meter, r.bucket_start, format_micros(r.value_micros))
                for r in rows
            ]
        )

    @get("/ledger", summary="Ledger rows", responses=documented(*AUTH, 400))
    async def ledger(
        self,
        cp: CP,
        org: Org = None,
        row_state: Annotated[RowState | None, QueryParameter(name="state")] = None,
        start: From = None,
        end: To = None,
        limit: Limit = 1000,
    ) -> LedgerRows:
        rows = await cp.ledger(org_id=org, state=row_state, start=start, end=end, limit=limit)
        return LedgerRows([LedgerEntry.of(r) for r in rows])
