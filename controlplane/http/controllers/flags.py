"""`/v1/flags`: the flags' values and source layers, runtime changes, and their history."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, put
from litestar.params import JSONBody, PathParameter

from controlplane.errors import NotFound
from controlplane.flags import FLAGS, FlagChange, Snapshot
from controlplane.http.guards import BEARER, actor, require_scope
from controlplane.http.params import CP, Limit, Reason, strict_body
from controlplane.http.problems import AUTH, BODY, documented


class FlagPut(msgspec.Struct, forbid_unknown_fields=True):
    value: Any
    reason: Reason
    force: bool = False


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

    @put(
        "/{name:str}",
        opt={"scope": "admin"},
        summary="Set a flag's runtime value",
        responses=documented(*AUTH, *BODY, 404, 409),
        before_request=strict_body(FlagPut),
    )
    async def put_flag(
        self,
        request: Request[Any, Any, Any],
        cp: CP,
        name: Annotated[str, PathParameter(schema_extra={"enum": sorted(FLAGS)})],
        data: JSONBody[FlagPut],
    ) -> FlagValues:
        if name not in FLAGS:
            raise NotFound(f"unknown flag {name!r}; known: {sorted(FLAGS)}")
        snapshot = await cp.set_flags(
            [FlagChange(name=name, value=FLAGS[name].from_json(data.value))],
            actor=actor(request),
            reason=data.reason,
            force=data.force,
        )
        return FlagValues.of(snapshot)

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
