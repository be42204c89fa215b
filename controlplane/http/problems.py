"""Errors as ``application/problem+json`` (RFC 9457) answers, and how handlers document them.

Every error is answered with `status`, `title`, `detail` and, for invalid input, `errors`
listing each bad field (and event index); a refusal by a rule also names the `rule`.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import msgspec
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import ResponseSpec

from controlplane.auth import Forbidden, Unauthorized
from controlplane.errors import (
    BadValue,
    ConfigError,
    ControlPlaneError,
    FlagRefused,
    HandBackBusy,
    InvalidInput,
    NotFound,
    Problem,
    ReleaseRefused,
    StorageError,
    Undecodable,
    UnsupportedMediaType,
)
from controlplane.ratelimit import RateLimited

log = structlog.get_logger("api")
PROBLEM = "application/problem+json"


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


def on_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The app's one exception handler: every error, as a problem+json answer."""
    if isinstance(exc, UnsupportedMediaType):
        return problem(415, "Unsupported media type", exc.message)
    if isinstance(exc, Undecodable | BadValue):
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
    if isinstance(exc, ReleaseRefused | HandBackBusy):
        return problem(409, "Refused", exc.message)
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
        headers = exc.headers
        if headers and "allow" in headers:
            headers = {**headers, "allow": _allow(headers["allow"])}
        return problem(exc.status_code, "Request refused", exc.detail, headers=headers)
    if isinstance(exc, RecursionError):  # a body nested deeper than a decoder can follow
        return problem(400, "Bad request", "the body is nested too deeply to decode")
    if isinstance(exc, UnicodeError):  # undecodable bytes (or unencodable text) sent
        return problem(400, "Bad request", f"not valid UTF-8 ({getattr(exc, 'reason', exc)})")
    if isinstance(exc, StorageError | ConfigError | ControlPlaneError):
        log.error("api.error", error=str(exc), kind=type(exc).__name__)
        return problem(503, "Unavailable", str(exc))
    log.exception("api.unexpected", error=str(exc))
    return problem(500, "Internal error", "unexpected error; see the server log")


_MISSING = re.compile(r"Missing required (?P<source>\w+) parameter '(?P<name>[^']+)'")


def _allow(methods: str) -> str:
    """A path's methods in a fixed order, OPTIONS last (`GET, OPTIONS`): litestar lists those
    of a controller's path in no fixed order."""
    names = [m.strip() for m in methods.split(",") if m.strip()]
    return ", ".join(sorted(names, key=lambda m: (m == "OPTIONS", m)))


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
