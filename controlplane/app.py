"""The HTTP API (litestar): a thin shell over :class:`controlplane.core.ControlPlane`.

Errors are ``application/problem+json`` with `status`, `title`, `detail` and, for invalid
input, `errors` listing each bad field (and event index). OpenAPI is served at ``/schema``.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
import structlog
from litestar import Litestar, Request, Response, get, post, put
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.types import ASGIApp, Receive, Scope, Send

from controlplane import __version__, cutover, ofrep
from controlplane.auth import Forbidden, Principal, TokenStore, Unauthorized
from controlplane.catalog import catalog_api
from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.errors import (
    ConfigError,
    ControlPlaneError,
    FlagRefused,
    InvalidInput,
    NotFound,
    Problem,
    StorageError,
)
from controlplane.events import decode_body
from controlplane.ledger import RowState
from controlplane.parity import (
    CleanSince,
    comparison_api,
    drift_api,
    run_api,
    verify_signature,
    window_problems,
)
from controlplane.secrets import reveal
from controlplane.units import format_micros
from controlplane.webhooks import WebhookRejected
from flags import FLAGS, FlagChange

log = structlog.get_logger("api")
CP = NamedDependency[ControlPlane]
PROBLEM = "application/problem+json"


# errors -----------------------------------------------------------------------------------


def problem(status: int, title: str, detail: str, **extra: Any) -> Response[Any]:
    return Response(
        content={
            "type": "about:blank",
            "status": status,
            "title": title,
            "detail": detail,
            **extra,
        },
        status_code=status,
        media_type=PROBLEM,
        headers={"WWW-Authenticate": "Bearer"} if status == 401 else None,
    )


def _problems(problems: list[Problem]) -> list[dict[str, Any]]:
    return [{k: v for k, v in msgspec.structs.asdict(p).items() if v is not None} for p in problems]


def _on_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if isinstance(exc, InvalidInput):
        return problem(422, "Invalid input", exc.message, errors=_problems(exc.problems))
    if isinstance(exc, Unauthorized):
        return problem(401, "Unauthorized", str(exc))
    if isinstance(exc, Forbidden):
        return problem(403, "Forbidden", str(exc))
    if isinstance(exc, NotFound):
        return problem(404, "Not found", exc.message)
    if isinstance(exc, FlagRefused):
        return problem(409, "Refused", exc.message, rule=exc.rule)
    if isinstance(exc, ValidationException):
        errors = [
            {"field": e.get("key", ""), "message": e.get("message", ""), "in": e.get("source", "")}
            for e in (exc.extra if isinstance(exc.extra, list) else [])
        ]
        return problem(400, "Bad request", exc.detail, errors=errors)
    if isinstance(exc, HTTPException):
        return problem(exc.status_code, "Request refused", exc.detail)
    if isinstance(exc, StorageError | ConfigError | ControlPlaneError):
        log.error("api.error", error=str(exc), kind=type(exc).__name__)
        return problem(503, "Unavailable", str(exc))
    log.exception("api.unexpected", error=str(exc))
    return problem(500, "Internal error", "unexpected error; see the server log")


# auth -------------------------------------------------------------------------------------


def require_scope(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    scope = handler.opt["scope"]
    tokens: TokenStore = connection.app.state.tokens
    connection.state.principal = tokens.authorize(connection.headers.get("authorization"), scope)


def _actor(request: Request[Any, Any, Any]) -> str:
    principal: Principal = request.state.principal
    return principal.name


async def _cp(state: State) -> ControlPlane:
    cp: ControlPlane = state.cp
    return cp


# request id and access log ---------------------------------------------------------------


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        rid = headers.get(b"x-request-id", b"").decode()[:64] or uuid.uuid4().hex
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=rid):
            await app(scope, receive, send_with_id)
            log.info(
                "http.request",
                method=scope.get("method"),
                path=scope["path"],
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 1),
            )

    return middleware


# handlers ---------------------------------------------------------------------------------

Org = FromQuery[str | None]
From = Annotated[int | None, QueryParameter(name="from", ge=0)]
To = Annotated[int | None, QueryParameter(name="to", ge=0)]
Limit = Annotated[int, QueryParameter(ge=1, le=10_000)]


@post("/v1/events", opt={"scope": "ingest"}, status_code=200, summary="Ingest usage events")
async def ingest_events(request: Request[Any, Any, Any], cp: CP) -> dict[str, int]:
    """Accepts a JSON object, a JSON array, NDJSON or a CloudEvents batch. All or nothing;
    answers after commit with the accepted and duplicate counts."""
    limit = cp.config.server.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(status_code=413, detail=f"body over {limit} bytes")
    body = await request.body()
    if len(body) > limit:
        raise HTTPException(status_code=413, detail=f"body over {limit} bytes")
    items = decode_body(body, request.headers.get("content-type", "application/json"))
    if len(items) > cp.config.server.max_batch_events:
        raise HTTPException(
            status_code=413,
            detail=f"{len(items)} events; at most {cp.config.server.max_batch_events} per batch",
        )
    result = await cp.ingest(items, "http")
    return {"accepted": result.accepted, "duplicates": result.duplicates}


@get("/v1/usage", opt={"scope": "read"}, summary="Usage totals per bucket, from events")
async def usage(
    cp: CP,
    org: Org = None,
    meter: FromQuery[str | None] = None,
    start: From = None,
    end: To = None,
) -> dict[str, Any]:
    rows = await cp.storage.usage(org, meter, start, end)
    return {
        "rows": [
            {
                "org_id": r.org_id,
                "meter": r.meter,
                "bucket_start": r.bucket_start,
                "value": format_micros(r.value_micros),
            }
            for r in rows
        ]
    }


@get("/v1/ledger", opt={"scope": "read"}, summary="Ledger rows")
async def ledger(
    cp: CP,
    org: Org = None,
    row_state: Annotated[RowState | None, QueryParameter(name="state")] = None,
    start: From = None,
    end: To = None,
    limit: Limit = 1000,
) -> dict[str, Any]:
    rows = await cp.storage.ledger(org_id=org, state=row_state, start=start, end=end, limit=limit)
    return {"rows": [r.to_api() for r in rows]}


@get("/v1/flags", opt={"scope": "read"}, summary="Flag values, their source layer and version")
async def get_flags(cp: CP) -> dict[str, Any]:
    return (await cp.flags()).to_api()


class FlagPut(msgspec.Struct, forbid_unknown_fields=True):
    value: Any
    reason: str
    force: bool = False


@put("/v1/flags/{name:str}", opt={"scope": "admin"}, summary="Set a flag's runtime value")
async def put_flag(
    request: Request[Any, Any, Any], cp: CP, name: FromPath[str], data: JSONBody[FlagPut]
) -> dict[str, Any]:
    if name not in FLAGS:
        raise NotFound(f"unknown flag {name!r}; known: {sorted(FLAGS)}")
    snapshot = await cp.set_flags(
        [FlagChange(name=name, value=data.value)],
        actor=_actor(request),
        reason=data.reason,
        force=data.force,
    )
    return snapshot.to_api()


@get("/v1/flags/audit", opt={"scope": "read"}, summary="Flag change history, newest first")
async def flag_audit(cp: CP, limit: Limit = 100) -> dict[str, Any]:
    records = await cp.storage.audit_log(action_prefix="flag.", limit=limit)
    return {
        "entries": [
            {
                "id": r.id,
                "at": r.at,
                "flag": r.subject,
                "before": r.before,
                "after": r.after,
                "actor": r.actor,
                "reason": r.reason,
                "forced": r.forced,
                "group_id": r.group_id,
            }
            for r in records
        ]
    }


class OrgPut(msgspec.Struct, forbid_unknown_fields=True):
    customer: str | None = None
    plan: str | None = None
    effective_from: int | None = None
    reason: str | None = None


def _org_api(org: Any) -> dict[str, Any]:
    return {
        "org_id": org.org_id,
        "customer": org.customer,
        "plan": org.plans[-1].plan if org.plans else None,
        "plans": [{"plan": p.plan, "effective_from": p.effective_from} for p in org.plans],
        "updated_at": org.updated_at,
        "subscription": org.subscription,
        "subscription_status": org.subscription_status,
    }


@put("/v1/orgs/{org_id:str}", opt={"scope": "admin"}, summary="Set an org's customer or plan")
async def put_org(
    request: Request[Any, Any, Any], cp: CP, org_id: FromPath[str], data: JSONBody[OrgPut]
) -> dict[str, Any]:
    org = await cp.set_org(
        org_id,
        customer=data.customer,
        plan=data.plan,
        actor=_actor(request),
        effective_from=data.effective_from,
        reason=data.reason,
    )
    return _org_api(org)


@get("/v1/orgs/{org_id:str}", opt={"scope": "read"}, summary="An org's customer and plan history")
async def get_org(cp: CP, org_id: FromPath[str]) -> dict[str, Any]:
    org = await cp.storage.get_org(org_id)
    if org is None:
        raise NotFound(f"no org {org_id!r}")
    return _org_api(org)


@get("/v1/jobs", opt={"scope": "read"}, summary="Recent job runs, newest first")
async def job_runs(
    cp: CP,
    job: FromQuery[str | None] = None,
    limit: Limit = 50,
) -> dict[str, Any]:
    return {"runs": [msgspec.to_builtins(r) for r in await cp.storage.job_runs(job, limit)]}


@get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", summary="Readiness: storage reachable, migrations current")
async def readyz(cp: CP) -> Response[dict[str, Any]]:
    checks: dict[str, Any] = {}
    ok = True
    try:
        await cp.storage.ping()
        checks["storage"] = "ok"
        status = await cp.storage.migration_status()
        checks["migrations"] = "ok" if status.current else f"pending: {status.pending}"
        ok = status.current
    except ControlPlaneError as exc:
        checks["storage"] = f"failed: {exc}"
        ok = False
    return Response(
        {"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503
    )


# parity -----------------------------------------------------------------------------------


def parity_auth(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """A bearer token with the `parity` scope, or a request signed with `parity.hmac_secret`
    (X-Timestamp, X-Signature; see :mod:`controlplane.parity`)."""
    headers = connection.headers
    if "x-signature" not in headers and "x-timestamp" not in headers:
        tokens: TokenStore = connection.app.state.tokens
        connection.state.principal = tokens.authorize(headers.get("authorization"), "parity")
        return
    cp: ControlPlane = connection.app.state.cp
    secret = cp.config.parity.hmac_secret
    if secret is None:
        raise Unauthorized("signed requests are not enabled (parity.hmac_secret); use a token")
    verify_signature(
        reveal(secret, "parity.hmac_secret"),
        headers.get("x-timestamp"),
        headers.get("x-signature"),
        connection.scope["path"],
        connection.scope.get("query_string", b"").decode("latin-1"),
        cp.clock(),
    )
    connection.state.principal = Principal(name="hmac", scopes=frozenset({"parity"}))


def any_scope(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """A bearer token with at least one of the handler's `opt["scopes"]`."""
    tokens: TokenStore = connection.app.state.tokens
    principal = tokens.authenticate(connection.headers.get("authorization"))
    scopes: tuple[str, ...] = handler.opt["scopes"]
    if not principal.scopes & set(scopes):
        raise Forbidden(f"token {principal.name!r} needs one of the scopes {list(scopes)}")
    connection.state.principal = principal


PARITY_READ = {"scopes": ("read", "parity")}


@get(
    "/internal/usage-parity",
    guards=[parity_auth],
    summary="Per-org usage of the parity meter: control plane (from events) against legacy",
)
async def usage_parity(
    cp: CP,
    start_text: Annotated[str | None, QueryParameter(name="from")] = None,
    end_text: Annotated[str | None, QueryParameter(name="to")] = None,
    mismatches_only: FromQuery[bool] = False,
) -> dict[str, Any]:
    """`from` and `to` are unix seconds on bucket boundaries. Auth: a bearer token with the
    `parity` scope, or X-Timestamp and X-Signature (HMAC-SHA256)."""
    start, end = _seconds(start_text), _seconds(end_text)
    problems = [
        Problem(field=name, message=f"{text!r} is not unix seconds")
        for name, text, value in (("from", start_text, start), ("to", end_text, end))
        if text is not None and value is None
    ] or window_problems(start, end, cp.config.rollup.bucket_seconds)
    if problems or start is None or end is None:
        raise ValidationException(
            detail="; ".join(f"{p.field}: {p.message}" for p in problems),
            extra=[{"key": p.field, "message": p.message, "source": "query"} for p in problems],
        )
    comparison = await cp.parity(start, end)
    return comparison_api(comparison, mismatches_only=mismatches_only)


def _seconds(text: str | None) -> int | None:
    if text is None or not text.strip().lstrip("-").isdigit():
        return None
    return int(text)


def _clean_api(clean: CleanSince) -> dict[str, Any]:
    return {
        "since": clean.since,
        "until": clean.until,
        "buckets": clean.buckets,
        "seconds": clean.seconds,
    }


@get(
    "/v1/parity/runs",
    guards=[any_scope],
    opt=PARITY_READ,
    summary="The parity checker's runs, newest bucket first, and since when parity is clean",
)
async def parity_runs(
    cp: CP, start: From = None, end: To = None, limit: Limit = 100
) -> dict[str, Any]:
    meter = cp.config.parity.meter
    runs = await cp.storage.parity_runs(meter, limit=limit, start=start, end=end)
    return {
        "meter": meter,
        "clean": _clean_api(await cp.parity_clean_since()),
        "runs": [run_api(r) for r in runs],
    }


@get(
    "/v1/parity/runs/{run_id:int}",
    guards=[any_scope],
    opt=PARITY_READ,
    summary="One parity run with the orgs that did not match",
)
async def parity_run(cp: CP, run_id: FromPath[int]) -> dict[str, Any]:
    found = await cp.storage.parity_run(run_id)
    if found is None:
        raise NotFound(f"no parity run {run_id}")
    run, drifts = found
    return {**run_api(run), "mismatching_orgs": [drift_api(d) for d in drifts]}


@get(
    "/v1/parity/clean-since",
    guards=[any_scope],
    opt=PARITY_READ,
    summary="Since when the checker has found parity clean, without a break",
)
async def parity_clean_since(cp: CP) -> dict[str, Any]:
    return {"meter": cp.config.parity.meter, **_clean_api(await cp.parity_clean_since())}


# catalog and Stripe webhooks --------------------------------------------------------------


@get("/v1/catalog", opt={"scope": "read"}, summary="The newest published price catalog")
async def get_catalog(cp: CP, version: FromQuery[int | None] = None) -> dict[str, Any]:
    found = await cp.storage.catalog_version(version)
    if found is None and version is not None:
        raise NotFound(f"no catalog version {version}")
    return catalog_api(found)


@post("/webhooks/stripe", status_code=200, summary="Stripe webhook events (signed)")
async def stripe_webhook(request: Request[Any, Any, Any], cp: CP) -> Response[Any]:
    """Authenticated by the `Stripe-Signature` header (HMAC-SHA256 over the raw body with
    `stripe.webhook_secret`, 300 s tolerance): 400 when it does not verify, nothing done."""
    body = await request.body()
    try:
        result = await cp.stripe_webhook(body, request.headers.get("stripe-signature"))
    except WebhookRejected as exc:
        log.warning("webhook.rejected", error=exc.message)
        return problem(400, "Bad signature", exc.message)
    return Response(
        {
            "received": True,
            "event": result.event_id,
            "type": result.type,
            "duplicate": result.duplicate,
            "outcome": result.outcome,
        },
        status_code=200,
    )


# cutover ----------------------------------------------------------------------------------


class CutoverPlanBody(msgspec.Struct, forbid_unknown_fields=True):
    at: int


class CutoverPreflightBody(msgspec.Struct, forbid_unknown_fields=True):
    at: int | None = None


class CutoverExecuteBody(msgspec.Struct, forbid_unknown_fields=True):
    reason: str
    at: int | None = None
    force: bool = False


class CutoverRollbackBody(msgspec.Struct, forbid_unknown_fields=True):
    reason: str
    cancel_sent: bool = False


@get("/v1/cutover", opt={"scope": "read"}, summary="Cutover stage and history")
async def cutover_status(cp: CP) -> dict[str, Any]:
    return msgspec.to_builtins(await cutover.status(cp))  # type: ignore[no-any-return]


@post(
    "/v1/cutover/plan",
    opt={"scope": "admin"},
    status_code=200,
    summary="Who bills which buckets before and after a cutover at T; changes nothing",
)
async def cutover_plan(cp: CP, data: JSONBody[CutoverPlanBody]) -> dict[str, Any]:
    return msgspec.to_builtins(await cutover.plan(cp, data.at))  # type: ignore[no-any-return]


@post(
    "/v1/cutover/preflight",
    opt={"scope": "admin"},
    status_code=200,
    summary="Every cutover precondition with pass/fail and detail",
)
async def cutover_preflight(cp: CP, data: JSONBody[CutoverPreflightBody]) -> dict[str, Any]:
    report = await cutover.preflight(cp, data.at)
    return msgspec.to_builtins(report)  # type: ignore[no-any-return]


@post(
    "/v1/cutover/execute",
    opt={"scope": "admin"},
    status_code=200,
    summary="Re-run preflight, then set authority, bill_from and shadow in one transaction",
)
async def cutover_execute(
    request: Request[Any, Any, Any], cp: CP, data: JSONBody[CutoverExecuteBody]
) -> dict[str, Any]:
    report, snapshot = await cutover.execute(
        cp, data.at, actor=_actor(request), reason=data.reason, force=data.force
    )
    return {"preflight": msgspec.to_builtins(report), **snapshot.to_api()}


@post(
    "/v1/cutover/rollback",
    opt={"scope": "admin"},
    status_code=200,
    summary="Authority back to legacy, shadow on; optionally cancel recent sends",
)
async def cutover_rollback(
    request: Request[Any, Any, Any], cp: CP, data: JSONBody[CutoverRollbackBody]
) -> dict[str, Any]:
    result = await cutover.rollback(
        cp, actor=_actor(request), reason=data.reason, cancel_sent=data.cancel_sent
    )
    return msgspec.to_builtins(result)  # type: ignore[no-any-return]


# OpenFeature remote evaluation (OFREP) ----------------------------------------------------


@post(
    "/ofrep/v1/evaluate/flags/{key:str}",
    opt={"scope": "read"},
    status_code=200,
    summary="OFREP: evaluate one flag",
)
async def ofrep_flag(request: Request[Any, Any, Any], cp: CP, key: FromPath[str]) -> Response[Any]:
    try:
        ofrep.check_request(await request.body(), key)
        return Response(ofrep.evaluate(await cp.flags(), key), status_code=200)
    except ofrep.OfrepError as exc:
        return Response(exc.body, status_code=exc.status)


@post(
    "/ofrep/v1/evaluate/flags",
    opt={"scope": "read"},
    status_code=200,
    summary="OFREP: evaluate every flag (ETag, If-None-Match)",
)
async def ofrep_flags(request: Request[Any, Any, Any], cp: CP) -> Response[Any]:
    try:
        ofrep.check_request(await request.body())
    except ofrep.OfrepError as exc:
        return Response(exc.body, status_code=exc.status)
    body, etag = ofrep.bulk(await cp.flags())
    if request.headers.get("if-none-match") == etag:
        return Response(None, status_code=304, headers={"ETag": etag})
    return Response(body, status_code=200, headers={"ETag": etag})


# app --------------------------------------------------------------------------------------


def create_app(
    config: Config, *, cp: ControlPlane | None = None, scheduler: bool = False
) -> Litestar:
    """The litestar app. Starts (and closes) the control plane in its lifespan; with
    `scheduler`, also runs the rollup and sender jobs on their intervals."""
    plane = cp or ControlPlane(config, migrate=config.server.migrate_on_start)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with plane:
            app.state.cp = plane
            if scheduler:
                from controlplane.scheduler import Jobs

                jobs = Jobs(plane)
                jobs.start()
                try:
                    yield
                finally:
                    jobs.stop()
            else:
                yield

    return Litestar(
        route_handlers=[
            ingest_events,
            usage,
            ledger,
            get_flags,
            put_flag,
            flag_audit,
            put_org,
            get_org,
            job_runs,
            healthz,
            readyz,
            usage_parity,
            parity_runs,
            parity_run,
            parity_clean_since,
            get_catalog,
            stripe_webhook,
            cutover_status,
            cutover_plan,
            cutover_preflight,
            cutover_execute,
            cutover_rollback,
            ofrep_flag,
            ofrep_flags,
        ],
        dependencies={"cp": Provide(_cp)},
        guards=[_guard],
        lifespan=[lifespan],
        exception_handlers={Exception: _on_error},
        middleware=[request_id_middleware],
        request_max_body_size=config.server.max_body_bytes,
        state=State({"tokens": TokenStore(config.auth)}),
        openapi_config=OpenAPIConfig(
            title="Control plane",
            version=__version__,
            path="/schema",
            description="Metering and billing control plane: ingest, ledger, flags, cutover.",
        ),
        debug=False,
    )


def _guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    if "scope" in handler.opt:
        require_scope(connection, handler)
