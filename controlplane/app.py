"""The HTTP API (litestar): a thin shell over :class:`controlplane.core.ControlPlane`.

Errors are ``application/problem+json`` with `status`, `title`, `detail` and, for invalid
input, `errors` listing each bad field (and event index). OpenAPI is served at ``/schema``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Annotated, Any

import msgspec
import structlog
from litestar import HttpMethod, Litestar, Request, Response, Router, get, post, put, route
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import (
    Components,
    OpenAPI,
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
    SecurityScheme,
)
from litestar.params import (
    FromPath,
    FromQuery,
    HeaderParameter,
    JSONBody,
    PathParameter,
    QueryParameter,
)
from litestar.types import ASGIApp, Receive, Scope, Send

from controlplane import __version__, ofrep, scrape
from controlplane import health as job_health
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
    Undecodable,
)
from controlplane.events import DEFAULT_SOURCE, MAX_TS_MS, BatchTooLarge, decode_body, scan_json
from controlplane.flags import FLAGS, FlagChange
from controlplane.ledger import RowState
from controlplane.parity import (
    CleanSince,
    comparison_api,
    drift_api,
    run_api,
    verify_signature,
    window_problems,
)
from controlplane.ratelimit import IngestLimiter, RateLimited
from controlplane.scrape import CONTENT_TYPE as METRICS_CONTENT_TYPE
from controlplane.secrets import reveal
from controlplane.units import format_micros
from controlplane.webhooks import NotAnEvent, WebhookRejected

log = structlog.get_logger("api")
CP = NamedDependency[ControlPlane]
PROBLEM = "application/problem+json"


# errors -----------------------------------------------------------------------------------


def problem(
    status: int,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response[Any]:
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
        headers={**({"WWW-Authenticate": "Bearer"} if status == 401 else {}), **(headers or {})},
    )


def _problems(problems: list[Problem]) -> list[dict[str, Any]]:
    return [{k: v for k, v in msgspec.structs.asdict(p).items() if v is not None} for p in problems]


def _on_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if isinstance(exc, Undecodable):
        return problem(400, "Bad request", exc.message, errors=_problems(exc.problems))
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
    if isinstance(exc, RateLimited):
        return problem(
            429, "Too many requests", str(exc), headers={"Retry-After": exc.retry_after_header}
        )
    if isinstance(exc, ValidationException):
        errors = [
            {
                "field": _wire_name(request, e.get("key", "")),
                "message": e.get("message", ""),
                "in": e.get("source", ""),
            }
            for e in (exc.extra if isinstance(exc.extra, list) else [])
        ]
        missing = _MISSING.match(exc.detail)
        if missing and not errors:
            errors = [{"field": missing["name"], "message": "required", "in": missing["source"]}]
        return problem(400, "Bad request", exc.detail, errors=errors)
    if isinstance(exc, HTTPException):
        # keep the exception's headers: `Allow` on a 405, for one
        return problem(exc.status_code, "Request refused", exc.detail, headers=exc.headers)
    if isinstance(exc, RecursionError):  # a body nested deeper than a decoder can follow
        return problem(400, "Bad request", "the body is nested too deeply to decode")
    if isinstance(exc, UnicodeError):  # undecodable bytes (or unencodable text) sent
        return problem(400, "Bad request", f"not valid UTF-8 ({getattr(exc, 'reason', exc)})")
    if isinstance(exc, StorageError | ConfigError | ControlPlaneError):
        log.error("api.error", error=str(exc), kind=type(exc).__name__)
        return problem(503, "Unavailable", str(exc))
    log.exception("api.unexpected", error=str(exc))
    return problem(500, "Internal error", "unexpected error; see the server log")


# OpenAPI: the error answers each handler documents ------------------------------------------


class FieldProblem(msgspec.Struct, omit_defaults=True):
    field: str
    message: str
    index: int | None = None  # the event's position in an ingest batch
    source: str | None = msgspec.field(default=None, name="in")  # query, path, body


class ProblemDetails(msgspec.Struct, omit_defaults=True):
    """An error answer (RFC 9457), served as application/problem+json."""

    type: str
    status: int
    title: str
    detail: str
    errors: list[FieldProblem] | None = None  # invalid input: each bad field
    rule: str | None = None  # 409: the rule a change broke


class OfrepErrorBody(msgspec.Struct):
    key: str | None
    errorCode: str  # OFREP's own field names
    errorDetails: str


class Readiness(msgspec.Struct):
    status: str  # "ready" or "not ready"
    checks: dict[str, Any]


_WHEN = {
    400: "A malformed query parameter, path parameter or body field (`errors` names it)",
    401: "No bearer token, or an unknown one",
    403: "The token lacks the scope this endpoint needs",
    404: "Not found",
    409: "Refused by a rule (`rule` names it); nothing changed",
    413: "The body is over the size limit",
    415: "A Content-Encoding other than gzip",
    422: "Invalid input (each problem listed in `errors`); nothing changed",
    429: "Over the token's ingest rate limit; retry after `Retry-After` seconds",
    503: "Storage (or another dependency) is unavailable",
}
AUTH = (401, 403, 503)  # every endpoint behind a bearer token
BODY = (400, 413, 422)  # every endpoint reading a JSON body


def documented(*statuses: int) -> dict[int, ResponseSpec]:
    """The problem+json answers of a handler, for the OpenAPI document."""
    return {
        status: ResponseSpec(
            data_container=ProblemDetails,
            media_type=PROBLEM,
            description=_WHEN[status],
            generate_examples=False,
        )
        for status in sorted(set(statuses))
    }


def _ofrep_documented(*statuses: int) -> dict[int, ResponseSpec]:
    out = documented(*statuses)
    for status, description in ((400, "Invalid context or JSON"), (404, "Unknown flag key")):
        out[status] = ResponseSpec(
            data_container=OfrepErrorBody, description=description, generate_examples=False
        )
    return out


BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
_TEXT = Schema(type=OpenAPIType.STRING, min_length=1, max_length=256)
_NULL = Schema(type=OpenAPIType.NULL)
EVENT_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    title="Event",
    description="A usage event (CloudEvents-compatible); give `time` or `ts`, not both. "
    "Other CloudEvents attributes are accepted and not stored.",
    required=["id", "type", "subject"],
    properties={
        "id": _TEXT,
        "type": _TEXT,
        "subject": Schema(
            type=OpenAPIType.STRING, min_length=1, max_length=256, description="the org id"
        ),
        # null is taken as absent
        "source": Schema(
            one_of=[Schema(type=OpenAPIType.STRING, min_length=1, max_length=256), _NULL]
        ),
        "time": Schema(
            one_of=[Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.DATE_TIME), _NULL]
        ),
        "ts": Schema(
            one_of=[
                Schema(
                    type=OpenAPIType.INTEGER,
                    minimum=0,
                    maximum=MAX_TS_MS,
                    description="unix milliseconds",
                ),
                _NULL,
            ]
        ),
        "data": Schema(type=OpenAPIType.OBJECT, additional_properties=Schema()),
    },
)


@dataclasses.dataclass
class IngestOperation(Operation):
    """`POST /v1/events` reads its body itself; this documents what it accepts."""

    def __post_init__(self) -> None:
        batch = Schema(type=OpenAPIType.ARRAY, items=EVENT_SCHEMA)
        self.request_body = RequestBody(
            required=True,
            description="One event, a JSON array of events, NDJSON (one event per line) or a "
            "CloudEvents batch. Validated whole and stored in one transaction.",
            content={
                "application/json": OpenAPIMediaType(schema=Schema(one_of=[EVENT_SCHEMA, batch])),
                "application/cloudevents-batch+json": OpenAPIMediaType(schema=batch),
                "application/x-ndjson": OpenAPIMediaType(
                    schema=Schema(type=OpenAPIType.STRING, description="one event per line")
                ),
            },
        )


@dataclasses.dataclass
class OfrepOperation(Operation):
    """The OFREP endpoints read their (optional) body themselves."""

    def __post_init__(self) -> None:
        context = Schema(  # null is taken as no context
            one_of=[Schema(type=OpenAPIType.OBJECT, additional_properties=Schema()), _NULL]
        )
        self.request_body = RequestBody(
            required=False,
            description="The evaluation context (not used: every flag has one value).",
            content={
                "application/json": OpenAPIMediaType(
                    schema=Schema(type=OpenAPIType.OBJECT, properties={"context": context})
                )
            },
        )


def strict_body(
    struct: type[msgspec.Struct],
) -> Callable[[Request[Any, Any, Any]], Awaitable[None]]:
    """A `before_request` hook checking the JSON body against `struct` as its OpenAPI schema
    says: litestar's own parsing would also take `0` for `false` or `"5"` for `5`. A number
    with a zero fraction (`5.0`) is an integer, as in JSON Schema."""

    async def check(request: Request[Any, Any, Any]) -> None:
        try:
            body = await request.body()
            scan_json(body)
            raw = _json_numbers.decode(body)
            msgspec.convert(raw, struct, strict=True)
        except msgspec.ValidationError as exc:
            field, message = _body_problem(str(exc))
        except msgspec.DecodeError as exc:
            field, message = "", f"malformed JSON: {exc}"
        except Undecodable as exc:
            field, message = "", exc.message
        else:
            return
        raise ValidationException(
            detail=f"{field}: {message}" if field else message,
            extra=[{"key": field, "message": message, "source": "body"}],
        )

    return check


def _integral(text: str) -> int | float:
    """JSON numbers with a fraction: `5.0` and `5e2` as integers, others as floats. Only a
    number of up to 19 digits becomes an integer: `1e999999999` must not build a huge one."""
    with contextlib.suppress(ArithmeticError, ValueError):
        number = Decimal(text)
        if number.adjusted() < 19 and number == number.to_integral_value():
            return int(number)
    return float(text)


_json_numbers = msgspec.json.Decoder(float_hook=_integral)


def _body_problem(text: str) -> tuple[str, str]:
    """(field, message) of a msgspec error such as "Expected `int` - at `$.at`"."""
    message, _, at = text.partition(" - at `$")
    field = at.rstrip("`").lstrip(".")
    for pattern in (_UNKNOWN_FIELD, _MISSING_FIELD):
        named = pattern.match(message)
        if named:
            field = f"{field}.{named['name']}" if field else named["name"]
    return field, message


_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(?P<name>[^`]+)`")
_MISSING_FIELD = re.compile(r"Object missing required field `(?P<name>[^`]+)`")
_MISSING = re.compile(r"Missing required (?P<source>\w+) parameter '(?P<name>[^']+)'")


def _wire_name(request: Request[Any, Any, Any], key: str) -> str:
    """The name a client sent a parameter under (`from`), not the handler's (`start`)."""
    with contextlib.suppress(Exception):  # no route handler (e.g. 404): keep the key
        field = request.route_handler.parsed_fn_signature.parameters.get(key)
        kwarg = getattr(field, "kwarg_definition", None)
        for alias in ("header", "cookie", "query", "name"):
            name = getattr(kwarg, alias, None)
            if isinstance(name, str):
                return name
    return key


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


_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


def _request_id(given: bytes) -> str:
    """The caller's `X-Request-ID` when it is a plain token (letters, digits, `._:-`, at most
    64), else a new one: never an error, whatever bytes the header holds."""
    return given.decode() if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        rid = _request_id(headers.get(b"x-request-id", b""))
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
MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z: larger values overflow storage integers
_SECONDS = {"minimum": 0, "maximum": MAX_SECONDS}  # litestar drops ge/le of Optional parameters
From = Annotated[
    int | None, QueryParameter(name="from", ge=0, le=MAX_SECONDS, schema_extra=_SECONDS)
]
To = Annotated[int | None, QueryParameter(name="to", ge=0, le=MAX_SECONDS, schema_extra=_SECONDS)]
Limit = Annotated[int, QueryParameter(ge=1, le=10_000)]
MAX_ID = 2**53 - 1  # ids: the largest integer every JSON client (and float) holds exactly
# body fields: a reason must say something; times are unix seconds storage can hold
Reason = Annotated[str, msgspec.Meta(pattern=r"\S")]
Seconds = Annotated[int, msgspec.Meta(ge=0, le=MAX_SECONDS)]


def _declared_length(value: str | None) -> int | None:
    """`Content-Length` as sent, read without int() of an unbounded string (whose digits may
    be thousands, or not ASCII): 400 when it is no number of bytes."""
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit()):
        raise HTTPException(status_code=400, detail="Content-Length: not a number of bytes")
    return int(value) if len(value) <= 18 else 10**18  # past any body limit


def _decoded(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent before its `Content-Encoding`: gzip is decompressed, at most `limit`
    bytes of it (413 past that: a small gzip can hold gigabytes); others are refused (415)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise HTTPException(
            status_code=415, detail=f"Content-Encoding {encoding[:32]!r}: only gzip is accepted"
        )
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflate.decompress(body, limit + 1)
    except zlib.error as exc:
        raise HTTPException(status_code=400, detail=f"not valid gzip: {exc}") from None
    if len(out) > limit or inflate.unconsumed_tail:
        raise HTTPException(status_code=413, detail=f"decompressed body over {limit} bytes")
    if not inflate.eof:
        raise HTTPException(status_code=400, detail="gzip body is truncated")
    return out


@post(
    "/v1/events",
    opt={"scope": "ingest"},
    status_code=200,
    summary="Ingest usage events",
    responses=documented(*AUTH, 400, 413, 415, 422, 429),
    security=BEARER,
    operation_class=IngestOperation,
)
async def ingest_events(request: Request[Any, Any, Any], cp: CP) -> dict[str, int]:
    """Accepts a JSON object, a JSON array, NDJSON or a CloudEvents batch. All or nothing;
    answers after commit with the accepted and duplicate counts."""
    token = _actor(request)
    limiter: IngestLimiter = request.app.state.limiter
    try:
        limiter.admit(token)
    except RateLimited as exc:
        cp.metrics.refused("rate_limited")
        log.warning("ratelimit.refused", token=token, retry_after=exc.retry_after_header)
        raise
    limit = cp.config.server.max_body_bytes
    declared = _declared_length(request.headers.get("content-length"))
    if declared is not None and declared > limit:
        cp.metrics.refused("too_large")
        raise HTTPException(status_code=413, detail=f"body over {limit} bytes")
    try:
        body = await request.body()  # the router's limit: max_body_bytes, also when streamed
    except HTTPException as exc:
        if exc.status_code == 413:
            cp.metrics.refused("too_large")
        raise
    body = _decoded(body, request.headers.get("content-encoding", ""), limit)
    try:
        items = decode_body(
            body,
            request.headers.get("content-type", "application/json"),
            cp.config.server.max_batch_events,
        )
    except BatchTooLarge as exc:
        cp.metrics.refused("too_large")
        raise HTTPException(status_code=413, detail=exc.message) from None
    limiter.charge(token, len(items))
    result = await cp.ingest(items, DEFAULT_SOURCE)
    return {"accepted": result.accepted, "duplicates": result.duplicates}


@get(
    "/v1/usage",
    opt={"scope": "read"},
    summary="Usage totals per bucket, from events",
    responses=documented(*AUTH, 400),
    security=BEARER,
)
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


@get(
    "/v1/ledger",
    opt={"scope": "read"},
    summary="Ledger rows",
    responses=documented(*AUTH, 400),
    security=BEARER,
)
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


@get(
    "/v1/flags",
    opt={"scope": "read"},
    summary="Flag values, their source layer and version",
    responses=documented(*AUTH),
    security=BEARER,
)
async def get_flags(cp: CP) -> dict[str, Any]:
    return (await cp.flags()).to_api()


class FlagPut(msgspec.Struct, forbid_unknown_fields=True):
    value: Any
    reason: Reason
    force: bool = False


@put(
    "/v1/flags/{name:str}",
    opt={"scope": "admin"},
    summary="Set a flag's runtime value",
    responses=documented(*AUTH, *BODY, 404, 409),
    security=BEARER,
    before_request=strict_body(FlagPut),
)
async def put_flag(
    request: Request[Any, Any, Any],
    cp: CP,
    name: Annotated[str, PathParameter(schema_extra={"enum": sorted(FLAGS)})],
    data: JSONBody[FlagPut],
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


@get(
    "/v1/flags/audit",
    opt={"scope": "read"},
    summary="Flag change history, newest first",
    responses=documented(*AUTH, 400),
    security=BEARER,
)
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
    effective_from: Seconds | None = None
    reason: str | None = None
    force: bool = False  # a plan period before buckets already rolled up


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


@put(
    "/v1/orgs/{org_id:str}",
    opt={"scope": "admin"},
    summary="Set an org's customer or plan",
    responses=documented(*AUTH, *BODY),
    security=BEARER,
    before_request=strict_body(OrgPut),
)
async def put_org(
    request: Request[Any, Any, Any], cp: CP, org_id: FromPath[str], data: JSONBody[OrgPut]
) -> dict[str, Any]:
    update = await cp.set_org(
        org_id,
        customer=data.customer,
        plan=data.plan,
        actor=_actor(request),
        effective_from=data.effective_from,
        reason=data.reason,
        force=data.force,
    )
    return {**_org_api(update.org), "notes": update.notes}


@route(
    "/v1/orgs/{org_id:str}",
    http_method=HttpMethod.OPTIONS,
    include_in_schema=False,
    status_code=204,
)
async def org_options() -> Response[None]:
    """litestar's own OPTIONS answer lists only the first handler's methods when two
    handlers share a path (`Allow: OPTIONS, PUT` here)."""
    return Response(None, status_code=204, headers={"Allow": "GET, OPTIONS, PUT"})


@get(
    "/v1/orgs/{org_id:str}",
    opt={"scope": "read"},
    summary="An org's customer and plan history",
    responses=documented(*AUTH, 404),
    security=BEARER,
)
async def get_org(cp: CP, org_id: FromPath[str]) -> dict[str, Any]:
    org = await cp.storage.get_org(org_id)
    if org is None:
        raise NotFound(f"no org {org_id!r}")
    return _org_api(org)


@get(
    "/v1/jobs",
    opt={"scope": "read"},
    summary="Recent job runs, newest first",
    responses=documented(*AUTH, 400),
    security=BEARER,
)
async def job_runs(
    cp: CP,
    job: FromQuery[str | None] = None,
    limit: Limit = 50,
) -> dict[str, Any]:
    return {"runs": [msgspec.to_builtins(r) for r in await cp.storage.job_runs(job, limit)]}


@get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _watching_since(state: State) -> float | None:
    """When this process began running the scheduled jobs (None: it does not run them)."""
    jobs = state.get("jobs")
    started: float | None = None if jobs is None else jobs.started_at
    return started


@get(
    "/readyz",
    summary="Readiness: storage reachable, migrations current, jobs not stale",
    responses={
        503: ResponseSpec(
            data_container=Readiness, description="Not ready", generate_examples=False
        )
    },
)
async def readyz(cp: CP, state: State) -> Response[dict[str, Any]]:
    """503 when not ready. A process that runs the scheduled jobs is also not ready while
    one of them has not succeeded within `jobs.stale_after_intervals` of its interval."""
    checks: dict[str, Any] = {}
    ok = True
    try:
        await cp.storage.ping()
        checks["storage"] = "ok"
        status = await cp.storage.migration_status()
        checks["migrations"] = "ok" if status.current else f"pending: {status.pending}"
        ok = status.current
        if state.get("jobs") is not None:
            jobs = await job_health.statuses(
                cp, now=cp.clock(), watching_since=_watching_since(state)
            )
            checks["jobs"] = {j.job: j.to_api() for j in jobs}
            stale = [j for j in jobs if j.stale]
            for job in stale:
                log.warning("jobs.stale", job=job.job, stale_since=job.stale_since)
            ok = ok and not stale
        if cp.ingest_sources:
            # informational: HTTP ingest still works while a stream source cannot consume,
            # and the stream keeps its backlog until it can
            checks["ingest"] = {s.label: s.failing() or "ok" for s in cp.ingest_sources}
    except ControlPlaneError as exc:
        checks["storage"] = f"failed: {exc}"
        ok = False
    return Response(
        {"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503
    )


def metrics_auth(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Open like /healthz, unless `server.metrics_require_token`: then the `read` scope."""
    cp: ControlPlane = connection.app.state.cp
    if cp.config.server.metrics_require_token:
        tokens: TokenStore = connection.app.state.tokens
        connection.state.principal = tokens.authorize(
            connection.headers.get("authorization"), "read"
        )


@get(
    "/metrics",
    guards=[metrics_auth],
    media_type=METRICS_CONTENT_TYPE,
    summary="Prometheus metrics (text exposition format)",
    responses=documented(401, 403),  # only with server.metrics_require_token
)
async def prometheus_metrics(cp: CP, state: State) -> Response[bytes]:
    body = await scrape.exposition(cp, watching_since=_watching_since(state))
    return Response(body, media_type=METRICS_CONTENT_TYPE)


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
    responses=documented(*AUTH, 400),
)
async def usage_parity(
    cp: CP,
    start: Annotated[int, QueryParameter(name="from", ge=0, le=MAX_SECONDS)],
    end: Annotated[int, QueryParameter(name="to", ge=0, le=MAX_SECONDS)],
    mismatches_only: FromQuery[bool] = False,
) -> dict[str, Any]:
    """`from` and `to` are unix seconds on bucket boundaries. Auth: a bearer token with the
    `parity` scope, or X-Timestamp and X-Signature (HMAC-SHA256)."""
    problems = window_problems(start, end, cp.config.rollup.bucket_seconds)
    if problems:
        raise ValidationException(
            detail="; ".join(f"{p.field}: {p.message}" for p in problems),
            extra=[{"key": p.field, "message": p.message, "source": "query"} for p in problems],
        )
    comparison = await cp.parity(start, end)
    return comparison_api(comparison, mismatches_only=mismatches_only)


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
    responses=documented(*AUTH, 400),
    security=BEARER,
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
    responses=documented(*AUTH, 400, 404),
    security=BEARER,
)
async def parity_run(
    cp: CP, run_id: Annotated[int, PathParameter(ge=1, le=MAX_ID)]
) -> dict[str, Any]:
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
    responses=documented(*AUTH, 400),
    security=BEARER,
)
async def parity_clean_since(cp: CP) -> dict[str, Any]:
    return {"meter": cp.config.parity.meter, **_clean_api(await cp.parity_clean_since())}


# catalog and Stripe webhooks --------------------------------------------------------------


@get(
    "/v1/catalog",
    opt={"scope": "read"},
    summary="The newest published price catalog",
    responses=documented(*AUTH, 400, 404),
    security=BEARER,
)
async def get_catalog(
    cp: CP,
    version: Annotated[
        int | None, QueryParameter(ge=1, le=MAX_ID, schema_extra={"minimum": 1, "maximum": MAX_ID})
    ] = None,
) -> dict[str, Any]:
    found = await cp.storage.catalog_version(version)
    if found is None and version is not None:
        raise NotFound(f"no catalog version {version}")
    return catalog_api(found)


@post(
    "/webhooks/stripe",
    status_code=200,
    summary="Stripe webhook events (signed)",
    responses=documented(400, 413, 503),
)
async def stripe_webhook(
    request: Request[Any, Any, Any],
    cp: CP,
    signature: Annotated[
        str | None, HeaderParameter(name="stripe-signature", description="t=...,v1=...")
    ] = None,
) -> Response[Any]:
    """Authenticated by the `Stripe-Signature` header (HMAC-SHA256 over the raw body with
    `stripe.webhook_secret`, 300 s tolerance): 400 when it does not verify or is not a Stripe
    v1 event, nothing done; a signed event that cannot be used or is refused is answered 200
    with its recorded outcome (`unprocessable: ...`, `refused: ...`)."""
    body = await request.body()
    try:
        result = await cp.stripe_webhook(body, signature)
    except NotAnEvent as exc:  # logged and alerted by the handler
        return problem(400, "Not a Stripe event", exc.message)
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
    at: Seconds


class CutoverPreflightBody(msgspec.Struct, forbid_unknown_fields=True):
    at: Seconds | None = None


class CutoverExecuteBody(msgspec.Struct, forbid_unknown_fields=True):
    reason: Reason
    at: Seconds | None = None
    force: bool = False


class CutoverRollbackBody(msgspec.Struct, forbid_unknown_fields=True):
    reason: Reason
    cancel_sent: bool = False


@get(
    "/v1/cutover",
    opt={"scope": "read"},
    summary="Cutover stage and history",
    responses=documented(*AUTH),
    security=BEARER,
)
async def cutover_status(cp: CP) -> dict[str, Any]:
    return msgspec.to_builtins(await cp.cutover.status())  # type: ignore[no-any-return]


@post(
    "/v1/cutover/plan",
    opt={"scope": "admin"},
    status_code=200,
    summary="Who bills which buckets before and after a cutover at T; changes nothing",
    responses=documented(*AUTH, *BODY, 409),
    security=BEARER,
    before_request=strict_body(CutoverPlanBody),
)
async def cutover_plan(cp: CP, data: JSONBody[CutoverPlanBody]) -> dict[str, Any]:
    return msgspec.to_builtins(await cp.cutover.plan(data.at))  # type: ignore[no-any-return]


@post(
    "/v1/cutover/preflight",
    opt={"scope": "admin"},
    status_code=200,
    summary="Every cutover precondition with pass/fail and detail",
    responses=documented(*AUTH, *BODY, 409),
    security=BEARER,
    before_request=strict_body(CutoverPreflightBody),
)
async def cutover_preflight(cp: CP, data: JSONBody[CutoverPreflightBody]) -> dict[str, Any]:
    report = await cp.cutover.preflight(data.at)
    return msgspec.to_builtins(report)  # type: ignore[no-any-return]


@post(
    "/v1/cutover/execute",
    opt={"scope": "admin"},
    status_code=200,
    summary="Re-run preflight, then set authority, bill_from and shadow in one transaction",
    responses=documented(*AUTH, *BODY, 409),
    security=BEARER,
    before_request=strict_body(CutoverExecuteBody),
)
async def cutover_execute(
    request: Request[Any, Any, Any], cp: CP, data: JSONBody[CutoverExecuteBody]
) -> dict[str, Any]:
    report, snapshot = await cp.cutover.execute(
        data.at, actor=_actor(request), reason=data.reason, force=data.force
    )
    return {"preflight": msgspec.to_builtins(report), **snapshot.to_api()}


@post(
    "/v1/cutover/rollback",
    opt={"scope": "admin"},
    status_code=200,
    summary="Authority back to legacy, shadow on; optionally cancel recent sends",
    responses=documented(*AUTH, *BODY, 409),
    security=BEARER,
    before_request=strict_body(CutoverRollbackBody),
)
async def cutover_rollback(
    request: Request[Any, Any, Any], cp: CP, data: JSONBody[CutoverRollbackBody]
) -> dict[str, Any]:
    result = await cp.cutover.rollback(
        actor=_actor(request), reason=data.reason, cancel_sent=data.cancel_sent
    )
    return msgspec.to_builtins(result)  # type: ignore[no-any-return]


# OpenFeature remote evaluation (OFREP) ----------------------------------------------------


def _ofrep_check(body: bytes, key: str | None = None) -> None:
    """OFREP's own checks, after the depth every JSON body is held to (as PARSE_ERROR)."""
    try:
        scan_json(body)
    except Undecodable as exc:
        details = {"key": key, "errorCode": "PARSE_ERROR", "errorDetails": exc.message}
        raise ofrep.OfrepError(400, details) from None
    ofrep.check_request(body, key)


@post(
    "/ofrep/v1/evaluate/flags/{key:str}",
    opt={"scope": "read"},
    status_code=200,
    summary="OFREP: evaluate one flag",
    responses=_ofrep_documented(*AUTH, 400, 404, 413),
    security=BEARER,
    operation_class=OfrepOperation,
)
async def ofrep_flag(
    request: Request[Any, Any, Any],
    cp: CP,
    key: Annotated[str, PathParameter(schema_extra={"enum": list(ofrep.KEYS)})],
) -> Response[Any]:
    try:
        _ofrep_check(await request.body(), key)
        return Response(ofrep.evaluate(await cp.flags(), key), status_code=200)
    except ofrep.OfrepError as exc:
        return Response(exc.body, status_code=exc.status)


@post(
    "/ofrep/v1/evaluate/flags",
    opt={"scope": "read"},
    status_code=200,
    summary="OFREP: evaluate every flag (ETag, If-None-Match)",
    responses={
        **_ofrep_documented(*AUTH, 400, 413),
        304: ResponseSpec(None, description="Not modified: the ETag matches If-None-Match"),
    },
    security=BEARER,
    operation_class=OfrepOperation,
)
async def ofrep_flags(request: Request[Any, Any, Any], cp: CP) -> Response[Any]:
    try:
        _ofrep_check(await request.body())
    except ofrep.OfrepError as exc:
        return Response(exc.body, status_code=exc.status)
    body, etag = ofrep.bulk(await cp.flags())
    if request.headers.get("if-none-match") == etag:
        return Response(None, status_code=304, headers={"ETag": etag})
    return Response(body, status_code=200, headers={"ETag": etag})


# app --------------------------------------------------------------------------------------


def create_app(
    config: Config,
    *,
    cp: ControlPlane | None = None,
    scheduler: bool = False,
    started: bool = False,
) -> Litestar:
    """The litestar app. Starts (and closes) the control plane in its lifespan, unless the
    caller passes one it has `started` itself; with `scheduler`, also runs the rollup and
    sender jobs on their intervals."""
    plane = cp or ControlPlane(config, migrate=config.server.migrate_on_start)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if not started:
                await stack.enter_async_context(plane)
            app.state.cp = plane
            if scheduler:
                from controlplane.scheduler import Jobs

                jobs = Jobs(plane)
                jobs.start()
                app.state.jobs = jobs
                try:
                    yield
                finally:
                    jobs.stop()
            else:
                yield

    app = Litestar(
        route_handlers=[
            # ingest alone may read bodies up to max_body_bytes; every other body is small
            Router(
                "/",
                route_handlers=[ingest_events],
                request_max_body_size=config.server.max_body_bytes,
            ),
            usage,
            ledger,
            get_flags,
            put_flag,
            flag_audit,
            org_options,  # before the org handlers: see org_options
            put_org,
            get_org,
            job_runs,
            healthz,
            readyz,
            prometheus_metrics,
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
        request_max_body_size=config.server.max_small_body_bytes,
        state=State({"tokens": TokenStore(config.auth), "limiter": IngestLimiter(config)}),
        openapi_config=OpenAPIConfig(
            title="Control plane",
            version=__version__,
            path="/schema",
            description="Metering and billing control plane: ingest, ledger, flags, cutover.",
            components=Components(
                security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}
            ),
        ),
        debug=False,
    )
    _document_bodies(app.openapi_schema)
    _document_window(app.openapi_schema, config.rollup.bucket_seconds)
    return app


BODIES: tuple[type[msgspec.Struct], ...] = (
    FlagPut,
    OrgPut,
    CutoverPlanBody,
    CutoverPreflightBody,
    CutoverExecuteBody,
    CutoverRollbackBody,
)


def _document_bodies(openapi: OpenAPI) -> None:
    """Describe the JSON bodies with msgspec's own schemas, exactly what `strict_body`
    enforces: unknown fields refused, bounds of optional fields (which litestar's schema
    drops), patterns."""
    _, components = msgspec.json.schema_components(
        BODIES, ref_template="#/components/schemas/{name}"
    )
    if openapi.components.schemas is None:
        openapi.components.schemas = {}
    for name, schema in components.items():
        # a plain JSON Schema dict: serialized as it is
        openapi.components.schemas[name] = schema


def _document_window(openapi: OpenAPI, bucket_seconds: int) -> None:
    """The parity window's bounds are bucket boundaries of this config."""
    item = (openapi.paths or {}).get("/internal/usage-parity")
    for parameter in (item.get.parameters or []) if item and item.get else []:
        schema = getattr(parameter, "schema", None)
        if getattr(parameter, "name", None) in ("from", "to") and isinstance(schema, Schema):
            schema.multiple_of = bucket_seconds


def _guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    if "scope" in handler.opt:
        require_scope(connection, handler)
