"""`/v1/cutover`: moving billing from the legacy biller to this control plane, and back."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from litestar import Controller, Request, get, post
from litestar.params import JSONBody

from controlplane.cutover import CutoverStatus, Plan, Preflight, RollbackResult
from controlplane.http.controllers.flags import FlagState, FlagValues
from controlplane.http.guards import BEARER, actor, require_scope
from controlplane.http.params import CP, Instant, Reason, seconds, strict_body
from controlplane.http.problems import AUTH, BODY, documented


class CutoverPlanBody(msgspec.Struct, forbid_unknown_fields=True):
    at: Instant


class CutoverPreflightBody(msgspec.Struct, forbid_unknown_fields=True):
    at: Instant | None = None


class CutoverExecuteBody(msgspec.Struct, forbid_unknown_fields=True):
    reason: Reason
    at: Instant | None = None
    force: bool = False


class CutoverRollbackBody(msgspec.Struct, forbid_unknown_fields=True):
    reason: Reason
    cancel_sent: bool = False
    # with cancel_sent: "create" credits, on its finalized invoice, usage no cancel or offset
    # can reach (and hands it back); "list" only lists it
    credit_notes: Literal["list", "create"] = "list"


BODIES = (CutoverPlanBody, CutoverPreflightBody, CutoverExecuteBody, CutoverRollbackBody)


class CutoverExecuted(msgspec.Struct):
    """The preflight it passed (or was forced past), and the flags as they now are."""

    preflight: Preflight
    flags: dict[str, FlagState]
    legacy_bill_until: int | None


class CutoverController(Controller):
    """The status needs the `read` scope; every step needs `admin`."""

    path = "/v1/cutover"
    tags = ["cutover"]
    security = BEARER
    guards = [require_scope]
    opt = {"scope": "admin"}

    @get(opt={"scope": "read"}, summary="Cutover stage and history", responses=documented(*AUTH))
    async def cutover_status(self, cp: CP) -> CutoverStatus:
        return await cp.cutover.status()

    @post(
        "/plan",
        status_code=200,
        summary="Who bills which buckets before and after a cutover at T; changes nothing",
        responses=documented(*AUTH, *BODY, 409),
        before_request=strict_body(CutoverPlanBody),
    )
    async def cutover_plan(self, cp: CP, data: JSONBody[CutoverPlanBody]) -> Plan:
        return await cp.cutover.plan(seconds(data.at, "at"))

    @post(
        "/preflight",
        status_code=200,
        summary="Every cutover precondition with pass/fail and detail",
        responses=documented(*AUTH, *BODY, 409),
        before_request=strict_body(CutoverPreflightBody),
    )
    async def cutover_preflight(self, cp: CP, data: JSONBody[CutoverPreflightBody]) -> Preflight:
        return await cp.cutover.preflight(seconds(data.at, "at"))

    @post(
        "/execute",
        status_code=200,
        summary="Re-run preflight, then set authority, bill_from and shadow in one transaction",
        responses=documented(*AUTH, *BODY, 409),
        before_request=strict_body(CutoverExecuteBody),
    )
    async def cutover_execute(
        self, request: Request[Any, Any, Any], cp: CP, data: JSONBody[CutoverExecuteBody]
    ) -> CutoverExecuted:
        report, snapshot = await cp.cutover.execute(
            seconds(data.at, "at"), actor=actor(request), reason=data.reason, force=data.force
        )
        flags = FlagValues.of(snapshot)
        return CutoverExecuted(report, flags.flags, flags.legacy_bill_until)

    @post(
        "/rollback",
        status_code=200,
        summary="Authority back to legacy, shadow on; optionally cancel recent sends",
        responses=documented(*AUTH, *BODY, 409),
        before_request=strict_body(CutoverRollbackBody),
    )
    async def cutover_rollback(
        self, request: Request[Any, Any, Any], cp: CP, data: JSONBody[CutoverRollbackBody]
    ) -> RollbackResult:
        return await cp.cutover.rollback(
            actor=actor(request),
            reason=data.reason,
            cancel_sent=data.cancel_sent,
            create_credit_notes=data.credit_notes == "create",
        )
