"""What the controllers share: the control plane dependency, parameter types, and the strict
check of JSON bodies."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Annotated, Any, overload

import msgspec
from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.exceptions import ValidationException
from litestar.params import FromQuery, QueryParameter

from controlplane.core import ControlPlane
from controlplane.errors import InvalidInput, Problem, Undecodable
from controlplane.events import scan_json
from controlplane.times import MAX_SECONDS, RFC3339_PATTERN, parse_instant

Org = FromQuery[str | None]
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
# a time a person writes: unix seconds, or RFC 3339 with an offset (read with `seconds`)
Instant = (
    Seconds
    | Annotated[
        str,
        msgspec.Meta(
            pattern=RFC3339_PATTERN,
            description="an RFC 3339 time with an offset, on a whole second",
            examples=["2026-01-01T00:00:00Z"],
        ),
    ]
)


@overload
def seconds(value: int | str, field: str) -> int: ...


@overload
def seconds(value: int | str | None, field: str) -> int | None: ...


def seconds(value: int | str | None, field: str) -> int | None:
    """Unix seconds from an :data:`Instant` body field (its spelling already checked against
    the schema); an impossible date, offset or fraction of a second is 422 naming `field`."""
    if value is None:
        return None
    try:
        return parse_instant(value)
    except ValueError as exc:
        raise InvalidInput([Problem(field=field, message=str(exc))]) from None


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


CP = NamedDependency[ControlPlane]  # the app's control plane, provided to every handler


async def provide_cp(state: State) -> ControlPlane:
    cp: ControlPlane = state.cp
    return cp
