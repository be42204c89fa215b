"""What both legacy plugins share: turning the legacy biller's answers into exact values."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from controlplane.interfaces import LegacyError, LegacyInvoice, LegacyInvoiceLine

EXACT_HINT = (
    "return an exact number: an integer, a decimal/numeric, or a decimal string "
    "(in SQLite: CAST(... AS TEXT) or printf('%.6f', ...))"
)


def exact(value: Any, where: str) -> Decimal:
    """`value` as an exact Decimal; binary floats, booleans and nulls are refused."""
    if isinstance(value, bool) or value is None:
        raise LegacyError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        raise LegacyError(f"{where}: got a binary float ({value!r}); {EXACT_HINT}")
    if isinstance(value, Decimal):
        number = value
    elif isinstance(value, str | bytes):
        text = value.decode() if isinstance(value, bytes) else value
        try:
            number = Decimal(text.strip())
        except InvalidOperation:
            raise LegacyError(f"{where}: {text!r} is not a number") from None
    else:
        raise LegacyError(f"{where}: expected a number, got {type(value).__name__}")
    if not number.is_finite():
        raise LegacyError(f"{where}: {number} is not a finite number")
    return number


def org_id(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value) == "":
        raise LegacyError(f"{where}: expected an org id (text), got {value!r}")
    return str(value)


def collect(rows: Iterable[tuple[Any, Any]], source: str) -> dict[str, Decimal]:
    """Per-org totals from (org id, value) rows; rows of the same org are added up."""
    out: dict[str, Decimal] = {}
    for i, (org, value) in enumerate(rows):
        key = org if type(org) is str and org else org_id(org, f"{source} row {i}, org id")
        kind = type(value)
        amount: Decimal | None = None
        if kind is str:  # the common case first: decimal text
            try:
                amount = Decimal(value)
            except InvalidOperation:
                amount = None
        elif kind is int or kind is Decimal:
            amount = Decimal(value)
        if amount is None or not amount.is_finite():
            amount = exact(value, f"{source} row {i} ({key}), value")  # raises with the reason
        out[key] = out[key] + amount if key in out else amount
    return out


def unix_seconds(value: Any, where: str) -> int | None:
    """A point in time as unix seconds: an integer, an integral decimal or an aware datetime."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise LegacyError(f"{where}: a naive datetime is ambiguous; return timestamptz")
        return int(value.timestamp())
    number = exact(value, where)
    if number != number.to_integral_value():
        raise LegacyError(f"{where}: expected whole unix seconds, got {number}")
    return int(number)


def minor(value: Any, where: str) -> int:
    """An amount in whole minor units (cents): an integer or an integral decimal."""
    number = exact(value, where)
    if number != number.to_integral_value():
        raise LegacyError(f"{where}: expected whole minor units (cents), got {number}")
    return int(number)


def invoices_from_rows(rows: Iterable[Sequence[Any]], source: str) -> dict[str, LegacyInvoice]:
    """Legacy invoices from rows of (org id, total) or (org id, line description, amount):
    with lines, an org's total is the sum of its lines. Amounts in whole minor units."""
    totals: dict[str, int] = {}
    lines: dict[str, list[LegacyInvoiceLine]] = {}
    shape: int | None = None
    for i, row in enumerate(rows):
        if len(row) not in (2, 3) or (shape is not None and len(row) != shape):
            raise LegacyError(
                f"{source} row {i}: expected (org id, total) or (org id, description, amount) "
                f"on every row, got {tuple(row)!r:.200}"
            )
        shape = len(row)
        org = org_id(row[0], f"{source} row {i}, org id")
        amount = minor(row[-1], f"{source} row {i} ({org}), amount")
        if shape == 2:
            if org in totals:
                raise LegacyError(f"{source} row {i}: a second total for org {org!r}")
            totals[org] = amount
        else:
            description = row[1]
            if not isinstance(description, str):
                raise LegacyError(f"{source} row {i} ({org}): the description must be text")
            lines.setdefault(org, []).append(LegacyInvoiceLine(description, amount))
            totals[org] = totals.get(org, 0) + amount
    return {
        org: LegacyInvoice(org, total, lines.get(org) if shape == 3 else None)
        for org, total in totals.items()
    }
