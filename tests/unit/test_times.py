"""Times people write (controlplane/times.py): unix seconds or RFC 3339 in, ISO 8601 UTC out."""

from __future__ import annotations

import pytest

from controlplane.flags.definitions import parse_bill_from
from controlplane.times import iso, parse_instant

T = 1_767_225_600  # 2026-01-01T00:00:00Z


@pytest.mark.parametrize(
    "value",
    [
        T,
        str(T),
        " 1767225600 ",
        "2026-01-01T00:00:00Z",
        "2026-01-01T02:00:00+02:00",
        "2025-12-31T19:00:00-05:00",
        "2026-01-01t00:00:00z",
    ],
)
def test_an_instant_is_unix_seconds_or_rfc_3339(value: object) -> None:
    assert parse_instant(value) == T


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("2026-01-01T00:00:00", "not an RFC 3339 timestamp"),  # no offset: which zone?
        ("2026-01-01", "not an RFC 3339 timestamp"),
        ("2026-01-01T00:00:00.5Z", "a whole second"),
        (True, "expected unix seconds or an RFC 3339 time"),
        (1.5, "expected unix seconds or an RFC 3339 time"),
        (-1, "from 1970 to year 9999"),
        ("-1", "not an RFC 3339 timestamp"),
        (10**12, "from 1970 to year 9999"),
        ("١٧٦٧٢٢٥٦٠٠", "not an RFC 3339 timestamp"),  # digits of another script
    ],
)
def test_anything_else_is_refused_saying_what_is_accepted(value: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_instant(value)


def test_bill_from_takes_rfc_3339_too() -> None:
    assert parse_bill_from("2026-01-01T00:00:00Z") == T
    assert parse_bill_from(T) == T and parse_bill_from("null") is None
    with pytest.raises(ValueError, match="or null"):
        parse_bill_from("tomorrow")


def test_iso_is_utc_with_a_z() -> None:
    assert iso(T) == "2026-01-01T00:00:00Z"
    assert iso(T + 0.9) == "2026-01-01T00:00:00Z"
    assert iso(None) == "never"
