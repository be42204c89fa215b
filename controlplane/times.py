"""Times as people write them and as the product keeps them.

Inputs take unix seconds or RFC 3339 with an offset (:func:`parse_instant`); JSON answers keep
unix seconds; human output shows ISO 8601 UTC (:func:`iso`).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z

RFC3339_PATTERN = (  # as documented in OpenAPI; dates and offsets are checked by parse_time
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
_RFC3339 = re.compile(  # ASCII digits only: `\d` would take any script's digits
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)


def parse_time(text: str) -> int:
    """An RFC 3339 timestamp (`2026-01-01T10:00:00.5Z`, `...+02:00`) as unix milliseconds.
    Raises ValueError for anything else (ISO 8601 variants included: `20260101T100000Z`,
    week dates, no offset)."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 timestamp (like 2026-01-01T10:00:00Z): {text[:64]!r}")
    year, month, day, hour, minute, second, fraction, z, sign, oh, om = match.groups()
    if int(oh or 0) > 23 or int(om or 0) > 59:
        raise ValueError(f"not a valid UTC offset: {text[:64]!r}")
    try:
        wall = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=UTC
        )
    except ValueError as exc:
        raise ValueError(f"not a valid date and time ({exc}): {text[:64]!r}") from None
    offset = 0 if z else (int(oh) * 60 + int(om)) * 60 * (1 if sign == "+" else -1)
    delta = wall - _EPOCH  # the wall clock read as UTC; integer arithmetic, no float rounding
    seconds = delta.days * 86_400 + delta.seconds - offset
    return seconds * 1000 + int((fraction or "0")[:3].ljust(3, "0"))


def parse_instant(value: Any) -> int:
    """Unix seconds from an integer, a string of digits, or an RFC 3339 time with an offset
    (`2026-01-01T00:00:00Z`, `2026-01-01T02:00:00+02:00`) on a whole second, from 1970 to
    year 9999. Raises ValueError saying what is accepted."""
    if isinstance(value, bool):
        raise ValueError(f"expected unix seconds or an RFC 3339 time, got {value!r}")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        seconds = int(value.strip())
    elif isinstance(value, str):
        ms = parse_time(value.strip())
        if ms % 1000:
            raise ValueError(f"expected a whole second, got {value[:64]!r}")
        seconds = ms // 1000
    else:
        raise ValueError(f"expected unix seconds or an RFC 3339 time, got {value!r}")
    if not 0 <= seconds <= MAX_SECONDS:
        raise ValueError(f"expected a time from 1970 to year 9999, got {seconds}")
    return seconds


def iso(seconds: int | float | None) -> str:
    """`2026-01-01T10:00:00Z` for unix seconds; `never` for None."""
    if seconds is None:
        return "never"
    try:
        return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return f"{seconds} s"
