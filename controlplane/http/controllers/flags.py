"""`/v1/flags`: the flags' values and source layers, runtime changes, and their history."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from litestar import Controller, Request, get, put
from litestar.params import JSONBody

from controlplane.flags import FlagChange, Snapshot
from controlplane.http.guards import BEARER, actor, require_scope
from controlplane.http.params import CP, Instant, Limit, Reason, seconds, strict_body
from controlplane.http.problems import AUTH, BODY, documented


class ShadowPut(msgspec.Struct, forbid_unknown_fields=True):
    value: bool
    reason: Reason
    force: bool = False


class BillFromPut(msgspec.Struct, forbid_unknown_fields=True):
    value: Instant | None
    reason: Reason
    force: bool = False


class AuthorityPut(msgspec.Struct, forbid_unknown_fields=True):
    value: Literal["legacy", "controlplane", "cell", "edge"]  # cell, edge: aliases
    reason: Reason
    force: bool = False


FLAG_BODIES: dict[str, type[msgspec.Struct]] = {
    "shadow": ShadowPut,
    "bill_from": BillFromPut,
    "authority": AuthorityPut,
}


class FlagState(msgspec.Struct):
    value: Any
    source: str  # default, config, env or runtime: the layer the value comes from
    version: int  # runtime version; 0 when never set at runtime


class FlagValues(msgspec.Struct):
    """Every flag, and until when the legacy biller bills (derived from them)."""

    flags: dict[str, FlagState]
    legacy_bill_until: int | None

    @classmethod
    def of(cls, snapshot: Snapshot) -> FlagValues:
        return msgspec.convert(snapshot.to_api(), cls)


class FlagChangeEntry(msgspec.Struct):
    id: int
    at: int
    flag: str
    before: Any
    after: Any
    actor: str
    reason: str | None
    forced: bool
    group_id: str | None


class FlagHistory(msgspec.Struct):
    entries: list[FlagChangeEntry]


class FlagsController(Controller):
    """Reads need the `read` scope; a change needs `admin`."""

    path = "/v1/flags"
    tags = ["flags"]
    security = BEARER
    guards = [require_scope]
    opt = {"scope": "read"}

    @get(summary="Flag values, their source layer and version", responses=documented(*AUTH))
    async def get_flags(self, cp: CP) -> FlagValues:
        return FlagValues.of(await cp.flags())

    async def _set(self, request: Request[Any, Any, Any], cp: CP, name: str, body: Any) -> Any:
        snapshot = await cp.set_flags(
            [FlagChange(name=name, value=body.value)],
            actor=actor(request),
            reason=body.reason,
            force=body.force,
        )
        return FlagValues.of(snapshot)

    @put(
        "/shadow",
        opt={"scope": "admin"},
        summary="Set shadow: true computes everything and sends nothing",
        responses=documented(*AUTH, *BODY, 409),
        before_request=strict_body(ShadowPut),
    )
    async def put_shadow(
        self, request: Request[Any, Any, Any], cp: CP, data: JSONBody[ShadowPut]
    ) -> FlagValues:
        return await self._set(request, cp, "shadow", data)  # type: ignore[no-any-return]

    @put(
        "/bill_from",
        opt={"scope": "admin"},
        summary="Set bill_from, the boundary T (unix seconds or RFC 3339; null unsets it)",
        responses=documented(*AUTH, *BODY, 409),
        before_request=strict_body(BillFromPut),
    )
    async def put_bill_from(
        self, request: Request[Any, Any, Any], cp: CP, data: JSONBody[BillFromPut]
    ) -> FlagValues:
        at = BillFromPut(seconds(data.value, "value"), data.reason, data.force)
        return await self._set(request, cp, "bill_from", at)  # type: ignore[no-any-return]

    @put(
        "/authority",
        opt={"scope": "admin"},
        summary="Set authority: who bills, legacy or controlplane",
        responses=documented(*AUTH, *BODY, 409),
        before_request=strict_body(AuthorityPut),
    )
    async def put_authority(
        self, request: Request[Any, Any, Any], cp: CP, data: JSONBody[AuthorityPut]
    ) -> FlagValues:
        return await self._set(request, cp, "authority", data)  # type: ignore[no-any-return]

    @get(
        "/audit",
        summary="Flag change history, newest first",
        responses=documented(*AUTH, 400),
    )
    async def flag_audit(self, cp: CP, limit: Limit = 100) -> FlagHistory:
        records = await cp.audit_entries("flag.", limit=limit)
        return FlagHistory(
            [
                FlagChangeEntry(
                    id=r.id,
                    at=r.at,
                    flag=r.subject,
                    before=r.before,
                    after=r.after,
                    actor=r.actor,
                    reason=r.reason,
                    forced=r.forced,
                    group_id=r.group_id,
                )
                for r in records
            ]
        )
