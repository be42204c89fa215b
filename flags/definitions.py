"""Flag definitions: name, type, default, environment variables and value parsing."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import msgspec

from controlplane.times import MAX_SECONDS, parse_instant


class Authority(enum.StrEnum):
    LEGACY = "legacy"
    CONTROLPLANE = "controlplane"


AUTHORITY_ALIASES = {"cell": Authority.LEGACY, "edge": Authority.CONTROLPLANE}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected true or false, got {value!r}")


MAX_BILL_FROM = MAX_SECONDS  # 9999-12-31T23:59:59Z; larger overflows storage integers


def parse_bill_from(value: Any) -> int | None:
    """T: unix seconds or an RFC 3339 time (`2026-01-01T00:00:00Z`); null (or "") unsets it."""
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "null", "none"}):
        return None
    try:
        return parse_instant(value)
    except ValueError as exc:
        raise ValueError(f"{exc}, or null") from None


def parse_authority(value: Any) -> Authority:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in AUTHORITY_ALIASES:
            return AUTHORITY_ALIASES[text]
        try:
            return Authority(text)
        except ValueError:
            pass
    raise ValueError(f"expected 'legacy' or 'controlplane' (aliases 'cell', 'edge'), got {value!r}")


class FlagSpec(msgspec.Struct, frozen=True):
    name: str
    default: Any
    env: tuple[str, ...]
    parse: Callable[[Any], Any]  # from text (environment, CLI) or JSON
    description: str


FLAGS: dict[str, FlagSpec] = {
    spec.name: spec
    for spec in (
        FlagSpec(
            name="shadow",
            default=True,
            env=("SHADOW",),
            parse=parse_bool,
            description=(
                "compute everything, send nothing (but the corrections of buckets already "
                "billed here, which the legacy biller skips)"
            ),
        ),
        FlagSpec(
            name="bill_from",
            default=None,
            env=("BILL_FROM",),
            parse=parse_bill_from,
            description="the boundary T (unix seconds or RFC 3339): bill buckets from T on",
        ),
        FlagSpec(
            name="authority",
            default=Authority.LEGACY,
            env=("PRO_BILLING_AUTHORITY", "AUTHORITY"),
            parse=parse_authority,
            description="who bills: legacy or controlplane",
        ),
    )
}


def to_json(value: Any) -> Any:
    """A flag value as stored and shown (enums as their string)."""
    return value.value if isinstance(value, enum.Enum) else value
