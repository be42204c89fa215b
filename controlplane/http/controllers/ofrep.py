"""OpenFeature remote evaluation (OFREP) of the flags (see :mod:`controlplane.ofrep`).

OFREP answers its own errors (`{key, errorCode, errorDetails}`), not problem+json ones."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, post
from litestar.openapi import ResponseSpec
from litestar.params import PathParameter

from controlplane import ofrep
from controlplane.core import ControlPlane
from controlplane.errors import InvalidInput, Undecodable
from controlplane.events import scan_json
from controlplane.http.guards import BEARER, require_scope
from controlplane.http.openapi import OfrepOperation
from controlplane.http.params import CP
from controlplane.http.problems import AUTH, documented


class OfrepMetadata(msgspec.Struct):
    source: str  # the flag's source layer, or "derived"
    version: int


class OfrepEvaluation(msgspec.Struct, kw_only=True):
    """A flag without a value (reason DISABLED) has no `value`: the SDK uses its default."""

    key: str
    value: Any = msgspec.UNSET  # absent, not null, when the flag has no value
    reason: str  # STATIC, DISABLED, or TARGETING_MATCH (per org)
    variant: str
    metadata: OfrepMetadata


class OfrepBulk(msgspec.Struct):
    flags: list[OfrepEvaluation]


class OfrepErrorBody(msgspec.Struct):
    key: str | None
    errorCode: str  # OFREP's own field names
    errorDetails: str


def _ofrep_documented(*statuses: int) -> dict[int, ResponseSpec]:
    out = documented(*statuses)
    for status, description in (
        (400, "Invalid context or JSON; no org for the per-org flag"),
        (404, "Unknown flag key"),
    ):
        out[status] = ResponseSpec(
            data_container=OfrepErrorBody, description=description, generate_examples=False
        )
    return out


def _ofrep_check(body: bytes, key: str | None = None) -> None:
    """OFREP's own checks, after the depth every JSON body is held to (as PARSE_ERROR)."""
    try:
        scan_json(body)
    except Undecodable as exc:
        details = {"key": key, "errorCode": "PARSE_ERROR", "errorDetails": exc.message}
        raise ofrep.OfrepError(400, details) from None
    ofrep.check_request(body, key)


def _error(exc: ofrep.OfrepError) -> Response[Any]:
    return Response(exc.body, status_code=exc.status)


async def _per_org(cp: ControlPlane, body: bytes, key: str | None = None) -> dict[str, Any] | None:
    """The per-org flag for the context's org (None without one); the window's problems are
    an INVALID_CONTEXT answer."""
    query = ofrep.org_query(body, cp.config.rollup.bucket_seconds, key)
    if query.org is None:
        return None
    try:
        seam = await cp.cutover.seam(query.start, query.end, query.org)
    except InvalidInput as exc:
        details = "; ".join(f"context.{p.field}: {p.message}" for p in exc.problems)
        error = {"key": key, "errorCode": "INVALID_CONTEXT", "errorDetails": details}
        raise ofrep.OfrepError(400, error) from None
    ranges = [(r.start, r.end) for r in seam.ranges_of(query.org)]
    return ofrep.evaluate_ranges(query.org, seam.legacy_bill_until, ranges)


class OfrepController(Controller):
    """Evaluation needs a token with the `read` scope."""

    path = "/ofrep/v1/evaluate/flags"
    tags = ["ofrep"]
    security = BEARER
    guards = [require_scope]
    opt = {"scope": "read"}

    @post(
        "/{key:str}",
        status_code=200,
        summary="OFREP: evaluate one flag (controlplane_billed_ranges: per org, from the context)",
        responses=_ofrep_documented(*AUTH, 400, 404, 413),
        operation_class=OfrepOperation,
    )
    async def ofrep_flag(
        self,
        request: Request[Any, Any, Any],
        cp: CP,
        key: Annotated[str, PathParameter(schema_extra={"enum": list(ofrep.KEYS)})],
    ) -> Response[OfrepEvaluation]:
        try:
            body = await request.body()
            _ofrep_check(body, key)
            if key == ofrep.ORG_KEY:
                evaluation = await _per_org(cp, body, key)
                if evaluation is None:
                    raise ofrep.missing_org(key)
            else:
                evaluation = ofrep.evaluate(await cp.flags(), key)
        except ofrep.OfrepError as exc:
            return _error(exc)
        return Response(msgspec.convert(evaluation, OfrepEvaluation), status_code=200)

    @post(
        status_code=200,
        summary="OFREP: evaluate every flag (ETag, If-None-Match); the per-org one with an org",
        responses={
            **_ofrep_documented(*AUTH, 400, 413),
            304: ResponseSpec(None, description="Not modified: the ETag matches If-None-Match"),
        },
        operation_class=OfrepOperation,
    )
    async def ofrep_flags(self, request: Request[Any, Any, Any], cp: CP) -> Response[OfrepBulk]:
        try:
            raw = await request.body()
            _ofrep_check(raw)
            per_org = await _per_org(cp, raw)
        except ofrep.OfrepError as exc:
            return _error(exc)
        body, etag = ofrep.bulk(await cp.flags(), per_org)
        if request.headers.get("if-none-match") == etag:
            not_modified: Response[Any] = Response(None, status_code=304, headers={"ETag": etag})
            return not_modified
        return Response(msgspec.convert(body, OfrepBulk), status_code=200, headers={"ETag": etag})
